"""The GPU attention backend's glue, run on the CPU: vLLM's FlashAttention kernel is replaced by a plain PyTorch
stand-in over the same paged cache that returns (out, lse [Hq, T]) as FlashAttention does; everything else is
the backend's own code (cache views, token index from query_start_loc, lse layout, pool layer lookup, the fold,
padding tokens, the paged-decode switch). The result must equal prefixattn's reference over
[prefix; sequence] per request. What this cannot check (the real kernel's LSE, CUDA graphs) is in
benchmarks/gpu_next.sh.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from prefixattn.reference import prefix_attention_reference

HQ, HKV, D, BLOCK, LAYERS, POOL, P = 4, 2, 16, 4, 2, 3, 5


def fake_flash_attn_varlen_func(*, q, k, v, out, cu_seqlens_q, seqused_k, block_table, softmax_scale, causal,
                                return_softmax_lse, **_):  # fmt: skip
    """FlashAttention's paged varlen forward in PyTorch: k/v [blocks, block_size, Hkv, D] views of the cache."""
    assert causal and return_softmax_lse
    # [Hq, T] like FlashAttention (which returns float32; float64 here so the check can be exact)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for r in range(cu_seqlens_q.shape[0] - 1):
        start, end, keys = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1]), int(seqused_k[r])
        if end == start:
            continue
        pages = block_table[r, : math.ceil(keys / k.shape[1])]
        kk = k[pages].reshape(-1, HKV, D)[:keys].transpose(0, 1)[None]
        vv = v[pages].reshape(-1, HKV, D)[:keys].transpose(0, 1)[None]
        o, l_ = prefix_attention_reference(
            q[start:end].transpose(0, 1)[None], kk, vv, causal=True, softmax_scale=softmax_scale, return_lse=True
        )
        out[start:end] = o[0].transpose(0, 1)
        lse[:, start:end] = l_[0]
    return out, lse


class FakePool:
    def __init__(self, g):
        self.k = torch.randn(LAYERS, POOL, HKV, P, D, generator=g, dtype=torch.float64)
        self.v = torch.randn(LAYERS, POOL, HKV, P, D, generator=g, dtype=torch.float64)
        self.lengths = torch.tensor([[5, 0, 3], [2, 5, 5]], dtype=torch.int32)
        self.names = ["a", "b", "c"]

    def layer(self, i):
        return self.k[i], self.v[i], self.lengths[i]

    def index(self, name):
        return self.names.index(name)


@pytest.fixture
def backend(monkeypatch):
    from vllm.v1.attention.backends import flash_attn as fa

    from prefixattn.vllm_plugin import gpu_backend

    g = torch.Generator().manual_seed(0)
    pool = FakePool(g)
    rows = torch.full((8,), -1, dtype=torch.int32)
    pool_mod = types.ModuleType("prefixattn.vllm_plugin.pool")
    pool_mod.ensure_pool = lambda config: pool
    pool_mod.current_pool = lambda: pool
    pool_mod.layer_index = lambda name: int(name.split(".")[2])
    router_mod = types.ModuleType("prefixattn.vllm_plugin.router")
    router_mod.request_prefix_index = lambda n: rows[:n]
    monkeypatch.setitem(sys.modules, "prefixattn.vllm_plugin.pool", pool_mod)
    monkeypatch.setitem(sys.modules, "prefixattn.vllm_plugin.router", router_mod)
    monkeypatch.setattr(fa, "flash_attn_varlen_func", fake_flash_attn_varlen_func, raising=False)
    monkeypatch.setattr(gpu_backend, "_CLASSES", None)
    config = types.SimpleNamespace(  # the fields the impl's construction reads
        use_v2_model_runner=False, parallel_config=types.SimpleNamespace(decode_context_parallel_size=1)
    )
    monkeypatch.setattr("vllm.config.get_current_vllm_config_or_none", lambda: config)
    impl = gpu_backend.PrefixFlashAttentionImpl(HQ, D, 0.3, HKV, None, None, "auto")
    yield impl, pool, rows, g
    monkeypatch.setattr(gpu_backend, "_CLASSES", None)


