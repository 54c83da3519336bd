"""The numpy lane model of the CUDA decode kernel (tools/decode_lane_model.py) computes prefix attention.

The model follows csrc/decode_kernel.cuh lane by lane (mma fragments, 16-key tiles, masks, online softmax, warp
and split merges). Each case compares it with the float64 reference; the bound (1e-2) covers the kernel's
rounding of the probabilities to bf16/fp16 before the P.V product, which the model reproduces (it lands near
1e-3). A wrong mask must not pass.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from prefixattn.reference import prefix_attention_reference

PATH = Path(__file__).resolve().parents[1] / "tools" / "decode_lane_model.py"
_spec = importlib.util.spec_from_file_location("decode_lane_model", PATH)
lane_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lane_model)


@pytest.mark.parametrize("case", lane_model.CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "base")
def test_lane_model_matches_the_reference(case):
    err, lse_err = lane_model.check(**case)
    assert err < 1e-2 and lse_err < 1e-2


def test_lane_model_tells_a_wrong_mask_apart():
    """The comparison has teeth: the model run without the causal mask differs from the causal reference,
    while the model run with it agrees (fp16 tensors in prefix_attention's layout, Sq=2 against Sk=20)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 2, 64, generator=g).half()
    k, v = (torch.randn(2, 2, 20, 64, generator=g).half() for _ in range(2))
    pk, pv = (torch.randn(2, 3, 64, generator=g).half() for _ in range(2))
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), pk.double(), pv.double(), causal=True)
    right, _ = lane_model.from_tensors(q, k, v, pk, pv, causal=True)
    wrong, _ = lane_model.from_tensors(q, k, v, pk, pv, causal=False)
    assert rel_err(right, ref) < 1e-2
    assert rel_err(wrong, ref) > 0.1
