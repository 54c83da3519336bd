"""The "cuda" backend (csrc/ -> prefixattn._C): build, refusal without a GPU, and on a GPU the decode
kernels against the float64 reference (contiguous and paged, shared and pooled prefixes), CUDA graphs,
and bad values that must never turn into an illegal memory access."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import TOLERANCE, Case, rel_err

from prefixattn import kernels, prefix_attention, prefix_attention_reference
from prefixattn.kernels import cuda_backend, cuda_ext
from prefixattn.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda"  # device of the GPU tests (a module constant so their logic can be dry-run elsewhere)


def _nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


needs_ext = pytest.mark.skipif(cuda_ext.load() is None, reason="prefixattn._C is not built")


@pytest.fixture
def ext():
    """The extension, for the GPU tests: a machine with nvcc whose build failed fails here instead of
    skipping every kernel test."""
    if cuda_ext.load() is None:
        if _nvcc() is None:
            pytest.skip("prefixattn._C is not built (no nvcc)")
        pytest.fail(f"nvcc is present but the CUDA extension is unavailable: {cuda_ext.why_unavailable()}")
    return cuda_ext.load()


# ----------------------------------------------------------------------------------------------------
# CPU: build, import, refusal


@pytest.mark.skipif(
    _nvcc() is None or os.environ.get("PREFIXATTN_BUILD_CUDA") == "0",
    reason="no nvcc (or PREFIXATTN_BUILD_CUDA=0): the package runs without the extension",
)
def test_extension_builds_and_imports_when_nvcc_is_found():
    if cuda_ext.load() is not None:
        C = cuda_ext.load()
        assert C.device_count() >= 0 and C.runtime_version() > 0
        return
    # Not built in this tree (e.g. a checkout used through PYTHONPATH): build it into a temporary dir.
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PREFIXATTN_BUILD_CUDA="1")
        build = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", tmp, "--build-temp", os.path.join(tmp, "t")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert build.returncode == 0, build.stdout + build.stderr
        probe = subprocess.run(
            [sys.executable, "-c", "import prefixattn._C as C; print(C.device_count(), C.runtime_version())"],
            cwd=tmp,
            env=dict(os.environ, PYTHONPATH=tmp),
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, probe.stderr


def test_why_unavailable_is_empty_exactly_when_loaded():
    assert (cuda_ext.load() is None) == bool(cuda_ext.why_unavailable())


@needs_ext
@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_extension_without_gpu_raises_runtime_error():
    C = cuda_ext.load()
    assert C.device_count() == 0
    with pytest.raises(RuntimeError, match="CUDA"):
        C.require_device()
    p = C.DecodeParams()
    p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.head_dim = 1, 1, 1, 1, 128
    p.q = p.out = p.lse = 256  # plausible addresses: the parameters pass, the missing device is reported
    with pytest.raises(RuntimeError, match="no usable CUDA device|no CUDA device"):
        C.decode(p, 0, 0)


@needs_ext
def test_extension_rejects_bad_parameters_with_value_error():
    C = cuda_ext.load()
    p = C.DecodeParams()
    p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.head_dim = 1, 4, 2, 1, 96
    p.q = p.out = p.lse = 256
    with pytest.raises(ValueError, match="^head_dim: expected 64 or 128, got 96"):
        C.decode(p, 0, 0)
    p.head_dim, p.seqlen_q = 128, 17
    with pytest.raises(ValueError, match="^seqlen_q"):
        C.decode(p, 0, 0)
    p.seqlen_q, p.q = 1, 258
    with pytest.raises(ValueError, match="^q: expected a 16-byte aligned address"):
        C.decode(p, 0, 0)
    p.q, p.q_sh = 256, 12
    with pytest.raises(ValueError, match="^q: expected strides that are multiples of 8"):
        C.decode(p, 0, 0)
    p.q_sh, p.dtype = 0, 7
    with pytest.raises(ValueError, match="^dtype"):
        C.decode(p, 0, 0)


def _problem(case: Case, dtype, device="cpu", **over):
    (q, k, v, pk, pv), args = case.make(dtype=dtype, device=device, requires_grad=False)
    args.update(over)
    return (q, k, v, pk, pv), args


def test_cuda_backend_on_cpu_tensors_is_refused_naming_the_reason():
    (q, k, v, pk, pv), args = _problem(Case(head_dim=64, seqlen_q=1), torch.float16)
    with pytest.raises(ValueError, match=r"^backend: 'cuda' cannot run this call: "):
        prefix_attention(q, k, v, pk, pv, backend="cuda", **args)


@needs_ext
@pytest.mark.parametrize(
    "over, reason",
    [
        (dict(dtype=torch.float32), "dtype torch.float32 is not supported"),
        (dict(head_dim=96), "head dim 96 is not supported"),
        (dict(seqlen_q=17, seqlen_k=20), "at most 16 query rows"),
        (dict(needs_grad=True), "inference only"),
        (dict(bias=True), "attn_bias is not supported"),
    ],
)
def test_unsupported_reasons(over, reason):
    dtype = over.pop("dtype", torch.float16)
    needs_grad = over.pop("needs_grad", False)
    bias = over.pop("bias", False)
    case = Case(**{"head_dim": 64, "seqlen_q": 1, **over})
    (q, k, v, pk, pv), args = _problem(case, dtype)
    if bias:
        args["attn_bias"] = torch.zeros(1, 1, 1, case.seqlen_k)
    problem = validate(q, k, v, pk, pv, **args)
    problem = problem.__class__(**{**problem.__dict__, "device": torch.device("cuda", 0)})  # as if on a GPU
    got = cuda_backend.unsupported_reason(problem, needs_grad=needs_grad)
    assert got is not None and reason in got, got


def test_unsupported_reason_without_extension_says_so(monkeypatch):
    monkeypatch.setattr(cuda_ext, "load", lambda: None)
    monkeypatch.setattr(cuda_ext, "why_unavailable", lambda: "prefixattn._C is not built in this installation")
    (q, k, v, pk, pv), args = _problem(Case(head_dim=64, seqlen_q=1), torch.float16)
    problem = validate(q, k, v, pk, pv, **args)
    assert "not built" in cuda_backend.unsupported_reason(problem, needs_grad=False)
    with pytest.raises(RuntimeError, match="not built"):
        cuda_backend.decode(q, k, v, pk, pv, None, None, None, True, 0.1)


def test_backward_is_refused():
    with pytest.raises(RuntimeError, match="inference only"):
        cuda_backend.backward(*([None] * 13), True, 1.0)


def test_preferred_is_off_until_measured():
    (q, k, v, pk, pv), args = _problem(Case(head_dim=128, seqlen_q=1, heads_q=32, heads_kv=8), torch.bfloat16)
    problem = validate(q, k, v, pk, pv, **args)
    assert kernels.preferred("cuda", problem, "dense") is False


@pytest.mark.parametrize(
    "blocks, keys, dim, expect",
    [
        (1024, 2048, 128, 1),  # B=128, Hkv=8: the grid already fills the GPU
        (8, 2048, 128, None),  # B=1: split the keys
        (8, 40, 128, 1),  # too few keys to split
        (56, 4611, 64, None),
    ],
)
def test_num_splits_heuristic(blocks, keys, dim, expect):
    s = cuda_backend.num_splits(blocks, keys, dim, sms=132)
    assert 1 <= s <= cuda_backend.MAX_SPLITS
    if expect is not None:
        assert s == expect
    else:
        assert s > 1 and s * cuda_backend.MIN_TILES_PER_SPLIT * cuda_backend.TILE_KEYS <= keys + 15 * s


def test_opt_in_paged_value_checks():
    bt = torch.tensor([[0, 1, -1], [2, 9, 3]], dtype=torch.int32)  # 9 is past a cache of 8 pages
    check = cuda_backend._check_paged_values
    check(bt, torch.tensor([32, 16]), 8, 16, None, None, None)  # unused slots may hold anything
    with pytest.raises(ValueError, match=r"^block_table: expected page ids in \[0, 8\).* got 9 at \[1, 1\]"):
        check(bt, torch.tensor([32, 17]), 8, 16, None, None, None)
    with pytest.raises(ValueError, match=r"^seq_lens: expected values in \[0, 48\].* got -1 for sequence 0"):
        check(bt, torch.tensor([-1, 3]), 8, 16, None, None, None)
    pool = torch.zeros(3, 2, 5, 64)
    with pytest.raises(ValueError, match=r"^prefix_index: expected values in \[-1, 2\]"):
        check(bt, torch.tensor([1, 1]), 8, 16, pool, torch.tensor([3, -1]), None)
    with pytest.raises(ValueError, match=r"^prefix_lengths: expected values in \[0, 5\]"):
        check(bt, torch.tensor([1, 1]), 8, 16, pool, torch.tensor([0, -1]), torch.tensor([5, 6, 0]))


class _FakeStream:
    cuda_stream = 0


@needs_ext
@pytest.mark.skipif(HAS_CUDA, reason="dry run of the argument marshalling without a GPU")
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("prefix", ["none", "shared", "pool"])
def test_marshalling_passes_the_extension_checks_on_cpu(monkeypatch, paged, prefix):
    """Drive decode()/paged_decode() with CPU tensors up to the extension: its parameter checks
    (alignment, strides, workspace size) must pass, so the only error is the missing device."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(cuda_backend, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = {}
    real = cuda_ext.load()

    class Recorder:
        DecodeParams = real.DecodeParams
        workspace_elements = staticmethod(real.workspace_elements)

        @staticmethod
        def decode(p, stream, device):
            seen["p"] = p
            real.decode(p, stream, device)

    monkeypatch.setattr(cuda_ext, "load", lambda: Recorder)
    case = Case(
        batch=3,
        heads_q=8,
        heads_kv=2,
        seqlen_q=2,
        seqlen_k=37,
        head_dim=64,
        prefix_len=0 if prefix == "none" else 7,
        pool=3 if prefix == "pool" else 0,
        lengths=prefix == "pool",
        noncontiguous=True,
    )
    (q, k, v, pk, pv), args = _problem(case, torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUDA"):
        if paged:
            kc = torch.zeros(11, 16, 2, 64, dtype=torch.bfloat16)
            bt = torch.arange(9, dtype=torch.int32).view(3, 3)
            sl = torch.tensor([5, 48, 20], dtype=torch.int32)
            cuda_backend.paged_decode(
                q, kc, kc.clone(), bt, sl, pk, pv, args.get("prefix_index"), args.get("prefix_lengths"), 0.125
            )
        else:
            cuda_backend.decode(
                q, k, v, pk, pv, args.get("prefix_index"), args.get("prefix_lengths"), None, True, 0.125
            )
    p = seen["p"]
    assert (p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.head_dim, p.dtype) == (3, 8, 2, 2, 64, 1)
    assert (p.q_sb, p.q_sh, p.q_ss) == q.stride()[:3]
    assert p.prefix_len == (0 if prefix == "none" else 7) and p.pool_size == (3 if prefix == "pool" else 0)
    assert p.paged == paged and (p.page_size, p.max_pages, p.num_pages) == ((16, 3, 11) if paged else (0, 0, 0))


# ----------------------------------------------------------------------------------------------------
# GPU: against the float64 reference


def _check(out, lse, ref_out, ref_lse, dtype, what=""):
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert not torch.isnan(out).any(), what
    err = rel_err(out, ref_out)
    assert err <= TOLERANCE[dtype], f"{what}: out rel err {err:.3e} > {TOLERANCE[dtype]}"
    lerr = rel_err(lse, ref_lse)
    assert lerr <= TOLERANCE[torch.float32], f"{what}: lse rel err {lerr:.3e}"


def _reference(q, k, v, pk, pv, **args):
    d = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    return prefix_attention_reference(d(q), d(k), d(v), d(pk), d(pv), return_lse=True, **args)


# (B, Sk, P) x GQA x dtype x prefix form: every value of every factor, cycled against the others.
_GRID = [(b, sk, p) for b in (1, 7, 64) for sk in (1, 300, 4099) for p in (0, 16, 512)]
_CONTIG = [
    (b, sk, p, (1, 4, 8)[i % 3], (torch.float16, torch.bfloat16)[i % 2], ("shared", "pool")[(i // 2) % 2])
    for i, (b, sk, p) in enumerate(_GRID)
]


def _ids(cases):
    return [f"B{b}-Sk{sk}-P{p}-G{g}-{str(dt)[6:]}-{form}" for b, sk, p, g, dt, form in cases]


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("B, Sk, P, G, dtype, form", _CONTIG, ids=_ids(_CONTIG))
def test_contiguous_matches_reference(B, Sk, P, G, dtype, form):
    case = Case(
        batch=B,
        heads_q=2 * G,
        heads_kv=2,
        seqlen_q=1,
        seqlen_k=Sk,
        head_dim=128 if B != 7 else 64,
        prefix_len=P,
        pool=3 if form == "pool" else 0,
        lengths=form == "pool" and B == 7,
        noncontiguous=B == 64,
    )
    (q, k, v, pk, pv), args = _problem(case, dtype, DEV)
    out, lse = prefix_attention(q, k, v, pk, pv, backend="cuda", return_lse=True, **args)
    ref_out, ref_lse = _reference(q, k, v, pk, pv, **args)
    _check(out, lse, ref_out, ref_lse, dtype, str(case))
    assert out.transpose(1, 2).is_contiguous()  # [B, Sq, Hq, D] memory


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        Case(batch=3, heads_q=8, heads_kv=2, seqlen_q=4, seqlen_k=77, head_dim=128, prefix_len=9),  # Sq > 1
        Case(batch=2, heads_q=16, heads_kv=2, seqlen_q=4, seqlen_k=300, head_dim=64, prefix_len=16),  # 2 row groups
        Case(
            batch=2, heads_q=8, heads_kv=2, seqlen_q=16, seqlen_k=40, head_dim=128, prefix_len=5, pool=2
        ),  # 4 row groups
        Case(batch=5, heads_q=4, heads_kv=4, seqlen_q=3, seqlen_k=150, head_dim=64, prefix_len=12, padding="random"),
        Case(batch=5, heads_q=8, heads_kv=2, seqlen_q=2, seqlen_k=90, head_dim=128, prefix_len=0, padding="left"),
        Case(batch=4, heads_q=8, heads_kv=1, seqlen_q=5, seqlen_k=33, head_dim=64, prefix_len=7, causal=False),
        Case(
            batch=4, heads_q=4, heads_kv=2, seqlen_q=3, seqlen_k=2, head_dim=64, prefix_len=6, causal=False
        ),  # Sq > Sk
        Case(
            batch=6,
            heads_q=4,
            heads_kv=2,
            seqlen_q=1,
            seqlen_k=64,
            head_dim=128,
            prefix_len=8,
            pool=4,
            lengths=True,
            noncontiguous=True,
        ),
        # prefix only
        Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=0, head_dim=64, prefix_len=20, causal=False),
    ],
    ids=lambda c: (
        f"B{c.batch}-G{c.heads_q // c.heads_kv}-Sq{c.seqlen_q}-Sk{c.seqlen_k}-D{c.head_dim}-P{c.prefix_len}"
        f"-pool{c.pool}-{c.padding}-causal{int(c.causal)}"
    ),
)
def test_contiguous_special_cases(case, dtype):
    (q, k, v, pk, pv), args = _problem(case, dtype, DEV)
    out, lse = prefix_attention(q, k, v, pk, pv, backend="cuda", return_lse=True, **args)
    ref_out, ref_lse = _reference(q, k, v, pk, pv, **args)
    _check(out, lse, ref_out, ref_lse, dtype, str(case))


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_forced_split_counts_agree(splits):
    case = Case(batch=3, heads_q=8, heads_kv=2, seqlen_q=2, seqlen_k=700, head_dim=128, prefix_len=33, pool=2)
    (q, k, v, pk, pv), args = _problem(case, torch.bfloat16, DEV)
    out, lse = cuda_backend.decode(
        q, k, v, pk, pv, args["prefix_index"], None, None, True, 128**-0.5, num_splits=splits
    )
    ref_out, ref_lse = _reference(q, k, v, pk, pv, **args)
    _check(out, lse, ref_out, ref_lse, torch.bfloat16, f"splits={splits}")


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
def test_empty_rows_give_zeros_and_minus_inf():
    case = Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=50, head_dim=64, prefix_len=4, pool=2)
    (q, k, v, pk, pv), args = _problem(case, torch.float16, DEV)
    args["prefix_index"] = torch.tensor([-1, 0, -1], device=DEV)
    args["key_padding_mask"] = torch.zeros(3, 50, dtype=torch.bool, device=DEV)
    args["key_padding_mask"][1, :3] = True
    out, lse = prefix_attention(q, k, v, pk, pv, backend="cuda", return_lse=True, **args)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all() and torch.isfinite(lse[1]).all()
    ref_out, ref_lse = _reference(q, k, v, pk, pv, **args)
    _check(out, lse, ref_out, ref_lse, torch.float16)