def run_step(impl, pool, rows, g, seqs, layer=1, padded_tokens=3, also=None):
    """seqs: (new tokens, cached tokens before them, pool entry). Builds vLLM's paged cache, metadata and
    buffers (with CUDA-graph-style padding rows and tokens), runs the backend's forward and returns
    (its output for the real tokens, the reference's, the untouched padding). also=(impl, layer): a second
    layer run on the same step's metadata; then its (output, reference) pair is appended."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    num_blocks = 32
    kv_cache = torch.zeros(num_blocks, HKV, BLOCK, 2 * D, dtype=torch.float64)  # [blocks, Hkv, block, 2D]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    qs, expect, expect_also, qsl, seq_lens, tables = [], [], [], [0], [], []
    for n, ctx, entry in seqs:
        total = ctx + n
        pages = [perm.pop() for _ in range(math.ceil(total / BLOCK))]
        k = torch.randn(total, HKV, D, generator=g, dtype=torch.float64)
        v = torch.randn(total, HKV, D, generator=g, dtype=torch.float64)
        for t in range(total):
            key_cache[pages[t // BLOCK], t % BLOCK] = k[t]
            value_cache[pages[t // BLOCK], t % BLOCK] = v[t]
        q = torch.randn(n, HQ, D, generator=g, dtype=torch.float64)
        pk, pv, lens = pool.layer(layer)
        ref = prefix_attention_reference(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], pk, pv,
            prefix_index=torch.tensor([entry]), prefix_lengths=lens, causal=True, softmax_scale=0.3,
        )  # fmt: skip
        qs.append(q)
        expect.append(ref[0].transpose(0, 1))
        if also is not None:
            pk, pv, lens = pool.layer(also[1])
            ref = prefix_attention_reference(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], pk, pv,
                prefix_index=torch.tensor([entry]), prefix_lengths=lens, causal=True, softmax_scale=0.3,
            )  # fmt: skip
            expect_also.append(ref[0].transpose(0, 1))
        qsl.append(qsl[-1] + n)
        seq_lens.append(total)
        tables.append(pages + [0] * (8 - len(pages)))
    tokens = qsl[-1]
    # One padding row (no tokens) and padding tokens, as a CUDA graph's fixed batch size adds.
    qsl.append(qsl[-1])
    seq_lens.append(0)
    tables.append([0] * 8)
    rows[: len(seqs) + 1] = torch.tensor([s[2] for s in seqs] + [-1], dtype=torch.int32)
    query = torch.cat(qs + [torch.randn(padded_tokens, HQ, D, generator=g, dtype=torch.float64)])
    output = torch.full_like(query, 123.0)
    meta = FlashAttentionMetadata(
        num_actual_tokens=tokens,
        max_query_len=max(s[0] for s in seqs),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        max_seq_len=max(seq_lens),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(tokens, dtype=torch.int64),
    )

    def layer_module(i):
        return types.SimpleNamespace(
            layer_name=f"model.layers.{i}.self_attn.attn",
            _q_scale=torch.ones(1),
            _k_scale=torch.ones(1),
            _v_scale=torch.ones(1),
        )

    impl.forward(layer_module(layer), query, None, None, kv_cache, meta, output)
    result = (output[:tokens], torch.cat(expect), output[tokens:])
    if also is not None:
        shared = meta._prefixattn_token_index[1]
        other = torch.full_like(query, 123.0)
        also[0].forward(layer_module(also[1]), query, None, None, kv_cache, meta, other)
        assert meta._prefixattn_token_index[1] is shared  # computed once per step, reused by the next layer
        result += (other[:tokens], torch.cat(expect_also))
    return result


MIXED = [(1, 6, 0), (4, 0, -1), (3, 5, 2), (1, 9, 1), (5, 3, 0)]


def test_mixed_batch_equals_reference(backend):
    impl, pool, rows, g = backend
    got, want, pad = run_step(impl, pool, rows, g, MIXED)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.all(pad == 123.0)  # padding tokens are not written


def test_each_layer_uses_its_own_prefix(backend):
    """Two layers on one step's metadata: each folds its own layer of the pool, with one shared token index."""
    from prefixattn.vllm_plugin import gpu_backend

    impl, pool, rows, g = backend
    other = gpu_backend.PrefixFlashAttentionImpl(HQ, D, 0.3, HKV, None, None, "auto")
    got, want, _, got0, want0 = run_step(impl, pool, rows, g, MIXED, layer=1, also=(other, 0))
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.allclose(got0, want0, atol=1e-10, rtol=0)
    assert not torch.allclose(want, want0)  # the layers' prefixes differ, so this tells them apart


