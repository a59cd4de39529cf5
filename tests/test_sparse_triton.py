"""Triton sparse linear kernels (bsr_mm, sparse24_mm, csr_mm) vs bigkernels.reference.sparse.

Runs under the Triton interpreter on CPU tensors (its own pytest process, with TRITON_INTERPRET=1
set before triton is imported) or on a CUDA GPU; skipped otherwise.
"""
from __future__ import annotations


import pytest
import torch

from conftest import DT_IDS, TRITON_DEVICE, TRITON_FLOAT_DTYPES, skip_module_without_triton_runtime

skip_module_without_triton_runtime()

import bigkernels.ops.sparse as sparse_ops  # noqa: E402  (defines the main schemas)
from bigkernels.ops import _registry  # noqa: E402
from bigkernels.reference import sparse as ref  # noqa: E402
from bigkernels.triton import sparse as tri  # noqa: E402,F401  (registers the *_triton ops)

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

DEVICE = TRITON_DEVICE
OPS = torch.ops.bigkernels
FLOAT_DTYPES = TRITON_FLOAT_DTYPES
HALF_DTYPES = [d for d in FLOAT_DTYPES if d != torch.float32]
M_VALUES = [0, 1, 5, 33]



def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _max_err(actual, expected):
    return (actual.cpu().double() - expected.cpu().double()).abs().max().item() if actual.numel() else 0.0


def _amax(t):
    return t.abs().max().item() if t.numel() else 0.0


def _assert_rel(actual, expected, rtol, what):
    """|actual - expected| <= rtol * (|expected| + max|expected| * 1e-2) elementwise."""
    a, e = actual.cpu().double(), expected.cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not e.numel():
        return
    bound = rtol * (e.abs() + e.abs().max() * 1e-2)
    bad = (a - e).abs() > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{e.numel()} elements off; max |diff| "
                           f"{(a - e).abs().max().item():.3g}, max |expected| {e.abs().max().item():.3g}")


def _check(out, x, fmt, bias, reference, what):
    """fp32: <= 1e-5 relative to the reference; 16-bit: error vs the fp32 reference at most twice
    that of the reference run in the 16-bit dtype."""
    assert out.dtype == x.dtype and out.device == x.device
    up = [t.float() if t.is_floating_point() else t for t in fmt]
    exact = reference(x.float(), *up, None if bias is None else bias.float())
    if x.dtype == torch.float32:
        _assert_rel(out, exact, 1e-5, what)
    else:
        ref_err = _max_err(reference(x, *fmt, bias), exact)
        err = _max_err(out, exact)
        assert err <= 2 * ref_err + 1e-6 * _amax(exact), f"{what}: error {err:.3g} vs reference's {ref_err:.3g}"


def _after_poisoning(fn):
    """Run ``fn`` after filling the allocator's recent memory with NaN (so unwritten outputs show)."""
    torch.full((1 << 16,), float("nan"), device=DEVICE)
    return fn()


# ------------------------------------------------------------------------------------ formats


def _bsr_weight(n, k, b, sparsity, gen, dtype=torch.float32):
    """W [n, k] with round(sparsity * blocks) zero blocks at random, block row 1 always empty."""
    nb, kb = n // b, k // b
    keep = torch.zeros(nb * kb, dtype=torch.bool)
    keep[torch.randperm(nb * kb, generator=gen)[:round((1 - sparsity) * nb * kb)]] = True
    keep = keep.reshape(nb, kb)
    if nb > 1:
        keep[1] = False
    mask = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    w = torch.randn(n, k, generator=gen) * mask
    crow, col, blocks = ref.to_bsr(w, b)
    return crow.to(DEVICE), col.to(DEVICE), blocks.to(device=DEVICE, dtype=dtype)


