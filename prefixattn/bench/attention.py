"""Training-shape attention: prefixattn against concatenation, split + merge and no-prefix baselines
(docs/design.md), side by side in one run.

Methods (each checked against concat_mask on the same inputs before it is timed):
  concat_mask        torch.cat of the batch-expanded prefix into K/V (timed: it is done per layer per step),
                     then SDPA with an explicit bool mask [B, 1, S, P+S], default backend; GQA through
                     repeat_kv, because transformers' sdpa path does that whenever a mask is given.
  concat_lowerright  the same cat, then SDPA with causal_lower_right(S, P+S) under the flash backend.
  concat_flex        the same cat, then torch.compile'd FlexAttention with a prefix+causal block mask
                     (compilation is slow: its own phase, P=128 on the main shape, as in the baselines).
  split_merge        no cat: cuDNN causal attention over the sequence (returning its log-sum-exp), the
                     prefix by two matmuls, and a torch.compile'd log-sum-exp merge. Forward only (a
                     gradient through the cuDNN log-sum-exp output is not available, as in the baselines).
  floor              no prefix at all: cuDNN causal SDPA on the sequence. Targets scale it by (1 + 2P/S).
  prefixattn         prefixattn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend=...).
  prefixattn_fast    the same with deterministic=False (dq by fp32 atomics); fwd+bwd only (the forward is the
                     same), GPU runs only.
  prefixattn_sdpa    prefix_attention(..., backend="sdpa", deterministic=False): cuDNN (else flash) on the
                     sequence keys, Triton prefix merge; its backward feeds the vendor backward the final
                     (out, lse). GPU runs, and smoke runs under TRITON_INTERPRET=1.

fwd is timed under torch.no_grad(); fwd+bwd runs the forward with autograd and then
torch.autograd.grad(out, [q, k, v, prefix_k, prefix_v], grad_out) with a random grad_out (the prefix
requires grad: it is what prefix tuning trains). Run: python benchmarks/bench_attention.py --help.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from . import report, timing
from .timing import Deadline, Progress, ResultWriter, error_text, rel_err

PREFIX_LENS = (16, 128, 512)
CHECK_TOL = 5e-2  # bf16 tolerance (docs/design.md, "Tolerances"); outputs are compared against concat_mask's
PHASES = ("ceiling", "main", "gqa", "d64", "flex")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads_q // self.heads_kv

    def describe(self) -> str:
        return f"B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} S={self.seqlen} D={self.head_dim}"


GPU_SHAPES = {
    "main": Shape("main", 4, 32, 32, 2048, 128),
    "gqa": Shape("gqa", 4, 32, 8, 2048, 128),
    "d64": Shape("d64", 4, 32, 32, 2048, 64),
}
SMOKE_SHAPES = {
    "main": Shape("main", 1, 2, 2, 48, 16),
    "gqa": Shape("gqa", 1, 4, 2, 48, 16),
    "d64": Shape("d64", 1, 2, 2, 48, 8),
}
SMOKE_PREFIX_LENS = (4, 8)


# ---------------------------------------------------------------------------------------------- methods

Fwd = Callable[..., torch.Tensor]


@dataclass
class Method:
    name: str
    fwd: Fwd  # fwd(q, k, v, prefix_k, prefix_v) -> out [B, Hq, S, D]
    note: str
    backward: bool = True
    forward: bool = True  # False: time fwd+bwd only (a variant whose forward is another method's)


def concat_kv(k, v, prefix_k, prefix_v):
    """What HF/PEFT do per layer: a per-sequence copy of the shared prefix in front of K and V."""
    batch = k.shape[0]
    kc = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
    vc = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    return kc, vc


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv*groups, L, D], a copy."""
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)


def prefix_causal_mask(batch: int, seqlen: int, plen: int, device) -> torch.Tensor:
    """bool [B, 1, S, P+S], True = attend: the prefix always, the sequence causally (as sdpa_mask builds)."""
    seq = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
    full = torch.cat([torch.ones(seqlen, plen, dtype=torch.bool, device=device), seq], dim=1)
    return full.expand(batch, 1, seqlen, plen + seqlen).contiguous()