def test_paged_decode_switch_gives_the_same_result(backend, monkeypatch):
    from prefixattn.vllm_plugin import gpu_backend

    impl, pool, rows, g = backend
    decode = [(1, 6, 0), (1, 1, -1), (1, 9, 2), (1, 4, 1)]
    monkeypatch.setenv(gpu_backend.PAGED_DECODE_ENV, "1")
    got, want, pad = run_step(impl, pool, rows, g, decode)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.all(pad == 123.0)


def test_inactive_plugin_layers_are_plain_flash_attention(monkeypatch):
    """With no pool the impl is vLLM's own: forward goes straight to FlashAttentionImpl.forward."""
    from vllm.v1.attention.backends import flash_attn as fa

    from prefixattn.vllm_plugin import gpu_backend

    pool_mod = types.ModuleType("prefixattn.vllm_plugin.pool")
    pool_mod.ensure_pool = lambda config: None
    pool_mod.layer_index = lambda name: 0
    monkeypatch.setitem(sys.modules, "prefixattn.vllm_plugin.pool", pool_mod)
    monkeypatch.setattr(gpu_backend, "_CLASSES", None)
    calls = []
    monkeypatch.setattr(fa.FlashAttentionImpl, "forward", lambda self, *a, **k: calls.append(a) or "parent")
    impl = gpu_backend.PrefixFlashAttentionImpl(HQ, D, 0.3, HKV, None, None, "auto")
    assert impl.forward(None, None, None, None, None, object(), None) == "parent" and len(calls) == 1
    monkeypatch.setattr(gpu_backend, "_CLASSES", None)


def test_unsupported_settings_fail_at_construction(backend):
    from prefixattn.vllm_plugin import gpu_backend

    with pytest.raises(NotImplementedError, match="sliding-window"):
        gpu_backend.PrefixFlashAttentionImpl(HQ, D, 0.3, HKV, None, 16, "auto")
    with pytest.raises(ValueError, match="tensor parallelism"):  # a rank whose layers have 1 KV head
        gpu_backend.PrefixFlashAttentionImpl(2, D, 0.3, 1, None, None, "auto")


def test_model_runner_v2_wrapper_routes_rows_by_idx_mapping(monkeypatch):
    """mrv2.install_routing around Model Runner V2's methods (their vLLM bodies replaced by recorders): entries
    are admitted per request slot, and each step's rows follow that step's idx_mapping, padding -1."""
    from vllm.v1.worker.gpu import model_runner

    from prefixattn.vllm_plugin import mrv2

    cls = model_runner.GPUModelRunner
    calls = []

    def fake_init(self, vllm_config, device):
        self.max_num_reqs, self.req_states = 4, types.SimpleNamespace(req_id_to_index={})

    def fake_add(self, scheduler_output):
        for new in scheduler_output.scheduled_new_reqs:
            self.req_states.req_id_to_index[new.req_id] = new.slot

    for name, fn in (("__init__", fake_init), ("add_requests", fake_add),
                     ("prepare_attn", lambda self, batch: calls.append(batch) or "attn")):  # fmt: skip
        monkeypatch.setattr(cls, name, fn)
    monkeypatch.setattr(mrv2, "_INSTALLED", False)
    monkeypatch.setattr(mrv2, "_ROUTING", None)
    pool_mod = types.ModuleType("prefixattn.vllm_plugin.pool")
    pool_mod.current_pool = lambda: FakePool(torch.Generator().manual_seed(0))
    monkeypatch.setitem(sys.modules, "prefixattn.vllm_plugin.pool", pool_mod)

    mrv2.install_routing()
    runner = cls(None, "cpu")
    assert mrv2.active()

    def new(req_id, slot, prefix):
        return types.SimpleNamespace(req_id=req_id, slot=slot, sampling_params=types.SimpleNamespace(
            extra_args={"prefix": prefix} if prefix else None))  # fmt: skip

    runner.add_requests(types.SimpleNamespace(scheduled_new_reqs=[new("x", 2, "c"), new("y", 0, None)]))
    assert runner.prepare_attn(types.SimpleNamespace(idx_mapping=torch.tensor([0, 2]))) == "attn"
    assert mrv2.row_prefix_index(3).tolist() == [-1, 2, -1]
    runner.add_requests(types.SimpleNamespace(scheduled_new_reqs=[new("z", 0, "a")]))  # slot 0 reused
    runner.prepare_attn(types.SimpleNamespace(idx_mapping=torch.tensor([2, 0])))
    assert mrv2.row_prefix_index(4).tolist() == [2, 0, -1, -1] and len(calls) == 2
