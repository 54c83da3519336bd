"""prefixattn.PrefixAttention: the nn.Module for hand-written models."""

import pytest
import torch

from prefixattn import PrefixAttention, prefix_attention_reference


def _qkv(b=2, hq=4, hkv=2, s=7, d=16, dtype=torch.float32):
    q = torch.randn(b, s, hq, d, dtype=dtype).transpose(1, 2)  # the layout models produce
    k = torch.randn(b, s, hkv, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, dtype=dtype).transpose(1, 2)
    return q, k, v


def test_docstring_example_and_reference_equality():
    attn = PrefixAttention(num_kv_heads=2, head_dim=16, prefix_length=5)
    q, k, v = _qkv()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    out = attn(q, k, v, key_padding_mask=mask)
    ref = prefix_attention_reference(
        q.double(), k.double(), v.double(), attn.prefix_k.double(), attn.prefix_v.double(), key_padding_mask=mask
    )
    assert out.shape == (2, 4, 7, 16)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_owned_prefix_trains_and_is_cast_to_the_query_dtype():
    attn = PrefixAttention(2, 16, 3)
    q, k, v = _qkv(dtype=torch.float64)
    attn(q, k, v).sum().backward()
    assert attn.prefix_k.dtype == torch.float32
    assert attn.prefix_k.grad is not None and attn.prefix_k.grad.abs().max() > 0
    assert attn.prefix_v.grad is not None and attn.prefix_v.grad.abs().max() > 0


def test_pool_passed_at_call_time():
    attn = PrefixAttention(2, 16, 0, causal=False)
    assert attn.prefix_k is None
    q, k, v = _qkv(b=3)
    pool_k, pool_v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    idx = torch.tensor([1, -1, 0])
    out = attn(q, k, v, prefix=(pool_k, pool_v), prefix_index=idx, prefix_lengths=torch.tensor([4, 2]))
    for row, i in enumerate(idx.tolist()):
        pk = None if i < 0 else pool_k[i, :, : (4 if i == 0 else 2)]
        pv = None if i < 0 else pool_v[i, :, : (4 if i == 0 else 2)]
        alone = prefix_attention_reference(q[row : row + 1], k[row : row + 1], v[row : row + 1], pk, pv, causal=False)
        torch.testing.assert_close(out[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    no_prefix = attn(q, k, v)
    torch.testing.assert_close(no_prefix, prefix_attention_reference(q, k, v, causal=False), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prefix_length"):
        PrefixAttention(2, 16, -1)
    with pytest.raises(ValueError, match="head_dim"):
        PrefixAttention(2, 0, 3)
    with pytest.raises(ValueError, match="backend"):
        PrefixAttention(2, 16, 3, backend="fastest")
    attn = PrefixAttention(2, 16, 3)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="prefix_index"):
        attn(q, k, v, prefix_index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prefix_k"):  # the op names the argument and the expectation
        PrefixAttention(3, 16, 3)(q, k, v)