def build_concat_mask(shape: Shape, plen: int, device) -> list[Method]:
    mask = prefix_causal_mask(shape.batch, shape.seqlen, plen, device)
    g = shape.groups

    def fwd(q, k, v, pk, pv):
        kc, vc = concat_kv(k, v, pk, pv)
        return F.scaled_dot_product_attention(q, repeat_kv(kc, g), repeat_kv(vc, g), attn_mask=mask)

    note = "cat + SDPA(default backend, bool mask)" + (" + repeat_kv" if g > 1 else "")
    return [Method("concat_mask", fwd, note)]


def build_concat_lowerright(shape: Shape, plen: int, device) -> list[Method]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(shape.seqlen, plen + shape.seqlen)
    g = shape.groups

    def gqa(q, k, v, pk, pv):
        kc, vc = concat_kv(k, v, pk, pv)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias, enable_gqa=g > 1)

    def repeated(q, k, v, pk, pv):
        kc, vc = concat_kv(k, v, pk, pv)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, repeat_kv(kc, g), repeat_kv(vc, g), attn_mask=bias)

    methods = [
        Method("concat_lowerright", gqa, "cat + SDPA(flash, causal_lower_right)" + (" enable_gqa" if g > 1 else ""))
    ]
    if g > 1:
        methods.append(Method("concat_lowerright", repeated, "cat + SDPA(flash, causal_lower_right) + repeat_kv"))
    return methods


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        import torch._dynamo

        cfg = torch._dynamo.config  # one compilation per (shape, P) by design: allow them all
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 64))
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def build_concat_flex(shape: Shape, plen: int, device) -> list[Method]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def prefix_causal(b, h, q_idx, kv_idx):
        return (kv_idx < plen) | (kv_idx - plen <= q_idx)

    block_mask = create_block_mask(prefix_causal, None, None, shape.seqlen, plen + shape.seqlen, device=device)
    flex = _compiled("flex_attention", flex_attention)
    g = shape.groups

    def fwd(q, k, v, pk, pv):
        kc, vc = concat_kv(k, v, pk, pv)
        return flex(q, kc, vc, block_mask=block_mask, enable_gqa=g > 1)

    return [Method("concat_flex", fwd, "cat + compiled FlexAttention, prefix+causal block mask")]


def _prefix_and_merge(q, prefix_k, prefix_v, out_seq, lse_seq, scale: float):
    """Attention of q over the prefix by two matmuls, merged with the sequence part by log-sum-exp."""
    b, hq, s, d = q.shape
    hkv = prefix_k.shape[0]
    qg = q.reshape(b, hkv, (hq // hkv) * s, d)  # GQA: the query heads of one KV head share its prefix
    scores = torch.matmul(qg, prefix_k.transpose(-1, -2)).float() * scale
    lse_pre = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse_pre[..., None]).to(q.dtype)
    out_pre = torch.matmul(probs, prefix_v).reshape(b, hq, s, d)
    lse_pre = lse_pre.reshape(b, hq, s)
    lse_seq = lse_seq.reshape(b, hq, s).float()
    top = torch.maximum(lse_seq, lse_pre)
    w_seq, w_pre = torch.exp(lse_seq - top), torch.exp(lse_pre - top)
    out = (out_seq.float() * w_seq[..., None] + out_pre.float() * w_pre[..., None]) / (w_seq + w_pre)[..., None]
    return out.to(q.dtype)


def build_split_merge(shape: Shape, plen: int, device) -> list[Method]:
    aten = torch.ops.aten
    scale = 1.0 / math.sqrt(shape.head_dim)
    merge = _compiled("prefix_and_merge", _prefix_and_merge)
    g = shape.groups

    def cudnn(q, k, v):
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[:2]

    def cudnn_repeated(q, k, v):
        return cudnn(q, repeat_kv(k, g), repeat_kv(v, g))

    def flash(q, k, v):
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]

    def make(seq):
        def fwd(q, k, v, pk, pv):
            out_seq, lse_seq = seq(q, k, v)
            return merge(q, pk, pv, out_seq, lse_seq, scale)

        return fwd

    note = "cuDNN causal (lse) + prefix matmuls + compiled lse merge"
    # Without a copy first; repeating K/V for GQA (a copy inside the timing) only if neither kernel takes GQA.
    methods = [
        Method("split_merge", make(cudnn), note, backward=False),
        Method("split_merge", make(flash), note.replace("cuDNN", "flash"), backward=False),
    ]
    if g > 1:
        methods.append(Method("split_merge", make(cudnn_repeated), note + ", repeat_kv", backward=False))
    return methods