def _sparse24_weight(n, k, gen, dtype=torch.float32):
    w = torch.randn(n, k, generator=gen)
    drop = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=2)[..., :2]  # 2 random positions per group
    w.view(n, k // 4, 4).scatter_(2, drop, 0.0)
    values, meta = ref.to_sparse24(w)
    return values.to(device=DEVICE, dtype=dtype), meta.to(DEVICE)


def _csr_weight(n, k, density, gen, dtype=torch.float32):
    """W [n, k] with row 0 empty and the last row dense (longer than one gather chunk)."""
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < density)
    w[0] = 0.0
    w[-1] = torch.randn(k, generator=gen)
    crow, col, values = ref.to_csr(w)
    return crow.to(DEVICE), col.to(DEVICE), values.to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------ bsr_mm


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("M", M_VALUES)
def test_bsr_mm_matches_reference(M, block, sparsity, dtype):
    gen = _gen(100 + M * 7 + block + int(sparsity * 10))
    N, K = 3 * block, 4 * block
    crow, col, blocks = _bsr_weight(N, K, block, sparsity, gen, dtype)
    x = _randn((M, K), gen, dtype)
    bias = _randn((N,), gen, dtype) if M % 2 else None
    out = _after_poisoning(lambda: OPS.bsr_mm_triton(x, crow, col, blocks, bias))
    assert out.shape == (M, N)
    _check(out, x, (crow, col, blocks), bias, ref.bsr_linear, f"bsr_mm B={block} s={sparsity}")
    if M and bias is None and sparsity < 1:
        assert (out[:, block:2 * block] == 0).all(), "an empty block row must give exact zeros"


@pytest.mark.parametrize("M", [3, 33], ids=["split_n", "paired"])
def test_bsr_mm_odd_and_even_block_counts(M):
    """Block rows holding 0, 1, 2, 3 and 4 blocks (the paired loop's remainder and full pairs)."""
    gen = _gen(140 + M)
    b, kb = 16, 4
    keep = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    w = torch.randn(5 * b, kb * b, generator=gen) * keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    crow, col, blocks = (t.to(DEVICE) for t in ref.to_bsr(w, b))
    assert (crow[1:] - crow[:-1]).tolist() == [0, 1, 2, 3, 4]
    x, bias = _randn((M, kb * b), gen), _randn((5 * b,), gen)
    _assert_rel(OPS.bsr_mm_triton(x, crow, col, blocks, bias), ref.bsr_linear(x, crow, col, blocks, bias),
                1e-5, "bsr_mm block counts")


def test_bsr_mm_all_empty_with_bias_and_mixed_dtypes():
    gen = _gen(150)
    crow, col, blocks = _bsr_weight(32, 48, 16, 1.0, gen)
    x, bias = _randn((5, 48), gen), _randn((32,), gen)
    assert col.numel() == 0
    torch.testing.assert_close(OPS.bsr_mm_triton(x, crow, col, blocks, bias), bias.expand(5, 32))
    # fp16 activations with fp32 blocks: both tiles go through fp32, no weight precision lost
    crow, col, blocks = _bsr_weight(48, 64, 16, 0.5, gen)
    x16 = _randn((7, 64), gen, torch.float16)
    out = OPS.bsr_mm_triton(x16, crow, col, blocks, None)
    assert out.dtype == torch.float16
    _check(out, x16, (crow, col, blocks), None, ref.bsr_linear, "bsr_mm mixed")


def test_bsr_mm_non_contiguous_and_int64_col():
    gen = _gen(160)
    crow, col, blocks = _bsr_weight(32, 64, 16, 0.5, gen)
    x = _randn((6, 128), gen)[:, ::2]
    assert not x.is_contiguous()
    out = OPS.bsr_mm_triton(x, crow, col.long(), blocks, None)
    _assert_rel(out, ref.bsr_linear(x, crow, col, blocks, None), 1e-5, "bsr_mm strided")


# ------------------------------------------------------------------------------------ sparse24_mm

