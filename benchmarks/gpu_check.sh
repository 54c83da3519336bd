#!/usr/bin/env bash
# The one script to run on the GPU machine: install (builds the CUDA extension), environment, GPU tests,
# compute-sanitizer memcheck, then the benchmarks; each step under `timeout` inside one time budget.
#
#   bash benchmarks/gpu_check.sh [--quick] [--steps LIST] [--budget SECONDS] [--dry]
#
#   --steps LIST     comma list, run in the order given, of install,env,tests,memcheck,attention,decode,e2e,
#                    serving (not in the default list: it needs vLLM for most of its rows)
#                    (default: all, in that order; --dry: env,attention,decode,e2e)
#   --budget S       total wall-clock seconds (default 540; --dry 300). Each step gets what is left, capped;
#                    steps that no longer fit are skipped and listed as SKIPPED.
#   --quick          the benchmarks' quick modes (fewer shapes / points / tokens)
#   --dry, --smoke   no GPU: tiny shapes on the CPU, backend torch, no install (tests this script)
#   --attn-args A, --decode-args A, --e2e-args A, --serving-args A   extra arguments for one benchmark,
#                    e.g. "--skip-flex", "--phases main,gqa", "--phases train,generate"
#   --pytest-args A  replaces the default "-q -m gpu --maxfail=10 -rfE -p no:cacheprovider"
# Environment: OUT (default ./out), PYTHON (default python3), WORK (scratch, default a new /tmp dir),
# PREFIXATTN_GIT_COMMIT (the commit to record where the tree has no usable .git, as on the device machine), and
# STEPS, BUDGET, QUICK=1 as alternatives to the flags; CAP_<STEP> (e.g. CAP_TESTS=90) caps one step's seconds.
#
# What comes back: $OUT/summary.txt (step status, test result, benchmark tables and targets),
# $OUT/results.tar.gz (every log, JSON, table and plot), $OUT/{attention,decode,e2e}.json and the PNGs.
# They are refreshed after every step, so a run cut short still returns what it finished.
# The end of stdout is summary.txt.

set -uo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

DRY=0
QUICK=${QUICK:-0}
STEPS=${STEPS:-}
BUDGET=${BUDGET:-}
ATTN_ARGS=${ATTN_ARGS:-}
DECODE_ARGS=${DECODE_ARGS:-}
E2E_ARGS=${E2E_ARGS:-}
SERVING_ARGS=${SERVING_ARGS:-}
PYTEST_ARGS=${PYTEST_ARGS:--q -m gpu --maxfail=10 -rfE -p no:cacheprovider}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry|--smoke) DRY=1 ;;
    --quick) QUICK=1 ;;
    --steps) STEPS=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --attn-args) ATTN_ARGS=$2; shift ;;
    --decode-args) DECODE_ARGS=$2; shift ;;
    --e2e-args) E2E_ARGS=$2; shift ;;
    --serving-args) SERVING_ARGS=$2; shift ;;
    --pytest-args) PYTEST_ARGS=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/out}
WORK=${WORK:-$(mktemp -d /tmp/prefixattn-gpu-check.XXXXXX)}
RESULTS=$WORK/results
LOGS=$WORK/logs
mkdir -p "$OUT" "$RESULTS" "$LOGS"
SMOKE=""
if [ "$DRY" = 1 ]; then
  STEPS=${STEPS:-env,attention,decode,e2e}
  BUDGET=${BUDGET:-300}
  SMOKE="--smoke"
else
  STEPS=${STEPS:-install,env,tests,memcheck,attention,decode,e2e}
  BUDGET=${BUDGET:-540}