def build_floor(shape: Shape, device) -> list[Method]:
    """No prefix: the fastest causal attention PyTorch has (cuDNN on Hopper); the prefix args are ignored."""
    g = shape.groups
    if not timing.is_cuda(device):
        return [
            Method(
                "floor",
                lambda q, k, v, pk, pv: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=g > 1),
                "SDPA(default backend) causal, no prefix",
            )
        ]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(backend, repeat):
        def fwd(q, k, v, pk, pv):
            if repeat:
                k, v = repeat_kv(k, g), repeat_kv(v, g)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=(g > 1 and not repeat))

        return fwd

    # GQA: a kernel that takes it natively before one that needs K/V repeated (a copy that would flatter
    # every target scaled from this floor).
    methods = [
        Method(
            "floor",
            with_backend(SDPBackend.CUDNN_ATTENTION, False),
            "SDPA(cuDNN) causal, no prefix" + (", enable_gqa" if g > 1 else ""),
        )
    ]
    if g > 1:
        methods.append(
            Method(
                "floor", with_backend(SDPBackend.FLASH_ATTENTION, False), "SDPA(flash) causal, no prefix, enable_gqa"
            )
        )
        methods.append(
            Method("floor", with_backend(SDPBackend.CUDNN_ATTENTION, True), "SDPA(cuDNN) causal, no prefix, repeat_kv")
        )
    return methods


def _prefixattn_method(name: str, *, forward: bool = True, note_suffix: str = "", **op_kwargs) -> list[Method]:
    """prefixattn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, **op_kwargs) as a Method."""
    import prefixattn

    def fwd(q, k, v, pk, pv):
        return prefixattn.prefix_attention(q, k, v, pk, pv, causal=True, **op_kwargs)

    args = ", ".join(f"{k}={v!r}" for k, v in op_kwargs.items())
    return [Method(name, fwd, f"prefixattn.prefix_attention({args}){note_suffix}", forward=forward)]


def build_prefixattn(backend: str) -> list[Method]:
    return _prefixattn_method("prefixattn", backend=backend)


def build_prefixattn_fast(backend: str) -> list[Method]:
    # fwd+bwd only: the forward is the same as prefixattn's
    return _prefixattn_method("prefixattn_fast", forward=False, backend=backend, deterministic=False)


def build_prefixattn_sdpa(example: InputSet) -> list[Method]:
    """The note records which vendor kernel ran the sequence part (cuDNN is the point; flash is slower)."""
    from prefixattn.kernels import sdpa_backend

    kernel = sdpa_backend.sequence_kernel_for(example.q, example.k, example.v, True, needs_grad=True)
    return _prefixattn_method(
        "prefixattn_sdpa", note_suffix=f"; sequence kernel: {kernel}", backend="sdpa", deterministic=False
    )


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class InputSet:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    pk: torch.Tensor | None = None
    pv: torch.Tensor | None = None

    def args(self):
        return self.q, self.k, self.v, self.pk, self.pv

    def leaves(self):
        return [t for t in self.args() if t is not None]


def make_sets(shape: Shape, n: int, device, dtype) -> list[InputSet]:
    """Random (never zero) inputs; all leaves require grad, fwd-only timing runs under no_grad."""
    b, hq, hkv, s, d = shape.batch, shape.heads_q, shape.heads_kv, shape.seqlen, shape.head_dim

    def rnd(*size):
        return torch.randn(*size, device=device, dtype=dtype).requires_grad_(True)

    return [
        InputSet(
            rnd(b, hq, s, d), rnd(b, hkv, s, d), rnd(b, hkv, s, d), torch.randn(b, hq, s, d, device=device, dtype=dtype)
        )
        for _ in range(n)
    ]


def set_prefix(sets: list[InputSet], shape: Shape, plen: int, device, dtype) -> None:
    for st in sets:
        st.pk = torch.randn(shape.heads_kv, plen, shape.head_dim, device=device, dtype=dtype).requires_grad_(True)
        st.pv = torch.randn(shape.heads_kv, plen, shape.head_dim, device=device, dtype=dtype).requires_grad_(True)


def fwd_closure(method: Method, st: InputSet) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            method.fwd(*st.args())

    return run


def fwdbwd_closure(method: Method, st: InputSet) -> Callable[[], None]:
    leaves = st.leaves()

    def run():
        out = method.fwd(*st.args())
        torch.autograd.grad(out, leaves, st.grad_out)

    return run


