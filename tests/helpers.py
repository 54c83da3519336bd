"""Shared test helpers: random problems and the relative-error measure of docs/design.md, "Tolerances"."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# ||out - ref|| / ||ref|| against the float64 reference (docs/design.md, "Tolerances").
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; -inf entries (empty rows' lse) must match exactly and are excluded."""
    out, ref = out.double(), ref.double()
    inf_ref, inf_out = torch.isinf(ref), torch.isinf(out)
    if not torch.equal(inf_ref, inf_out) or not torch.equal(ref[inf_ref], out[inf_out]):
        return float("inf")
    if torch.isnan(out).any():
        return float("nan")
    out, ref = out[~inf_ref], ref[~inf_ref]
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


@dataclass
class Case:
    """One random prefix-attention problem. Tensors are built by make()."""

    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    seqlen_q: int = 9
    seqlen_k: int = 9
    head_dim: int = 32
    prefix_len: int = 5
    pool: int = 0  # 0: shared [Hkv, P, D]; N > 0: pool [N, Hkv, P, D] with prefix_index
    causal: bool = True
    padding: str | None = None  # None | "left" | "right" | "random"
    lengths: bool = False  # pool entries with random valid lengths
    noncontiguous: bool = False
    extra: dict = field(default_factory=dict)

    def make(self, dtype=torch.float64, device="cpu", requires_grad=True, generator=None):
        g = generator
        B, Hq, Hkv, Sq, Sk, D, P = (
            self.batch,
            self.heads_q,
            self.heads_kv,
            self.seqlen_q,
            self.seqlen_k,
            self.head_dim,
            self.prefix_len,
        )

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

        if self.noncontiguous:  # the layout transformers passes: [B, S, H, D] memory viewed as [B, H, S, D]
            q = rnd(B, Sq, Hq, D).transpose(1, 2)
            k = rnd(B, Sk, Hkv, D).transpose(1, 2)
            v = rnd(B, Sk, Hkv, D).transpose(1, 2)
        else:
            q, k, v = rnd(B, Hq, Sq, D), rnd(B, Hkv, Sk, D), rnd(B, Hkv, Sk, D)
        args = dict(causal=self.causal)
        pk = pv = None
        if P or self.pool:
            shape = (self.pool, Hkv, P, D) if self.pool else (Hkv, P, D)
            pk, pv = rnd(*shape), rnd(*shape)
            if self.pool:
                idx = torch.randint(-1, self.pool, (B,), generator=g)
                if B > 1:
                    idx[0] = 0  # at least one sequence uses an entry
                args["prefix_index"] = idx.to(device)
                if self.lengths:
                    args["prefix_lengths"] = torch.randint(0, P + 1, (self.pool,), generator=g).to(device)
        if self.padding:
            lens = torch.randint(0, Sk + 1, (B,), generator=g)
            pos = torch.arange(Sk)
            if self.padding == "right":
                mask = pos[None, :] < lens[:, None]
            elif self.padding == "left":
                mask = pos[None, :] >= (Sk - lens)[:, None]
            else:
                mask = torch.rand(B, Sk, generator=g) > 0.3
            args["key_padding_mask"] = mask.to(device)
        tensors = [q, k, v, pk, pv]
        if requires_grad:
            for t in tensors:
                if t is not None:
                    t.requires_grad_(True)
        args.update(self.extra)
        return tensors, args


def grads_of(out, tensors, grad_out):
    """Gradients of <out, grad_out> with respect to the non-None tensors (None where a tensor is None)."""
    live = [t for t in tensors if t is not None]
    gs = torch.autograd.grad(out, live, grad_out, allow_unused=True)
    it = iter(gs)
    return [next(it) if t is not None else None for t in tensors]