# ---- paged


def _paged(B, Hq, Hkv, Sq, D, P, pool, page_size, max_pages, dtype, *, lengths=None, seed=0, extra_pages=5):
    """A random paged cache on the GPU with a block table that permutes the pages; returns the
    paged_decode arguments."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    num_pages = B * max_pages + extra_pages
    kc, vc = rnd(num_pages, page_size, Hkv, D), rnd(num_pages, page_size, Hkv, D)
    bt = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages).to(torch.int32)
    cap = max_pages * page_size
    if lengths is None:
        lengths = torch.randint(Sq, cap + 1, (B,), generator=g)
        lengths[0] = cap  # one sequence fills its table
    q = rnd(B, Hq, Sq, D)
    pk = pv = pidx = None
    if P:
        shape = (pool, Hkv, P, D) if pool else (Hkv, P, D)
        pk, pv = rnd(*shape), rnd(*shape)
        if pool:
            pidx = torch.randint(-1, pool, (B,), generator=g)
            pidx[0] = 0
    dev = lambda t: t.to(DEV) if t is not None else None  # noqa: E731
    return dict(
        q=dev(q),
        k_cache=dev(kc),
        v_cache=dev(vc),
        block_table=dev(bt),
        seq_lens=dev(lengths.to(torch.int32)),
        prefix_k=dev(pk),
        prefix_v=dev(pv),
        prefix_index=dev(pidx),
        prefix_lengths=None,
    )


def _paged_reference(paged, prefix_index=None):
    """The float64 reference of a paged problem, with the documented reading of bad values: seq_lens
    clamped to [0, max_pages * page_size], keys on page ids outside [0, num_pages) masked. Sequence b's
    tokens go right-aligned into a contiguous [B, Hkv, L, D] with a padding mask, so the reference's
    bottom-right causal alignment matches 'query i sees j <= seq_len - Sq + i'."""
    q, kc, vc, bt = paged["q"], paged["k_cache"], paged["v_cache"], paged["block_table"].long()
    B, _, Sq, D = q.shape
    num_pages, page_size = kc.shape[:2]
    max_pages = bt.shape[1]
    lens = paged["seq_lens"].long().clamp(0, max_pages * page_size)
    L = max(int(lens.max()), Sq)
    pos = torch.arange(L, device=q.device)[None, :] - (L - lens)[:, None]  # token position of slot j, [B, L]
    valid = pos >= 0
    pos = pos.clamp(min=0)
    page = bt.gather(1, (pos // page_size).clamp(max=max_pages - 1))
    valid &= (page >= 0) & (page < num_pages)
    page, tok = page.clamp(0, num_pages - 1), pos % page_size
    k = torch.where(valid[..., None, None], kc[page, tok].double(), 0.0).transpose(1, 2)
    v = torch.where(valid[..., None, None], vc[page, tok].double(), 0.0).transpose(1, 2)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    pidx = prefix_index if prefix_index is not None else paged["prefix_index"]
    extra = {"prefix_index": pidx.to(q.device)} if pidx is not None else {}
    return prefix_attention_reference(
        d(q),
        k,
        v,
        d(paged["prefix_k"]),
        d(paged["prefix_v"]),
        causal=True,
        key_padding_mask=valid,
        return_lse=True,
        **extra,
    )


_PAGED = [
    (b, sk, p, (4, 8, 1)[i % 3], (torch.bfloat16, torch.float16)[i % 2], ("pool", "shared")[(i // 2) % 2])
    for i, (b, sk, p) in enumerate(_GRID)
]


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("B, Sk, P, G, dtype, form", _PAGED, ids=_ids(_PAGED))
def test_paged_matches_reference(B, Sk, P, G, dtype, form):
    page_size = 16 if B != 7 else 24  # 24: not a power of two
    D = 128 if B != 7 else 64
    paged = _paged(B, 2 * G, 2, 1, D, P, 3 if form == "pool" else 0, page_size, -(-Sk // page_size), dtype)
    out, lse = cuda_backend.paged_decode(scale=D**-0.5, **paged)
    ref_out, ref_lse = _paged_reference(paged)
    _check(out, lse, ref_out, ref_lse, dtype, f"paged B={B} Sk={Sk} P={P}")


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("Sq, page_size, G", [(4, 16, 4), (3, 5, 2), (16, 32, 2), (1, 1, 8)])
def test_paged_multi_query_and_page_sizes(Sq, page_size, G):
    paged = _paged(4, 2 * G, 2, Sq, 64, 10, 2, page_size, -(-100 // page_size), torch.bfloat16, seed=1)
    out, lse = cuda_backend.paged_decode(scale=0.125, **paged)
    ref_out, ref_lse = _paged_reference(paged)
    _check(out, lse, ref_out, ref_lse, torch.bfloat16, f"Sq={Sq} page_size={page_size}")


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
def test_paged_bad_values_never_read_out_of_bounds():
    """Page ids outside the cache mask their keys, seq_lens beyond the table are clamped to it,
    negative seq_lens count as 0, pool indices outside [0, N) mean no prefix: finite results equal to
    the reference of that reading. benchmarks/cuda_memcheck.py runs such calls under compute-sanitizer."""
    paged = _paged(4, 8, 2, 1, 128, 6, 2, 16, 3, torch.float16, seed=2, lengths=torch.tensor([10, 40, 1000, -3]))
    bt = paged["block_table"].cpu()
    bt[0, 0], bt[1, 1], bt[2, 2] = -7, int(bt.max()) + 100, 2**31 - 1
    paged["block_table"] = bt.to(DEV)
    paged["prefix_index"] = torch.tensor([0, 5, -4, 1], device=DEV)
    for over, msg in (
        (dict(), "^seq_lens: expected values in \\[0, 48\\]"),
        (dict(seq_lens=torch.tensor([10, 40, 48, 0], device=DEV)), "^block_table: expected page ids"),
        (dict(seq_lens=torch.tensor([0, 16, 32, 0], device=DEV)), "^prefix_index: expected values"),
    ):
        with pytest.raises(ValueError, match=msg):  # the opt-in host-side checks name the bad value
            cuda_backend.paged_decode(scale=1.0, validate_values=True, **{**paged, **over})
    out, lse = cuda_backend.paged_decode(scale=128**-0.5, **paged)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    ref_out, ref_lse = _paged_reference(paged, prefix_index=torch.tensor([0, -1, -1, 1]))
    _check(out, lse, ref_out, ref_lse, torch.float16, "bad values")


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
def test_bad_inputs_raise_before_launch():
    q = torch.randn(2, 4, 1, 128, device=DEV, dtype=torch.float16)
    kc = torch.randn(8, 16, 2, 128, device=DEV, dtype=torch.float16)
    bt = torch.zeros(2, 4, dtype=torch.int32, device=DEV)
    sl = torch.ones(2, dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match="^q: the CUDA kernels support float16 and bfloat16"):
        cuda_backend.paged_decode(q.float(), kc.float(), kc.float(), bt, sl, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="^q: the CUDA kernels support head dims 64 and 128"):
        cuda_backend.paged_decode(q[..., :96], kc[..., :96], kc[..., :96], bt, sl, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="^block_table: expected shape"):
        cuda_backend.paged_decode(q, kc, kc, bt[:1], sl, None, None, None, None, 1.0)
    with pytest.raises(TypeError, match="^seq_lens: expected dtype int32"):
        cuda_backend.paged_decode(q, kc, kc, bt, sl.float(), None, None, None, None, 1.0)
    flat = torch.randn(8 * 16 * 2 * 128 + 1, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="^k_cache: the CUDA kernels need a 16-byte aligned"):
        cuda_backend.paged_decode(q, flat[1:].view(8, 16, 2, 128), kc, bt, sl, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="^q: the CUDA kernels are inference only"):
        cuda_backend.paged_decode(q.clone().requires_grad_(), kc, kc, bt, sl, None, None, None, None, 1.0)
    k = torch.randn(2, 2, 10, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^backend: 'cuda' cannot run this call: .*float32"):
        prefix_attention(q.float(), k.float(), k.float(), backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: 'cuda' cannot run this call: .*inference only"):
        prefix_attention(q.clone().requires_grad_(), k, k, backend="cuda")


# ---- CUDA graphs


@pytest.mark.gpu
@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("paged_form", [False, True])
def test_cuda_graph_capture_and_replay(paged_form):
    if paged_form:
        paged = _paged(3, 8, 2, 1, 128, 16, 2, 16, 8, torch.bfloat16, seed=3)
        run = lambda: cuda_backend.paged_decode(scale=128**-0.5, **paged)  # noqa: E731
    else:
        case = Case(batch=3, heads_q=8, heads_kv=2, seqlen_q=1, seqlen_k=300, head_dim=128, prefix_len=16, pool=2)
        (q, k, v, pk, pv), args = _problem(case, torch.bfloat16, DEV)
        run = lambda: prefix_attention(q, k, v, pk, pv, backend="cuda", return_lse=True, **args)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside the capture (module loading, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = run()
    for step in range(3):  # new values in the same buffers, then replay
        if paged_form:
            paged["q"].normal_()
            paged["seq_lens"].sub_(5 * step)  # lengths change between steps: no recapture needed
            ref_out, ref_lse = _paged_reference(paged)
        else:
            q.normal_()
            k.normal_()
            ref_out, ref_lse = _reference(q, k, v, pk, pv, **args)
        graph.replay()
        torch.cuda.synchronize()
        _check(out, lse, ref_out, ref_lse, torch.bfloat16, f"replay {step}")


def test_auto_preference_follows_the_measured_table():
    """auto picks CUDA only where the H200 run measured it faster: paged decode, B=1, 384-768 keys, bf16 D=128."""
    from prefixattn.paged import PagedProblem

    def paged(batch, pages, plen, dtype=torch.bfloat16, dim=128):
        problem = PagedProblem(
            batch=batch,
            heads_q=32,
            heads_kv=8,
            seqlen_q=1,
            head_dim=dim,
            num_pages=64,
            page_size=16,
            max_pages=pages,
            prefix_len=plen,
            pool_size=1,
            pooled=False,
            dtype=dtype,
            device=torch.device("cuda"),
            scale=dim**-0.5,
        )
        return kernels.preferred("cuda", problem, "paged")

    assert paged(1, 16, 128) and paged(1, 16, 512)  # measured: CUDA 11.3 vs 12.9 us, 14.8 vs 15.7 us
    assert not paged(1, 16, 16)  # measured: Triton faster (11.7 vs 12.3 us)
    assert not paged(128, 16, 512)  # measured: Triton 76.4 vs CUDA 109.4 us
    assert not paged(1, 16, 128, dtype=torch.float16)  # not measured: stay on Triton
