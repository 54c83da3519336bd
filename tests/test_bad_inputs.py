"""Bad input never crashes deep inside: every argument of every public entry point, wrong in every way that
applies (type, dtype, device, shape, stride, range, non-finite value), raises ValueError or TypeError before any
work, with a message that names the argument.

Table-driven: each case is (id, call, expected exception, the argument's name). A "meta" tensor stands in for a
tensor on another device. Calls that need a model use one tiny Llama built from a config.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import prefixattn
from prefixattn import PrefixAttention, prefix_attention, prefix_attention_paged

B, HQ, HKV, SQ, SK, D, P, N = 2, 4, 2, 3, 5, 16, 4, 3
TYPE, VALUE, EITHER = TypeError, ValueError, (TypeError, ValueError)
MISSING = FileNotFoundError  # a checkpoint path that is not there: the OS error type, with the path named
NAN, INF = float("nan"), float("inf")


def _t(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, **kw).to(dtype) if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)


def _strided_last(*shape):
    """A tensor of this shape whose last dimension has stride 2."""
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]


META = "meta"


# --- prefix_attention ------------------------------------------------------------------------------------


def _op_args():
    return dict(
        q=_t(B, HQ, SQ, D),
        k=_t(B, HKV, SK, D),
        v=_t(B, HKV, SK, D),
        prefix_k=_t(N, HKV, P, D),
        prefix_v=_t(N, HKV, P, D),
        prefix_index=torch.tensor([0, -1]),
        prefix_lengths=torch.tensor([4, 2, 0]),
        key_padding_mask=torch.ones(B, SK, dtype=torch.bool),
        attn_bias=_t(1, HQ, SQ, SK),
    )


def _op(**over):
    args = _op_args()
    args.update(over)
    q, k, v, pk, pv = (args.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    return lambda: prefix_attention(q, k, v, pk, pv, **args)


OP_CASES = [
    # type
    ("q-list", _op(q=[[1.0]]), TYPE, "q"),
    ("q-none", _op(q=None), TYPE, "q"),
    ("k-ndarray", _op(k=_t(B, HKV, SK, D).numpy()), TYPE, "k"),
    ("v-none", _op(v=None), TYPE, "v"),
    ("prefix_k-list", _op(prefix_k=[1.0]), TYPE, "prefix_k"),
    ("prefix_v-missing", _op(prefix_v=None), VALUE, "prefix_v"),
    ("prefix_index-list", _op(prefix_index=[0, 1]), TYPE, "prefix_index"),
    ("prefix_lengths-list", _op(prefix_lengths=[1, 1, 1]), TYPE, "prefix_lengths"),
    ("key_padding_mask-list", _op(key_padding_mask=[[True] * SK] * B), TYPE, "key_padding_mask"),
    ("attn_bias-float", _op(attn_bias=0.5), TYPE, "attn_bias"),
    ("causal-str", _op(causal="yes"), TYPE, "causal"),
    ("causal-int", _op(causal=1), TYPE, "causal"),
    ("softmax_scale-str", _op(softmax_scale="0.1"), TYPE, "softmax_scale"),
    ("softmax_scale-tensor", _op(softmax_scale=torch.tensor(0.1)), TYPE, "softmax_scale"),
    ("softmax_scale-bool", _op(softmax_scale=True), TYPE, "softmax_scale"),
    ("return_lse-str", _op(return_lse="yes"), TYPE, "return_lse"),
    ("backend-int", _op(backend=1), VALUE, "backend"),
    ("backend-unknown", _op(backend="flash"), VALUE, "backend"),
    ("dropout_p-str", _op(dropout_p="0.1"), VALUE, "dropout_p"),
    ("deterministic-int", _op(deterministic=1), TYPE, "deterministic"),
    ("validate_values-str", _op(validate_values="yes"), TYPE, "validate_values"),
    # dtype
    ("q-int", _op(q=_t(B, HQ, SQ, D, dtype=torch.int32)), TYPE, "q"),
    ("k-fp64", _op(k=_t(B, HKV, SK, D, dtype=torch.float64)), TYPE, "k"),
    ("v-fp16", _op(v=_t(B, HKV, SK, D, dtype=torch.float16)), TYPE, "v"),
    ("prefix_k-fp16", _op(prefix_k=_t(N, HKV, P, D, dtype=torch.float16)), TYPE, "prefix_k"),
    ("prefix_v-bf16", _op(prefix_v=_t(N, HKV, P, D, dtype=torch.bfloat16)), TYPE, "prefix_v"),
    ("prefix_index-float", _op(prefix_index=torch.tensor([0.0, 1.0])), TYPE, "prefix_index"),
    ("prefix_lengths-bool", _op(prefix_lengths=torch.ones(N, dtype=torch.bool)), TYPE, "prefix_lengths"),
    ("key_padding_mask-int", _op(key_padding_mask=torch.ones(B, SK, dtype=torch.int64)), TYPE, "key_padding_mask"),
    ("attn_bias-int", _op(attn_bias=torch.zeros(1, HQ, SQ, SK, dtype=torch.int64)), TYPE, "attn_bias"),
    # device
    ("k-meta", _op(k=_t(B, HKV, SK, D, device=META)), VALUE, "k"),
    ("v-meta", _op(v=_t(B, HKV, SK, D, device=META)), VALUE, "v"),
    ("prefix_k-meta", _op(prefix_k=_t(N, HKV, P, D, device=META)), VALUE, "prefix_k"),
    ("prefix_v-meta", _op(prefix_v=_t(N, HKV, P, D, device=META)), VALUE, "prefix_v"),
    ("prefix_index-meta", _op(prefix_index=torch.zeros(B, dtype=torch.int64, device=META)), VALUE, "prefix_index"),
    (
        "prefix_lengths-meta",
        _op(prefix_lengths=torch.zeros(N, dtype=torch.int64, device=META)),
        VALUE,
        "prefix_lengths",
    ),
    (
        "key_padding_mask-meta",
        _op(key_padding_mask=torch.ones(B, SK, dtype=torch.bool, device=META)),
        VALUE,
        "key_padding_mask",
    ),
    ("attn_bias-meta", _op(attn_bias=_t(1, HQ, SQ, SK, device=META)), VALUE, "attn_bias"),
    # shape
    ("q-3d", _op(q=_t(HQ, SQ, D)), VALUE, "q"),
    ("q-no-heads", _op(q=_t(B, 0, SQ, D)), VALUE, "q"),
    ("q-heads-not-multiple", _op(q=_t(B, 3, SQ, D)), VALUE, "q"),
    ("q-longer-than-k-causal", _op(q=_t(B, HQ, SK + 1, D), attn_bias=None), VALUE, "q"),
    ("k-batch", _op(k=_t(B + 1, HKV, SK, D), v=_t(B + 1, HKV, SK, D)), VALUE, "k"),
    ("k-head-dim", _op(k=_t(B, HKV, SK, D + 1), v=_t(B, HKV, SK, D + 1)), VALUE, "k"),
    ("v-shape", _op(v=_t(B, HKV, SK + 1, D)), VALUE, "v"),
    (
        "prefix_k-2d",
        _op(prefix_k=_t(P, D), prefix_v=_t(P, D), prefix_index=None, prefix_lengths=None),
        VALUE,
        "prefix_k",
    ),
    ("prefix_k-heads", _op(prefix_k=_t(N, HKV + 1, P, D), prefix_v=_t(N, HKV + 1, P, D)), VALUE, "prefix_k"),
    ("prefix_v-shape", _op(prefix_v=_t(N, HKV, P + 1, D)), VALUE, "prefix_v"),
    (
        "prefix_k-empty-pool",
        _op(prefix_k=_t(0, HKV, P, D), prefix_v=_t(0, HKV, P, D), prefix_lengths=None),
        VALUE,
        "prefix_k",
    ),
    ("prefix_index-length", _op(prefix_index=torch.tensor([0, 0, 0])), VALUE, "prefix_index"),
    ("prefix_index-2d", _op(prefix_index=torch.zeros(B, 1, dtype=torch.int64)), VALUE, "prefix_index"),
    ("prefix_index-missing", _op(prefix_index=None), VALUE, "prefix_index"),
    ("prefix_index-without-pool", _op(prefix_k=_t(HKV, P, D), prefix_v=_t(HKV, P, D)), VALUE, "prefix_index"),
    ("prefix_lengths-length", _op(prefix_lengths=torch.tensor([1, 1])), VALUE, "prefix_lengths"),
    ("prefix_lengths-without-prefix", _op(prefix_k=None, prefix_v=None, prefix_index=None), VALUE, "prefix_lengths"),
    (
        "key_padding_mask-shape",
        _op(key_padding_mask=torch.ones(B, SK + 1, dtype=torch.bool)),
        VALUE,
        "key_padding_mask",
    ),
    ("key_padding_mask-3d", _op(key_padding_mask=torch.ones(B, 1, SK, dtype=torch.bool)), VALUE, "key_padding_mask"),
    ("attn_bias-shape", _op(attn_bias=_t(1, HQ, SQ, SK + 1)), VALUE, "attn_bias"),
    ("attn_bias-3d", _op(attn_bias=_t(HQ, SQ, SK)), VALUE, "attn_bias"),
    # stride
    ("q-strided", _op(q=_strided_last(B, HQ, SQ, D)), VALUE, "q"),
    ("k-strided", _op(k=_strided_last(B, HKV, SK, D)), VALUE, "k"),
    ("v-strided", _op(v=_strided_last(B, HKV, SK, D)), VALUE, "v"),
    ("prefix_k-strided", _op(prefix_k=_strided_last(N, HKV, P, D)), VALUE, "prefix_k"),
    ("prefix_v-strided", _op(prefix_v=_strided_last(N, HKV, P, D)), VALUE, "prefix_v"),
    # range and non-finite values
    ("prefix_index-above", _op(prefix_index=torch.tensor([0, N])), VALUE, "prefix_index"),
    ("prefix_index-below", _op(prefix_index=torch.tensor([-2, 0])), VALUE, "prefix_index"),
    ("prefix_lengths-above", _op(prefix_lengths=torch.tensor([P + 1, 0, 0])), VALUE, "prefix_lengths"),
    ("prefix_lengths-negative", _op(prefix_lengths=torch.tensor([-1, 0, 0])), VALUE, "prefix_lengths"),
    ("softmax_scale-nan", _op(softmax_scale=NAN), VALUE, "softmax_scale"),
    ("softmax_scale-inf", _op(softmax_scale=INF), VALUE, "softmax_scale"),
    ("softmax_scale-zero", _op(softmax_scale=0.0), VALUE, "softmax_scale"),
    ("softmax_scale-negative", _op(softmax_scale=-1.0), VALUE, "softmax_scale"),
    ("dropout_p-one", _op(dropout_p=1.0), VALUE, "dropout_p"),
    ("dropout_p-negative", _op(dropout_p=-0.1), VALUE, "dropout_p"),
    ("dropout_p-nan", _op(dropout_p=NAN), VALUE, "dropout_p"),
    ("dropout_p-on-kernel-backend", _op(dropout_p=0.1, backend="triton"), VALUE, "dropout_p"),
]


# --- prefix_attention_paged ------------------------------------------------------------------------------

PAGES, PAGE = 6, 4


def _paged(**over):
    args = dict(
        q=_t(B, HQ, 1, D),
        k_cache=_t(PAGES, PAGE, HKV, D),
        v_cache=_t(PAGES, PAGE, HKV, D),
        block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        seq_lens=torch.tensor([5, 8], dtype=torch.int32),
        prefix_k=_t(N, HKV, P, D),
        prefix_v=_t(N, HKV, P, D),
        prefix_index=torch.tensor([1, -1]),
        prefix_lengths=torch.tensor([4, 2, 0]),
    )
    args.update(over)
    pos = [args.pop(n) for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "prefix_k", "prefix_v")]
    return lambda: prefix_attention_paged(*pos, **args)


PAGED_CASES = [
    ("q-none", _paged(q=None), TYPE, "q"),
    ("q-int", _paged(q=_t(B, HQ, 1, D, dtype=torch.int32)), TYPE, "q"),
    ("q-too-long", _paged(q=_t(B, HQ, 17, D)), VALUE, "q"),
    ("q-strided", _paged(q=_strided_last(B, HQ, 1, D)), VALUE, "q"),
    ("q-heads-not-multiple", _paged(q=_t(B, 3, 1, D)), VALUE, "q"),
    ("k_cache-list", _paged(k_cache=[0.0]), TYPE, "k_cache"),
    ("k_cache-fp16", _paged(k_cache=_t(PAGES, PAGE, HKV, D, dtype=torch.float16)), TYPE, "k_cache"),
    ("k_cache-meta", _paged(k_cache=_t(PAGES, PAGE, HKV, D, device=META)), VALUE, "k_cache"),
    (
        "k_cache-head-dim",
        _paged(k_cache=_t(PAGES, PAGE, HKV, D + 1), v_cache=_t(PAGES, PAGE, HKV, D + 1)),
        VALUE,
        "k_cache",
    ),
    ("k_cache-no-pages", _paged(k_cache=_t(0, PAGE, HKV, D), v_cache=_t(0, PAGE, HKV, D)), VALUE, "k_cache"),
    ("k_cache-strided", _paged(k_cache=_strided_last(PAGES, PAGE, HKV, D)), VALUE, "k_cache"),
    ("v_cache-shape", _paged(v_cache=_t(PAGES + 1, PAGE, HKV, D)), VALUE, "v_cache"),
    ("v_cache-meta", _paged(v_cache=_t(PAGES, PAGE, HKV, D, device=META)), VALUE, "v_cache"),
    ("block_table-list", _paged(block_table=[[0, 1], [2, 3]]), TYPE, "block_table"),
    ("block_table-int64", _paged(block_table=torch.tensor([[0, 1], [2, 3]])), TYPE, "block_table"),
    ("block_table-meta", _paged(block_table=torch.zeros(B, 2, dtype=torch.int32, device=META)), VALUE, "block_table"),
    ("block_table-rows", _paged(block_table=torch.zeros(B + 1, 2, dtype=torch.int32)), VALUE, "block_table"),
    ("block_table-1d", _paged(block_table=torch.zeros(B, dtype=torch.int32)), VALUE, "block_table"),
    (
        "block_table-page-id",
        _paged(block_table=torch.tensor([[0, PAGES], [2, 3]], dtype=torch.int32)),
        VALUE,
        "block_table",
    ),
    (
        "block_table-negative",
        _paged(block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32)),
        VALUE,
        "block_table",
    ),
    ("seq_lens-float", _paged(seq_lens=torch.tensor([5.0, 8.0])), TYPE, "seq_lens"),
    ("seq_lens-meta", _paged(seq_lens=torch.zeros(B, dtype=torch.int32, device=META)), VALUE, "seq_lens"),
    ("seq_lens-shape", _paged(seq_lens=torch.zeros(B + 1, dtype=torch.int32)), VALUE, "seq_lens"),
    ("seq_lens-above", _paged(seq_lens=torch.tensor([5, 9], dtype=torch.int32)), VALUE, "seq_lens"),
    ("seq_lens-negative", _paged(seq_lens=torch.tensor([-1, 8], dtype=torch.int32)), VALUE, "seq_lens"),
    ("prefix_k-fp16", _paged(prefix_k=_t(N, HKV, P, D, dtype=torch.float16)), TYPE, "prefix_k"),
    ("prefix_k-heads", _paged(prefix_k=_t(N, 1, P, D), prefix_v=_t(N, 1, P, D)), VALUE, "prefix_k"),
    ("prefix_v-missing", _paged(prefix_v=None), VALUE, "prefix_v"),
    ("prefix_index-above", _paged(prefix_index=torch.tensor([N, 0])), VALUE, "prefix_index"),
    ("prefix_index-meta", _paged(prefix_index=torch.zeros(B, dtype=torch.int64, device=META)), VALUE, "prefix_index"),
    ("prefix_lengths-above", _paged(prefix_lengths=torch.tensor([P + 1, 0, 0])), VALUE, "prefix_lengths"),
    ("softmax_scale-nan", _paged(softmax_scale=NAN), VALUE, "softmax_scale"),
    ("softmax_scale-bool", _paged(softmax_scale=True), TYPE, "softmax_scale"),
    ("return_lse-str", _paged(return_lse="yes"), TYPE, "return_lse"),
    ("backend-unknown", _paged(backend="flash"), VALUE, "backend"),
    ("backend-sdpa", _paged(backend="sdpa"), VALUE, "backend"),
    ("validate_values-str", _paged(validate_values="no"), TYPE, "validate_values"),
]


# --- PrefixAttention --------------------------------------------------------------------------------------


def _module(**over):
    args = dict(num_kv_heads=HKV, head_dim=D, prefix_length=P)
    args.update(over)
    return lambda: PrefixAttention(**args)


def _module_forward(ctor=None, **over):
    def call():
        attn = PrefixAttention(HKV, D, P, **(ctor or {}))
        args = dict(q=_t(B, HQ, SQ, D), k=_t(B, HKV, SK, D), v=_t(B, HKV, SK, D))
        args.update(over)
        q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
        return attn(q, k, v, **args)

    return call


MODULE_CASES = [
    ("num_kv_heads-zero", _module(num_kv_heads=0), VALUE, "num_kv_heads"),
    ("num_kv_heads-float", _module(num_kv_heads=2.0), VALUE, "num_kv_heads"),
    ("head_dim-bool", _module(head_dim=True), VALUE, "head_dim"),
    ("prefix_length-negative", _module(prefix_length=-1), VALUE, "prefix_length"),
    ("causal-str", _module(causal="yes"), TYPE, "causal"),
    ("softmax_scale-nan", _module(softmax_scale=NAN), VALUE, "softmax_scale"),
    ("softmax_scale-str", _module(softmax_scale="1"), TYPE, "softmax_scale"),
    ("backend-unknown", _module(backend="flash"), VALUE, "backend"),
    ("init_std-nan", _module(init_std=NAN), VALUE, "init_std"),
    ("init_std-negative", _module(init_std=-1.0), VALUE, "init_std"),
    ("init_std-str", _module(init_std="1"), TYPE, "init_std"),
    ("dtype-int", _module(dtype=torch.int64), TYPE, "dtype"),
    ("dtype-str", _module(dtype="float32"), TYPE, "dtype"),
    ("deterministic-int", _module(deterministic=1), TYPE, "deterministic"),
    ("forward-q-list", _module_forward(q=[0.0]), TYPE, "q"),
    ("forward-q-int", _module_forward(q=_t(B, HQ, SQ, D, dtype=torch.int32)), TYPE, "q"),
    ("forward-k-meta", _module_forward(k=_t(B, HKV, SK, D, device=META)), VALUE, "k"),
    ("forward-v-shape", _module_forward(v=_t(B, HKV, SK + 1, D)), VALUE, "v"),
    ("forward-prefix-not-pair", _module_forward(prefix=_t(HKV, P, D)), TYPE, "prefix"),
    ("forward-prefix-lists", _module_forward(prefix=([0.0], [0.0])), TYPE, "prefix"),
    ("forward-prefix_index-own-prefix", _module_forward(prefix_index=torch.tensor([0, 0])), VALUE, "prefix_index"),
    ("forward-prefix_lengths-shape", _module_forward(prefix_lengths=torch.tensor([1, 1])), VALUE, "prefix_lengths"),
    ("forward-key_padding_mask-dtype", _module_forward(key_padding_mask=torch.ones(B, SK)), TYPE, "key_padding_mask"),
    ("forward-attn_bias-shape", _module_forward(attn_bias=_t(B, HQ, SQ, 1, 2)), VALUE, "attn_bias"),
    ("forward-causal-str", _module_forward(causal="no"), TYPE, "causal"),
    ("forward-dropout_p-nan", _module_forward(dropout_p=NAN), VALUE, "dropout_p"),
]

TENSOR_CASES = OP_CASES + PAGED_CASES + MODULE_CASES


@pytest.mark.parametrize(
    "call, exc, name",
    [c[1:] for c in TENSOR_CASES],
    ids=[
        f"{kind}-{c[0]}"
        for kind, cases in (("op", OP_CASES), ("paged", PAGED_CASES), ("module", MODULE_CASES))
        for c in cases
    ],
)
def test_bad_argument_is_named(call, exc, name):
    with pytest.raises(exc) as info:
        call()
    assert name in str(info.value), f"the message does not name {name!r}: {info.value}"


def test_every_argument_of_the_ops_has_a_case():
    """The table covers every parameter of the public tensor entry points (a new argument needs a case)."""
    import inspect

    for fn, cases, skip in (
        (prefix_attention, OP_CASES, set()),
        (prefix_attention_paged, PAGED_CASES, set()),
        (PrefixAttention.__init__, MODULE_CASES, {"self", "device"}),
        (PrefixAttention.forward, MODULE_CASES, {"self"}),
    ):
        named = {c[3] for c in cases}
        params = set(inspect.signature(fn).parameters) - skip
        assert params <= named, f"{fn.__qualname__}: no bad-input case for {sorted(params - named)}"


# --- the transformers entry points --------------------------------------------------------------------------


def _tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    m = prefixattn.init(_tiny_llama(), backend="torch")
    m.add_adapter("good", {"prefix_length": 4}, set_active=True)
    return m


def _write(path, files: dict):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


HF_CASES = [
    # prefixattn.init
    ("init-model-module", lambda m, tmp: prefixattn.init(torch.nn.Linear(2, 2)), TYPE, "PreTrainedModel"),
    ("init-model-none", lambda m, tmp: prefixattn.init(None), TYPE, "PreTrainedModel"),
    ("init-backend", lambda m, tmp: prefixattn.init(_tiny_llama(), backend="flash"), VALUE, "backend"),
    ("init-deterministic", lambda m, tmp: prefixattn.init(_tiny_llama(), deterministic="yes"), TYPE, "deterministic"),
    # add_adapter
    ("add_adapter-name-int", lambda m, tmp: m.add_adapter(3), EITHER, "name"),
    ("add_adapter-name-empty", lambda m, tmp: m.add_adapter(""), EITHER, "name"),
    ("add_adapter-name-taken", lambda m, tmp: m.add_adapter("good"), VALUE, "good"),
    ("add_adapter-config-int", lambda m, tmp: m.add_adapter("a1", 3), TYPE, "config"),
    ("add_adapter-config-preset", lambda m, tmp: m.add_adapter("a2", "lora"), VALUE, "config"),
    ("add_adapter-config-field", lambda m, tmp: m.add_adapter("a3", {"prefix_lenght": 4}), EITHER, "prefix_lenght"),
    (
        "add_adapter-prefix_length-zero",
        lambda m, tmp: m.add_adapter("a4", {"prefix_length": 0}),
        VALUE,
        "prefix_length",
    ),
    (
        "add_adapter-prefix_length-float",
        lambda m, tmp: m.add_adapter("a5", {"prefix_length": 4.5}),
        TYPE,
        "prefix_length",
    ),
    ("add_adapter-metadata-list", lambda m, tmp: m.add_adapter("a6", metadata=[1]), EITHER, "metadata"),
    ("add_adapter-overwrite_ok-str", lambda m, tmp: m.add_adapter("a7", overwrite_ok="yes"), TYPE, "overwrite_ok"),
    ("add_adapter-set_active-str", lambda m, tmp: m.add_adapter("a8", set_active="yes"), TYPE, "set_active"),
    # load_adapter
    ("load_adapter-path-int", lambda m, tmp: m.load_adapter(3), EITHER, "adapter_name_or_path"),
    ("load_adapter-path-missing", lambda m, tmp: m.load_adapter(str(tmp / "nothing")), MISSING, "nothing"),
    ("load_adapter-path-empty-dir", lambda m, tmp: m.load_adapter(_write(tmp / "empty", {})), MISSING, "empty"),
    (
        "load_adapter-config-not-json",
        lambda m, tmp: m.load_adapter(_write(tmp / "bad", {"prefixattn_config.json": "{"})),
        EITHER,
        "prefixattn_config.json",
    ),
    ("load_adapter-load_as-int", lambda m, tmp: m.load_adapter(_saved(m, tmp), load_as=3), EITHER, "load_as"),
    ("load_adapter-load_as-taken", lambda m, tmp: m.load_adapter(_saved(m, tmp), load_as="good"), VALUE, "good"),
    (
        "load_adapter-set_active-str",
        lambda m, tmp: m.load_adapter(_saved(m, tmp), "b1", set_active="yes"),
        TYPE,
        "set_active",
    ),
    # load_peft_prefix
    (
        "load_peft_prefix-model-none",
        lambda m, tmp: prefixattn.load_peft_prefix(None, str(tmp), "p0"),
        VALUE,
        "prefix tuning",
    ),
    ("load_peft_prefix-path-int", lambda m, tmp: prefixattn.load_peft_prefix(m, 3, "p1"), EITHER, "path"),
    (
        "load_peft_prefix-path-missing",
        lambda m, tmp: prefixattn.load_peft_prefix(m, str(tmp / "nothing"), "p2"),
        MISSING,
        "nothing",
    ),
    ("load_peft_prefix-adapter_name-int", lambda m, tmp: prefixattn.load_peft_prefix(m, str(tmp), 3), EITHER, "name"),
    (
        "load_peft_prefix-adapter_name-taken",
        lambda m, tmp: prefixattn.load_peft_prefix(m, str(tmp), "good"),
        VALUE,
        "good",
    ),
    (
        "load_peft_prefix-positions",
        lambda m, tmp: prefixattn.load_peft_prefix(m, str(tmp), "p3", positions="hf"),
        VALUE,
        "positions",
    ),
    (
        "load_peft_prefix-set_active-str",
        lambda m, tmp: prefixattn.load_peft_prefix(m, str(tmp / "x"), "p4", set_active="y"),
        TYPE,
        "set_active",
    ),
    # load_adapters_prefix
    (
        "load_adapters_prefix-model-none",
        lambda m, tmp: prefixattn.load_adapters_prefix(None, str(tmp)),
        VALUE,
        "prefix tuning",
    ),
    ("load_adapters_prefix-path-int", lambda m, tmp: prefixattn.load_adapters_prefix(m, 3), EITHER, "path"),
    (
        "load_adapters_prefix-path-missing",
        lambda m, tmp: prefixattn.load_adapters_prefix(m, str(tmp / "nothing")),
        MISSING,
        "nothing",
    ),
    (
        "load_adapters_prefix-adapter_name-int",
        lambda m, tmp: prefixattn.load_adapters_prefix(m, str(tmp), 3),
        EITHER,
        "name",
    ),
    (
        "load_adapters_prefix-set_active-str",
        lambda m, tmp: prefixattn.load_adapters_prefix(m, str(tmp / "x"), "q", set_active="y"),
        TYPE,
        "set_active",
    ),
]


def _saved(model, tmp):
    path = tmp / "saved"
    if not path.exists():
        model.save_adapter(str(path), "good")
    return str(path)


@pytest.mark.parametrize("call, exc, name", [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_bad_argument_of_the_transformers_entry_points_is_named(model, tmp_path, call, exc, name):
    before = set(model.prefix_tuning.adapters)
    with pytest.raises(exc) as info:
        call(model, tmp_path)
    assert name in str(info.value), f"the message does not name {name!r}: {info.value}"
    assert set(model.prefix_tuning.adapters) == before, "a refused call changed the model"