def outputs(method: Method, st: InputSet, backward: bool):
    """(out, grads) of one call, for the correctness check."""
    if not backward:
        with torch.no_grad():
            return method.fwd(*st.args()), None
    leaves = st.leaves()
    out = method.fwd(*st.args())
    grads = torch.autograd.grad(out, leaves, st.grad_out)
    return out.detach(), [g.detach() for g in grads]


# ---------------------------------------------------------------------------------------------- the run


class Bench(timing.BenchRun):
    def __init__(self, args, device, dtype, writer: ResultWriter, deadline: Deadline, progress: Progress):
        super().__init__(writer, deadline, progress)
        self.args, self.device, self.dtype = args, device, dtype
        self.smoke = args.smoke

    # -- bookkeeping

    def timer(self, fns):
        if self.smoke:
            return timing.time_fns(fns, self.device, warmup_ms=1, rep_ms=5, min_reps=3)
        return timing.time_fns(fns, self.device, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms)

    # -- one method at one (shape, P)
    def pick(self, candidates: list[Method], st: InputSet, ref, backward: bool, **where):
        """The first candidate that runs and agrees with the reference output (if one is given)."""
        tried = []
        for i, m in enumerate(candidates):
            last = i == len(candidates) - 1
            try:
                out, grads = outputs(m, st, backward and m.backward)
            except Exception as exc:  # noqa: BLE001 - try the forward alone, then the next variant
                if timing.is_fatal_cuda_error(exc):
                    self.fail(exc, method=m.name, **where)
                tried.append(f"{m.note}: {error_text(exc, 200)}")
                if not (backward and m.backward):
                    continue
                try:  # a forward that works is still worth timing when only the backward fails
                    out, grads = outputs(m, st, False)
                except Exception as exc2:  # noqa: BLE001
                    if timing.is_fatal_cuda_error(exc2):
                        self.fail(exc2, method=m.name, **where)
                    continue
                self.record(kind="error", mode="fwdbwd", error="backward failed: " + error_text(exc), **where)
                m = Method(m.name, m.fwd, m.note + " (backward failed)", backward=False)
            check = None
            if ref is not None:
                ref_out, ref_grads = ref
                check = dict(out_rel_err=rel_err(out, ref_out))
                if grads is not None and ref_grads is not None:
                    names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")
                    check.update({f"{n}_rel_err": rel_err(a, b) for n, a, b in zip(names, grads, ref_grads)})
                worst = max(v for v in check.values())
                check["ok"] = bool(worst <= CHECK_TOL)  # nan compares False
                if not check["ok"] and not last:
                    tried.append(f"{m.note}: disagrees with the reference (max rel err {worst:.3g})")
                    continue
            return m, check, tried
        return None, None, tried

    def run_method(
        self, shape: Shape, plen: int, candidates: list[Method], sets: list[InputSet], ref, flops_fwd: float
    ) -> dict | None:
        name = candidates[0].name if candidates else "?"
        where = dict(shape=shape.name, P=plen, method=name)
        if self.out_of_time(f"{shape.name} P={plen} {name}"):
            return None
        method, check, tried = self.pick(candidates, sets[0], ref, backward=True, **where)
        if method is None:
            self.record(kind="error", error="no variant ran: " + " | ".join(tried), **where)
            self.progress.note(f"{shape.name} P={plen} {name}: unavailable ({tried[-1][:160] if tried else ''})")
            return None
        if check is not None:
            self.record(kind="attention_check", **where, note=method.note, tolerance=CHECK_TOL, **check)
        base = dict(
            kind="attention",
            shape=shape.name,
            B=shape.batch,
            Hq=shape.heads_q,
            Hkv=shape.heads_kv,
            S=shape.seqlen,
            D=shape.head_dim,
            P=plen,
            method=name,
            note=method.note,
            dtype=str(self.dtype).replace("torch.", ""),
            correct=None if check is None else check["ok"],
            fallbacks=tried or None,
        )
        results = {}
        modes = [("fwd", fwd_closure, 1.0)] if method.forward else []
        if method.backward:
            modes.append(("fwdbwd", fwdbwd_closure, timing.FWD_BWD_FLOP_FACTOR))
        for mode, closure, factor in modes:
            if self.out_of_time(f"{shape.name} P={plen} {name} {mode}"):
                break
            try:
                fns = [closure(method, st) for st in sets]
                t = self.timer(fns)
                peak = timing.peak_extra_bytes(fns[0], self.device)
            except Exception as exc:  # noqa: BLE001 - record and go on with the next method
                self.fail(exc, mode=mode, **where)
                continue
            rec = dict(
                base,
                mode=mode,
                **t,
                TFLOPs=factor * flops_fwd / (t["ms"] * 1e-3) / 1e12,
                peak_extra_MB=None if peak is None else peak / 2**20,
                anchor_ms=None
                if shape.name != "main" or self.smoke
                else report.ATTENTION_ANCHORS.get((name, plen, mode)),
            )
            self.record(**rec)
            results[mode] = rec
            flag = "" if rec["correct"] in (None, True) else "  WRONG"
            rate = "" if self.smoke else f", {rec['TFLOPs']:.0f} TFLOP/s"  # a CPU dry run judges nothing
            self.progress(f"{shape.name} P={plen} {name} {mode}: {t['ms']:.3f} ms{rate}{flag}")
        return results

    # -- phases
    def ceilings(self) -> None:
        if not timing.is_cuda(self.device):
            return
        for measure in (timing.measure_gemm_ceiling, timing.measure_copy_ceiling):
            try:
                rec = self.record(**measure(self.device))
                self.progress(
                    f"ceiling {rec['what']}: "
                    + (f"{rec['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in rec else f"{rec['TBps']:.2f} TB/s")
                )
            except Exception as exc:  # noqa: BLE001
                self.fail(exc, phase="ceiling")

    def shape_phase(self, shape: Shape, prefix_lens, methods: tuple) -> None:
        dev, dt = self.device, self.dtype
        if self.out_of_time(shape.name):
            return
        # q, grad_out [B, Hq, S, D] and k, v [B, Hkv, S, D]; on the CPU rotation only costs time
        per_set = 2 * (shape.heads_q + shape.heads_kv) * shape.batch * shape.seqlen * shape.head_dim * dt.itemsize
        n_sets = timing.rotation_sets(per_set, dev, memory_cap=4e9) if timing.is_cuda(dev) else 2
        sets = make_sets(shape, n_sets, dev, dt)
        self.progress.note(f"{shape.name}: {shape.describe()} {str(dt)[6:]}, {n_sets} input sets")
        if "floor" in methods:
            flops0 = timing.attention_flops(shape.batch, shape.heads_q, shape.seqlen, shape.seqlen, 0, shape.head_dim)
            g = shape.groups
            plain = Method(
                "reference",
                lambda q, k, v, pk, pv: F.scaled_dot_product_attention(
                    q, repeat_kv(k, g), repeat_kv(v, g), is_causal=True
                ),
                "SDPA(default) causal, repeat_kv",
            )
            try:  # the floor's own check: the default SDPA path on the same inputs
                ref0 = outputs(plain, sets[0], backward=True)
            except Exception as exc:  # noqa: BLE001
                self.fail(exc, shape=shape.name, P=0, method="floor", mode="reference")
                ref0 = None
            self.run_method(shape, 0, build_floor(shape, dev), sets, ref0, flops0)
            del ref0
        for plen in prefix_lens:
            if self.out_of_time(f"{shape.name} P={plen}"):
                return
            set_prefix(sets, shape, plen, dev, dt)
            flops = timing.attention_flops(shape.batch, shape.heads_q, shape.seqlen, shape.seqlen, plen, shape.head_dim)
            try:  # the reference every method is checked against: concat + SDPA with a mask
                concat = build_concat_mask(shape, plen, dev)
                ref = outputs(concat[0], sets[0], backward=True)
            except Exception as exc:  # noqa: BLE001
                self.fail(exc, shape=shape.name, P=plen, method="concat_mask", mode="reference")
                ref, concat = None, None
            builders = dict(
                prefixattn=lambda: build_prefixattn(self.args.backend),
                prefixattn_fast=lambda: build_prefixattn_fast(self.args.backend),
                prefixattn_sdpa=lambda: build_prefixattn_sdpa(sets[0]),  # noqa: F821 (deleted after use to free device memory)
                concat_mask=lambda: concat,
                concat_lowerright=lambda: build_concat_lowerright(shape, plen, dev),
                split_merge=lambda: build_split_merge(shape, plen, dev),
                concat_flex=lambda: build_concat_flex(shape, plen, dev),
            )
            for name in (
                "prefixattn",
                "prefixattn_fast",
                "prefixattn_sdpa",
                "concat_mask",
                "concat_lowerright",
                "split_merge",
                "concat_flex",
            ):
                if name not in methods:
                    continue
                try:
                    candidates = builders[name]()
                except Exception as exc:  # noqa: BLE001 - e.g. an API missing from this torch
                    self.fail(exc, shape=shape.name, P=plen, method=name, mode="build")
                    continue
                if candidates:
                    self.run_method(shape, plen, candidates, sets, ref, flops)
            del ref
            if timing.is_cuda(dev):
                torch.cuda.empty_cache()
        del sets

    def run(self, phases) -> None:
        shapes = SMOKE_SHAPES if self.smoke else GPU_SHAPES
        all_p = SMOKE_PREFIX_LENS if self.smoke else PREFIX_LENS
        methods = ["prefixattn", "concat_mask", "floor"]
        if timing.is_cuda(self.device):
            methods += ["concat_lowerright", "split_merge", "prefixattn_sdpa"]
            if self.args.backend == "triton":  # the only backend with a non-deterministic backward
                methods.append("prefixattn_fast")
        elif kernels.triton_interpreting():
            methods.append("prefixattn_sdpa")
        if self.args.methods:  # a targeted rerun; concat_mask stays: it is what every method is checked against
            keep = set(self.args.methods.split(",")) | {"concat_mask"}
            methods = [m for m in methods if m in keep]
        if "ceiling" in phases:
            self.ceilings()
        for name in ("main", "gqa", "d64"):
            if name not in phases:
                continue
            plens = all_p
            shape_methods = tuple(methods)
            if self.args.quick and name != "main":  # quick: one prefix length and no compile on side shapes
                plens = (all_p[1],)
                shape_methods = tuple(m for m in methods if m != "split_merge")
            self.shape_phase(shapes[name], plens, shape_methods)
        if "flex" in phases and timing.is_cuda(self.device) and not self.args.skip_flex:
            plens = all_p if self.args.flex_all_p else (128,)
            self.shape_phase(shapes["main"], plens, ("concat_flex",))


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="prefixattn bench attention",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--quick", action="store_true", help="gqa/d64 at P=128 only, no split+merge there")
    p.add_argument("--skip-flex", action="store_true", help="skip the FlexAttention phase (slow to compile)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma list: time only these methods (concat_mask, the "
        "reference of the checks, always runs), e.g. prefixattn,prefixattn_sdpa,floor",
    )
    p.add_argument("--flex-all-p", action="store_true", help="FlexAttention at every P, not just 128")
    p.add_argument("--backend", default=None, help="prefixattn backend (default: triton on CUDA, torch on CPU)")
    p.add_argument(
        "--out",
        default=None,
        help=(
            "output directory (default: benchmarks/results; with --smoke a temporary directory, "
            "so CPU numbers never overwrite GPU results)"
        ),
    )
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a CPU dry run: tiny shapes, float32, backend torch; shows that it runs, judges nothing",
    )
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