fi
ALL_STEPS=install,env,tests,memcheck,attention,decode,e2e,serving
for s in ${STEPS//,/ }; do
  [[ ",$ALL_STEPS," == *",$s,"* ]] || { echo "gpu_check.sh: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2; }
done
QFLAG=""
[ "$QUICK" = 1 ] && QFLAG="--quick"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

START=$SECONDS
STATUS=$WORK/steps.txt
RESERVE=20  # seconds kept back for the summary and packaging
: > "$STATUS"

want() { [[ ",$STEPS," == *",$1,"* ]]; }
left() { echo $((BUDGET - (SECONDS - START))); }

package() {  # results so far -> $OUT (called after every step)
  {
    echo "prefixattn gpu_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  budget ${BUDGET}s, used $((SECONDS - START))s" \
         " dry=$DRY quick=$QUICK steps=$STEPS"
    echo "step       status   time   last line of its log"
    cat "$STATUS"
    if [ -f "$LOGS/install.log" ]; then
      echo "install: $(grep -E '^(cuda extension|Successfully installed|ERROR)' "$LOGS/install.log" | tail -n 2 | tr '\n' ' ')"
    fi
    if [ -f "$LOGS/tests.log" ]; then
      echo "tests: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/tests.log" | tail -n 1)"
      grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" | head -n 10 | cut -c1-160
    fi
    if [ -f "$LOGS/memcheck.log" ]; then
      echo "memcheck: $(grep -E 'ERROR SUMMARY|memcheck:' "$LOGS/memcheck.log" | tail -n 1)"
    fi
    echo
    timeout 60 "$PY" benchmarks/summarize.py "$RESULTS" --brief 2>&1
    [ -f "$RESULTS/serving.txt" ] && { echo; echo "serving:"; cat "$RESULTS/serving.txt"; }
  } > "$WORK/summary.txt"
  timeout 60 "$PY" benchmarks/summarize.py "$RESULTS" > "$WORK/summary_full.txt" 2>&1
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  for f in attention.json decode.json e2e.json serving.json attention.png decode.png; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/$f"
  done
  tar czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# run_step NAME CAP_SECONDS COMMAND: COMMAND (bash) with output in $LOGS/NAME.log and a timeout of
# min(CAP, budget left - RESERVE); STEP_BUDGET (that timeout - 15 s) lets a benchmark stop cleanly first.
run_step() {
  local name=$1 cap=$2 cmd=$3
  want "$name" || return 0
  local avail=$(($(left) - RESERVE))
  if [ "$avail" -lt 20 ]; then
    printf '%-10s %-8s %5ss  %s\n' "$name" SKIPPED 0 "time budget spent" >> "$STATUS"
    echo "=== $name: skipped, time budget spent"
    return 0
  fi
  local t=$((cap < avail ? cap : avail))
  export STEP_BUDGET=$((t - 15))
  echo "=== $name: timeout ${t}s, $(left)s of ${BUDGET}s left, $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout -k 10 "$t" bash -c "$cmd" > "$LOGS/$name.log" 2>&1
  local rc=$? st=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st=TIMEOUT; elif [ "$rc" != 0 ]; then st="rc=$rc"; fi
  printf '%-10s %-8s %5ss  %s\n' "$name" "$st" "$((SECONDS - t0))" \
    "$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-100)" >> "$STATUS"
  grep -v '^\s*$' "$LOGS/$name.log" | tail -n 3 | cut -c1-200
  package
}

# One step: its time cap (seconds) and command; steps run in the order --steps gives them.
step() {
  case "$1" in
    install) run_step install ${CAP_INSTALL:-300} "
      PREFIXATTN_BUILD_CUDA=${PREFIXATTN_BUILD_CUDA:-1} $PY -m pip install -v --no-deps --no-build-isolation -e . || exit 1
      $PY -c 'import prefixattn._C' 2>/dev/null && echo 'cuda extension: built' || echo 'cuda extension: NOT importable'
    " ;;
    env) run_step env ${CAP_ENV:-60} "
      nvidia-smi || echo 'no nvidia-smi'
      nvcc --version || echo 'no nvcc'
      $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|matplotlib|numpy|setuptools|pybind11) '
      $PY -c 'import json, torch; from prefixattn.bench import timing
dev = \"cuda\" if torch.cuda.is_available() else \"cpu\"
env = timing.environment(dev)
open(\"$RESULTS/env.json\", \"w\").write(json.dumps(env, indent=1))
print(json.dumps(env, indent=1))'
    " ;;
    tests) run_step tests ${CAP_TESTS:-240} "$PY -m pytest $PYTEST_ARGS --junitxml=$LOGS/pytest-gpu.xml" ;;
    memcheck) run_step memcheck ${CAP_MEMCHECK:-180} "
      if [ ! -f benchmarks/cuda_memcheck.py ]; then echo 'memcheck: skipped, no benchmarks/cuda_memcheck.py'; exit 0; fi
      if ! command -v compute-sanitizer >/dev/null; then echo 'memcheck: skipped, no compute-sanitizer'; exit 0; fi
      compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/cuda_memcheck.py
    " ;;
    attention) run_step attention ${CAP_ATTENTION:-300} \
      "$PY benchmarks/bench_attention.py --out $RESULTS --budget-s \$STEP_BUDGET $QFLAG $SMOKE $ATTN_ARGS" ;;
    decode) run_step decode ${CAP_DECODE:-200} \
      "$PY benchmarks/bench_decode.py --out $RESULTS --budget-s \$STEP_BUDGET $QFLAG $SMOKE $DECODE_ARGS" ;;
    e2e) run_step e2e ${CAP_E2E:-360} "$PY benchmarks/bench_e2e.py --out $RESULTS --budget-s \$STEP_BUDGET $QFLAG $SMOKE $E2E_ARGS" ;;
    serving) run_step serving ${CAP_SERVING:-240} \
      "$PY benchmarks/bench_serving.py --out $RESULTS --budget-s \$STEP_BUDGET $QFLAG $SMOKE $SERVING_ARGS" ;;
  esac
}

echo "gpu_check: steps $STEPS, budget ${BUDGET}s, quick=$QUICK dry=$DRY, results in $OUT (scratch $WORK)"
for s in ${STEPS//,/ }; do
  step "$s"
done

package
echo
echo "================ summary ($OUT/summary.txt; full logs in $OUT/results.tar.gz) ================"
cat "$OUT/summary.txt"
grep -qE ' (TIMEOUT|rc=)' "$STATUS" && exit 1
exit 0
