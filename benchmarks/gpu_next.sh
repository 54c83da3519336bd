#!/usr/bin/env bash
# The next GPU session's run, in one device call: what no GPU has measured yet, in order of what it decides.
# Written and dry-run on the CPU in a session without a GPU (2026-11-30, second session). Budget 480 s, so a
# device call with timeout_s=520 plus the machine's start-up leaves a few minutes of the 15 for a short rerun.
#
#   PREFIXATTN_GIT_COMMIT=<sha> bash benchmarks/gpu_next.sh   # the device copy has no .git: pass the commit
#   bash benchmarks/gpu_next.sh --dry          # the same steps on the CPU, tiny shapes (tests this file)
#
# 1. install (CUDA extension built), env
# 2. GPU tests never run on a GPU: backend "sdpa" (cuDNN and flash, bf16/fp16, D 64/128, GQA, pools, the
#    transformers layout), the PEFT import on the kernels, the demo on the kernels, and a few CUDA-backend
#    tests (its output buffer now comes from kernels.bshd_empty; same layout, not yet run there), and the
#    64-bit offset tests (tests/test_large_offsets.py: tensors past 2^31 elements, peak ~35 GB; +60 s of cap)
# 3. attention: prefixattn (triton) vs prefixattn_sdpa vs the cuDNN floor, main shape at P=16/128/512, GQA and
#    D=64 at P=128 (decides whether `auto` should pick "sdpa" for training and prefill)
# 4. e2e: training step floor / prefixattn / prefixattn_sdpa (issue 3's +3% target), then generation with the
#    fixed method (full-length warm-up, median of 3) and serving at B=128/256 (issues 3 and 4)
# 5. serving (issue 8): prefixattn.merge_prefix alone at serving sizes (bf16, T = 256 decode tokens and 4096
#    prefill tokens, P 16/128, 64 pool entries; its GPU tests, CUDA-graph capture included, are in step 2).
#    vLLM is NOT installed on the lent machine and it has no network, so the vLLM rows of bench_serving.py
#    (plain vLLM vs vLLM + prefixattn, the 0.95x and 10x targets) cannot run there: the step records them as
#    skipped with that reason. On a machine with vllm 0.32.x: python benchmarks/bench_serving.py --quick
#    (add --paged-decode for the prefix_attention_paged decode A/B). TP=2 needs two GPUs: unmeasured.
# 6. decode: the full grid of issue 4 (B 1/32/128/256 x Sk 256/2048/16384 x P 16/128/512), what time is left
# Predictions for 3 and 4 are in benchmarks/NOTES.md ("Backend sdpa: prediction").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

# One line: gpu_check.sh runs the tests step as `bash -c "... pytest $PYTEST_ARGS ..."`, where a newline would
# end the command. The dry run takes the same step (the GPU tests then collect and skip).
PYTEST_ARGS="-q -m gpu --maxfail=5 -rfE -p no:cacheprovider tests/test_sdpa_backend.py tests/hf/test_peft_compat.py"
PYTEST_ARGS+=" tests/test_demo.py tests/test_cuda_backend.py tests/test_conformance.py tests/test_large_offsets.py tests/test_merge_prefix.py"
PYTEST_ARGS+=" -k 'not test_cuda_backend or special_cases or forced_split or empty_rows or graph'"

if [ "${1:-}" = "--dry" ]; then
  exec bash benchmarks/gpu_check.sh --dry --budget 400 --steps env,tests,attention,e2e,serving,decode \
    --pytest-args "$PYTEST_ARGS" \
    --attn-args "--phases main --methods prefixattn,prefixattn_sdpa,floor" \
    --e2e-args "--phases train --train-methods floor,prefixattn,prefixattn_sdpa" \
    --serving-args "--phases merge,vllm"
fi

export CAP_INSTALL=${CAP_INSTALL:-60} CAP_TESTS=${CAP_TESTS:-170} CAP_ATTENTION=${CAP_ATTENTION:-100}
export CAP_E2E=${CAP_E2E:-150} CAP_SERVING=${CAP_SERVING:-40} CAP_DECODE=${CAP_DECODE:-90}
exec bash benchmarks/gpu_check.sh --budget "${BUDGET:-480}" --steps install,env,tests,attention,e2e,serving,decode \
  --pytest-args "$PYTEST_ARGS" \
  --attn-args "--quick --skip-flex --methods prefixattn,prefixattn_sdpa,floor" \
  --e2e-args "--quick --phases train,generate,serve --train-methods floor,prefixattn,prefixattn_sdpa" \
  --serving-args "--phases merge,vllm"