# H200 guesses, compile included: Triton kernels ~20 s on first use, each torch.compile of the merge ~5-10 s.
ESTIMATES = dict(ceiling=3, main=55, gqa=45, d64=45, flex=60)
QUICK_ESTIMATES = dict(ceiling=3, main=55, gqa=15, d64=15, flex=60)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, phases = timing.device_and_phases(args, PHASES)
    if device is None:
        return 2
    args.backend = args.backend or ("torch" if device.type == "cpu" else "triton")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.skip_flex and "flex" in phases:
        phases.remove("flex")
    est = QUICK_ESTIMATES if args.quick else ESTIMATES
    if args.smoke:
        print(f"[attention] {report.DRY_RUN_NOTE}", file=sys.stderr, flush=True)
    else:
        timing.print_estimates("attention", {p: est[p] for p in phases})
    out_dir = timing.results_dir(args.out, args.smoke)
    writer = ResultWriter(out_dir / "attention.json", timing.environment(device, argv))
    bench = Bench(args, device, dtype, writer, Deadline(args.budget_s), Progress("attention"))
    timing.run_phases(bench, phases, 1 if device.type == "cpu" else None)  # tiny CPU shapes: threads add noise
    return timing.finish_run(
        "attention", writer, out_dir, report.attention_targets, report.attention_table, report.attention_plot
    )


if __name__ == "__main__":
    sys.exit(main())