SPARSE24_SHAPES = [(0, 7, 20), (1, 7, 20), (5, 9, 36), (33, 17, 48)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SPARSE24_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse24_mm_matches_reference(shape, has_bias, dtype):
    M, N, K = shape
    gen = _gen(200 + M + N + K + has_bias)
    values, meta = _sparse24_weight(N, K, gen, dtype)
    x = _randn((M, K), gen, dtype)
    bias = _randn((N,), gen, dtype) if has_bias else None
    out = _after_poisoning(lambda: OPS.sparse24_mm_triton(x, values, meta, bias))
    assert out.shape == (M, N)
    _check(out, x, (values, meta), bias, ref.sparse24_linear, "sparse24_mm")


def test_sparse24_mm_non_contiguous_and_mixed_dtypes():
    gen = _gen(250)
    values, meta = _sparse24_weight(11, 40, gen)
    x = _randn((5, 80), gen)[:, ::2]
    _assert_rel(OPS.sparse24_mm_triton(x, values, meta, None), ref.sparse24_linear(x, values, meta, None),
                1e-5, "sparse24 strided")
    x16 = _randn((5, 40), gen, torch.float16)
    _check(OPS.sparse24_mm_triton(x16, values, meta, None), x16, (values, meta), None, ref.sparse24_linear,
           "sparse24 mixed")


# ------------------------------------------------------------------------------------ csr_mm

CSR_SHAPES = [(0, 7, 19), (1, 5, 3), (5, 13, 37), (33, 17, 50)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", CSR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_csr_mm_matches_reference(shape, has_bias, dtype):
    M, N, K = shape
    gen = _gen(300 + M + N + K + has_bias)
    crow, col, values = _csr_weight(N, K, 0.3, gen, dtype)
    x = _randn((M, K), gen, dtype)
    bias = _randn((N,), gen, dtype) if has_bias else None
    out = _after_poisoning(lambda: OPS.csr_mm_triton(x, crow, col, values, bias))
    assert out.shape == (M, N)
    _check(out, x, (crow, col, values), bias, ref.csr_linear, "csr_mm")


def test_csr_mm_non_contiguous_and_all_zero():
    gen = _gen(350)
    crow, col, values = _csr_weight(9, 30, 0.5, gen)
    x = _randn((4, 60), gen)[:, ::2]
    _assert_rel(OPS.csr_mm_triton(x, crow, col, values, None), ref.csr_linear(x, crow, col, values, None),
                1e-5, "csr strided")
    crow, col, values = ref.to_csr(torch.zeros(6, 10, device=DEVICE))
    bias = _randn((6,), gen)
    torch.testing.assert_close(OPS.csr_mm_triton(_randn((3, 10), gen), crow, col, values, bias), bias.expand(3, 6))


def test_csr_grid_keeps_axis_1_under_cuda_limit():
    """M tiles go on grid axis 0 (2^31 - 1), row blocks on axis 1 (65,535): a 5M-row x and a
    1M-row weight both launch (the M tiles were on axis 1, which failed past ~4.2M rows)."""
    for M, N in ((5_000_000, 4096), (64, 1_000_000), (3_000_000_000 // 64, 300_000)):
        (gx, gy), rows = tri._csr_grid(M, N, 64, 4)
        assert gx == -(-M // 64) and gx <= 2**31 - 1
        assert gy <= 65535 and gy * rows >= N and (gy - 1) * rows < N
        assert rows == 4 or N > 4 * 65535


def test_csr_mm_several_rows_per_program(monkeypatch):
    """With more rows per program (what N > 262,140 gets on a GPU) every row is still computed."""
    monkeypatch.setattr(tri, "_GRID_Y_MAX", 2)
    gen = _gen(360)
    crow, col, values = _csr_weight(13, 37, 0.3, gen)
    x = _randn((5, 37), gen)
    bias = _randn((13,), gen)
    assert tri._csr_grid(5, 13, 16, 2)[1] == 7
    out = _after_poisoning(lambda: OPS.csr_mm_triton(x, crow, col, values, bias))
    _check(out, x, (crow, col, values), bias, ref.csr_linear, "csr_mm rows=7")


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    gen = _gen(400)
    crow, col, blocks = _bsr_weight(32, 48, 16, 0.5, gen)
    x = _randn((3, 48), gen)
    with pytest.raises(ValueError, match="x must be 2-D, got 3-D"):
        OPS.bsr_mm_triton(x[None], crow, col, blocks, None)
    with pytest.raises(ValueError, match="x must have dtype one of"):
        OPS.bsr_mm_triton(x.long(), crow, col, blocks, None)
    with pytest.raises(ValueError, match="crow must have dtype one of"):
        OPS.bsr_mm_triton(x, crow.float(), col, blocks, None)
    with pytest.raises(ValueError, match=r"B in \(16, 32, 64, 128\), got \(\d+, 8, 8\)"):
        OPS.bsr_mm_triton(x, crow, col, blocks[:, :8, :8].contiguous(), None)
    with pytest.raises(ValueError, match="K = 40 must be a multiple of the block size 16"):
        OPS.bsr_mm_triton(x[:, :40].contiguous(), crow, col, blocks, None)
    with pytest.raises(ValueError, match="col must have one entry per stored block"):
        OPS.bsr_mm_triton(x, crow, col[:-1], blocks, None)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        OPS.bsr_mm_triton(x, crow, col, blocks, _randn((31,), gen))
    if DEVICE == "cpu":  # index values are checked where that needs no device sync
        bad_col = col.clone()
        bad_col[0] = 3
        with pytest.raises(ValueError, match=r"col must hold block columns in \[0, 3\), got values in"):
            OPS.bsr_mm_triton(x, crow, bad_col, blocks, None)
        bad_crow = crow.clone()
        bad_crow[-1] += 1
        with pytest.raises(ValueError, match="crow must start at 0 and end at len"):
            OPS.bsr_mm_triton(x, bad_crow, col, blocks, None)
    values, meta = _sparse24_weight(5, 16, gen)
    with pytest.raises(ValueError, match="K = 18 must be a multiple of 4"):
        OPS.sparse24_mm_triton(_randn((2, 18), gen), values, meta, None)
    with pytest.raises(ValueError, match=r"values must have shape \[N, K/2\] = \[5, 10\], got \(5, 8\)"):
        OPS.sparse24_mm_triton(_randn((2, 20), gen), values, meta, None)
    with pytest.raises(ValueError, match="meta must have dtype torch.uint8, got torch.int32"):
        OPS.sparse24_mm_triton(_randn((2, 16), gen), values, meta.int(), None)
    with pytest.raises(ValueError, match=r"meta must have shape \[N, K/4\] = \(5, 4\), got \(5, 3\)"):
        OPS.sparse24_mm_triton(_randn((2, 16), gen), values, meta[:, :3], None)
    crow, col, vals = _csr_weight(6, 10, 0.5, gen)
    with pytest.raises(ValueError, match="values must have one entry per col entry"):
        OPS.csr_mm_triton(_randn((2, 10), gen), crow, col, vals[:-1], None)
    with pytest.raises(ValueError, match="values must be 1-D, got 2-D"):
        OPS.csr_mm_triton(_randn((2, 10), gen), crow, col, vals[None], None)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"col must hold input columns in \[0, 5\)"):
            OPS.csr_mm_triton(_randn((2, 5), gen), crow, col, vals, None)


# ------------------------------------------------------------------------------------ opcheck / compile


def test_opcheck_bsr_mm():
    gen = _gen(500)
    crow, col, blocks = _bsr_weight(32, 32, 16, 0.5, gen)
    torch.library.opcheck(OPS.bsr_mm_triton.default, (_randn((2, 32), gen), crow, col, blocks, _randn((32,), gen)))


def test_opcheck_sparse24_mm():
    gen = _gen(510)
    values, meta = _sparse24_weight(5, 16, gen)
    torch.library.opcheck(OPS.sparse24_mm_triton.default, (_randn((2, 16), gen), values, meta, _randn((5,), gen)))


def test_opcheck_csr_mm():
    gen = _gen(520)
    crow, col, values = _csr_weight(5, 9, 0.5, gen)
    torch.library.opcheck(OPS.csr_mm_triton.default, (_randn((2, 9), gen), crow, col, values, None))


def test_compiled_sparse_ops_match_eager():
    """torch.compile(fullgraph=True) traces every op (no graph break) and matches eager."""
    gen = _gen(600)
    bsr = _bsr_weight(32, 48, 16, 0.5, gen)
    s24 = _sparse24_weight(7, 48, gen)
    csr = _csr_weight(7, 48, 0.3, gen)
    bias = _randn((32,), gen)
    x = _randn((3, 48), gen)

    def f(x):
        return (OPS.bsr_mm_triton(x, *bsr, bias), OPS.sparse24_mm_triton(x, *s24, None),
                OPS.csr_mm_triton(x, *csr, None))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), f(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bsr", "sparse24", "csr"])
def test_registry_dispatch_and_autograd(fmt, monkeypatch):
    """BIGKERNELS_IMPL=triton routes the differentiable sparse ops to these kernels."""
    gen = _gen(700)
    monkeypatch.setenv("BIGKERNELS_IMPL", "triton")
    _registry.clear_choice_cache()
    try:
        kernel = {"bsr": "bsr_mm", "sparse24": "sparse24_mm", "csr": "csr_mm"}[fmt]
        assert _registry.choose(kernel, torch.device(DEVICE).type) == "triton"
        if fmt == "bsr":
            weight = _bsr_weight(32, 48, 16, 0.5, gen)
        elif fmt == "sparse24":
            weight = _sparse24_weight(32, 48, gen)
        else:
            weight = _csr_weight(32, 48, 0.3, gen)
        bias = _randn((32,), gen)
        x = _randn((5, 48), gen).requires_grad_()
        y = getattr(sparse_ops.torch.ops.bigkernels, f"{fmt}_linear")(x, *weight, bias)
        _assert_rel(y.detach(), getattr(ref, f"{fmt}_linear")(x.detach(), *weight, bias), 1e-5, fmt)
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    finally:
        monkeypatch.undo()
        _registry.clear_choice_cache()
