"""Short-query (decode) Triton kernels. Placeholder until the decode kernels land."""


def handles(q, k, prefix_k, key_padding_mask, attn_bias, causal) -> bool:
    return False


def forward(*args, **kwargs):
    raise NotImplementedError("decode kernels are not implemented yet")
