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


def make_paged(
    batch=3,
    heads_q=4,
    heads_kv=2,
    seqlen_q=1,
    head_dim=16,
    page_size=5,
    max_pages=6,
    num_pages=None,
    seq_lens=None,
    prefix_len=0,
    pool=0,
    lengths=False,
    interleaved=False,
    noncontiguous_q=False,
    device="cpu",
    seed=0,
):
    """A random paged problem in float64 on `device`: pages handed out in a shuffled order, unused table
    slots -1. Drawn on the device itself, so GPU tests do not spend their time generating on the host."""
    g = torch.Generator(device=device).manual_seed(seed)
    num_pages = num_pages or batch * max_pages + 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, device=device)

    if noncontiguous_q:
        q = rnd(batch, seqlen_q, heads_q, head_dim).transpose(1, 2)
    else:
        q = rnd(batch, heads_q, seqlen_q, head_dim)
    if interleaved:  # engines often keep K and V in one tensor: [num_pages, page_size, 2, Hkv, D]
        kv = rnd(num_pages, page_size, 2, heads_kv, head_dim)
        k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    else:
        k_cache, v_cache = rnd(num_pages, page_size, heads_kv, head_dim), rnd(num_pages, page_size, heads_kv, head_dim)
    capacity = max_pages * page_size
    if seq_lens is None:
        seq_lens = torch.randint(1, capacity + 1, (batch,), generator=g, device=device)
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32, device=device)
    perm = torch.randperm(num_pages, generator=g, device=device)[: batch * max_pages].view(batch, max_pages)
    used = torch.arange(max_pages, device=device)[None, :] < ((seq_lens.long() + page_size - 1) // page_size)[:, None]
    block_table = torch.where(used, perm, torch.full_like(perm, -1)).to(torch.int32)
    kw = {}
    pk = pv = None
    if prefix_len or pool:
        shape = (pool, heads_kv, prefix_len, head_dim) if pool else (heads_kv, prefix_len, head_dim)
        pk, pv = rnd(*shape), rnd(*shape)
        if pool:
            idx = torch.randint(-1, pool, (batch,), generator=g, device=device)
            idx[0] = 0
            kw["prefix_index"] = idx
            if lengths:
                kw["prefix_lengths"] = torch.randint(0, prefix_len + 1, (pool,), generator=g, device=device)
    return (q, k_cache, v_cache, block_table, seq_lens, pk, pv), kw
