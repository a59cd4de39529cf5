"""The sparse linear kernel ops (torch.ops.bigkernels.csr_mm / bsr_mm / sparse24_mm) against
bigkernels.reference.sparse on every device's compiled kernel: dtypes x shapes (odd, empty,
non-contiguous), sparsity 50% / 90% / all-zero rows, every CPU instruction set, both CPU paths
(small M: gathers / dot products; larger M: x chunks / broadcasts), opcheck,
torch.compile(fullgraph=True) and rejected input."""
from __future__ import annotations

import pytest
import torch

from bigkernels.reference import sparse as ref
from conftest import assert_close, devices, require_kernel

ops = torch.ops.bigkernels
# (x dtype, weight dtype): the weights are stored in x's dtype or in fp32
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["f32", "bf16", "bf16-w32"]
SPARSITY = [0.5, 0.9, 1.0]
# (M, K, N): K, N not multiples of any vector width; M = 0, 1, the small-M paths (M < 4) and the
# chunked / broadcast paths (M >= 4) with partial chunks
SHAPES = [(0, 124, 77), (1, 124, 77), (5, 124, 77), (3, 64, 9), (37, 200, 33)]


def _x(M, K, dtype, device, noncontig):
    x = torch.randn(M, K, device=device) * torch.rand(M, 1, device=device).add_(0.1) * 3
    if noncontig:  # every other column of a wider matrix
        wide = torch.full((M, 2 * K), float("nan"), device=device, dtype=dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.to(dtype)


def _bias(N, i, x_dtype, device):
    return [None, torch.randn(N, device=device), torch.randn(N, device=device).to(x_dtype)][i % 3]


def _up(t):
    return None if t is None else t.float()


def _check(got, x, fmt, bias, reference, what):
    """fp32: <= 1e-5 relative; 16-bit: error vs the fp32 reference at most 2x the reference's own
    error when it runs in the low dtype."""
    assert got.dtype == x.dtype
    want = reference(x.float(), *[_up(t) if t.is_floating_point() else t for t in fmt], _up(bias))
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    assert not torch.isnan(got).any(), f"{what}: NaN in the output"
    if x.dtype == torch.float32:
        mag = want.abs().max().item()
        assert_close(got, want, rtol=1e-5, atol=1e-5 * mag + 1e-7, what=what)
        return
    low = reference(x, *fmt, bias)
    own = (low.double() - want.double()).abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= 2 * own + 1e-6, f"{what}: error {err:.3g} > 2x the reference's own error {own:.3g}"


def _pruned(N, K, sparsity, device):
    w = torch.randn(N, K, device=device)
    return w * (torch.rand(N, K, device=device) >= sparsity)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITY, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_csr_mm(device, dtypes, sparsity, shape, cpu_isa):
    require_kernel("csr_mm", device)
    (M, K, N), (xdt, wdt) = shape, dtypes
    w = _pruned(N, K, sparsity, device)
    if sparsity < 1.0 and N > 3:
        w[2] = 0  # an all-zero row among non-empty ones
    crow, col, values = ref.to_csr(w.to(wdt))
    x = _x(M, K, xdt, device, noncontig=(M % 2 == 1))
    bias = _bias(N, M + int(sparsity * 10), xdt, device)
    got = ops.csr_mm(x, crow, col, values, bias)
    _check(got, x, (crow, col, values), bias, ref.csr_linear, "csr_mm")


BSR_SHAPES = [  # (M, K, N, B): B = 24 leaves a lane tail on every vector width
    (0, 64, 32, 16), (1, 48, 80, 16), (5, 64, 48, 16), (13, 96, 32, 16),
    (1, 128, 192, 64), (7, 192, 128, 64), (2, 48, 72, 24), (9, 72, 48, 24),
    (17, 96, 48, 16), (23, 72, 48, 24),  # from 16 rows: the engine (AVX2) or broadcasts on a transposed block row
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITY, ids=str)
@pytest.mark.parametrize("shape", BSR_SHAPES, ids=str)
def test_bsr_mm(device, dtypes, sparsity, shape, cpu_isa):
    require_kernel("bsr_mm", device)
    (M, K, N, B), (xdt, wdt) = shape, dtypes
    keep = torch.rand(N // B, 1, K // B, 1, device=device) >= sparsity
    if sparsity < 1.0:
        keep[0, 0, 0, 0] = True  # at least one block
    w = torch.randn(N, K, device=device) * keep.expand(N // B, B, K // B, B).reshape(N, K)
    crow, col, blocks = ref.to_bsr(w.to(wdt), B)
    x = _x(M, K, xdt, device, noncontig=(M % 2 == 1))
    bias = _bias(N, M + int(sparsity * 10), xdt, device)
    got = ops.bsr_mm(x, crow, col, blocks, bias)
    _check(got, x, (crow, col, blocks), bias, ref.bsr_linear, "bsr_mm")
    if M >= 16 and device == "cpu":  # the broadcasts where the engine would run (AVX-512 has none)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BIGKERNELS_PANEL_MIN_ROWS", "1000000")
            _check(ops.bsr_mm(x, crow, col, blocks, bias), x, (crow, col, blocks), bias, ref.bsr_linear,
                   "bsr_mm broadcasts")


# M < 8: the in-lane-permute tiles of 4, 3, 2 and 1 rows (7 = 4 + 3), K with and without a tail
# past its multiples of 16; M >= 8: rows along the lanes
SPARSE24_SHAPES = [(0, 124, 77), (1, 124, 77), (5, 124, 77), (9, 64, 20), (2, 4, 3), (6, 260, 17), (7, 48, 13)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITY, ids=str)
@pytest.mark.parametrize("shape", SPARSE24_SHAPES, ids=str)
def test_sparse24_mm(device, dtypes, sparsity, shape, cpu_isa):
    """sparsity 0.5: exactly 2 of 4 kept; 0.9: 2:4 plus further zeros; 1.0: all-zero weights."""
    require_kernel("sparse24_mm", device)
    (M, K, N), (xdt, wdt) = shape, dtypes
    g = torch.randn(N, K // 4, 4, device=device)
    keep = torch.zeros_like(g).scatter_(2, torch.rand_like(g).argsort(-1)[..., :2], 1.0)
    w = (g * keep).reshape(N, K)
    if sparsity > 0.5:
        w = w * (torch.rand(N, K, device=device) >= (sparsity - 0.5) * 2)
    values, meta = ref.to_sparse24(w.to(wdt))
    if M % 2 == 1:  # non-contiguous weights too
        values = torch.cat([values, values], dim=1)[:, : K // 2]
    x = _x(M, K, xdt, device, noncontig=(M % 2 == 1))
    bias = _bias(N, M + int(sparsity * 10), xdt, device)
    got = ops.sparse24_mm(x, values, meta, bias)
    _check(got, x, (values, meta), bias, ref.sparse24_linear, "sparse24_mm")


def _small_args(device, dtype=torch.float32):
    M, K, N = 5, 64, 32
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = _pruned(N, K, 0.7, device).to(dtype)
    bias = torch.randn(N, device=device)
    g = torch.randn(N, K // 4, 4, device=device)
    w24 = (g * torch.zeros_like(g).scatter_(2, torch.rand_like(g).argsort(-1)[..., :2], 1.0)).reshape(N, K)
    wb = torch.randn(N, K, device=device) * torch.tensor([1.0, 0.0], device=device).repeat_interleave(16)[:, None]
    return {"csr_mm": (x, *ref.to_csr(w), bias), "bsr_mm": (x, *ref.to_bsr(wb.to(dtype), 16), bias),
            "sparse24_mm": (x, *ref.to_sparse24(w24.to(dtype)), bias)}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", ["csr_mm", "bsr_mm", "sparse24_mm"])
def test_opcheck(device, op):
    require_kernel(op, device)
    torch.library.opcheck(getattr(ops, op).default, _small_args(device)[op])
    x1 = _small_args(device)[op]
    torch.library.opcheck(getattr(ops, op).default, (x1[0][:1],) + x1[1:])  # M = 1 path


@pytest.mark.parametrize("device", devices())
def test_compiles_fullgraph(device):
    for op in ("csr_mm", "bsr_mm", "sparse24_mm"):
        require_kernel(op, device)
    torch._dynamo.reset()
    a = _small_args(device)

    def f(x):
        return (ops.csr_mm(x, *a["csr_mm"][1:]) + ops.bsr_mm(x, *a["bsr_mm"][1:])
                + ops.sparse24_mm(x, *a["sparse24_mm"][1:]))

    x = a["csr_mm"][0]
    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x)
    assert_close(got, want, rtol=0, atol=0, what="compiled output")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("M", [1, 8], ids=["gather", "chunks"])
def test_bad_input_is_rejected(device, M, cpu_isa):
    for op in ("csr_mm", "bsr_mm", "sparse24_mm"):
        require_kernel(op, device)
    a = _small_args(device)
    x = a["csr_mm"][0][:1].expand(M, -1).clone()
    crow, col, values, bias = a["csr_mm"][1:]
    bcrow, bcol, blocks, _ = a["bsr_mm"][1:]
    v24, meta, _ = a["sparse24_mm"][1:]
    K = x.shape[1]

    def with_col(i, v):
        c = col.clone()
        c[i] = v
        return c

    bad_crow = crow.clone()
    bad_crow[3] = bad_crow[4] + 1
    bad_bcol = bcol.clone()
    bad_bcol[-1] = K // 16
    cases = [
        (lambda: ops.csr_mm(x[None], crow, col, values, bias), "x"),
        (lambda: ops.csr_mm(x.int(), crow, col, values, bias), "x"),
        (lambda: ops.csr_mm(x, crow.int(), col, values, bias), "crow"),
        (lambda: ops.csr_mm(x, crow, col.long(), values, bias), "col"),
        (lambda: ops.csr_mm(x, crow, col, values.half(), bias), "values"),
        (lambda: ops.csr_mm(x.bfloat16(), crow, col, values.half(), None), "values"),
        (lambda: ops.csr_mm(x, crow, col[:-1], values, bias), "col"),
        (lambda: ops.csr_mm(x, crow[:-1], col, values, bias[:-1]), "crow"),
        (lambda: ops.csr_mm(x, bad_crow, col, values, bias), "crow"),
        (lambda: ops.csr_mm(x, crow, with_col(0, K), values, bias), "col"),  # in a vector of 16
        (lambda: ops.csr_mm(x, crow, with_col(-1, -1), values, bias), "col"),  # in a row's tail
        (lambda: ops.csr_mm(x, crow, with_col(len(col) // 2, 1 << 30), values, bias), "col"),
        (lambda: ops.csr_mm(x, crow, col, values, bias[:-1]), "bias"),
        (lambda: ops.csr_mm(x, crow, col, values, bias.half()), "bias"),
        (lambda: ops.bsr_mm(x, bcrow, bcol, blocks[0], bias), "blocks"),
        (lambda: ops.bsr_mm(x, bcrow, bcol, blocks[:, :8], bias), "blocks"),
        (lambda: ops.bsr_mm(x[:, :40], bcrow, bcol, blocks, bias), "K"),
        (lambda: ops.bsr_mm(x, bcrow, bad_bcol, blocks, bias), "col"),
        (lambda: ops.bsr_mm(x, bcrow, bcol[:-1], blocks, bias), "col"),
        (lambda: ops.bsr_mm(x, bcrow, bcol, blocks, bias[:-2]), "bias"),
        (lambda: ops.sparse24_mm(x, v24, meta.to(torch.int8), bias), "meta"),
        (lambda: ops.sparse24_mm(x, v24, meta[:, :-1], bias), "meta"),
        (lambda: ops.sparse24_mm(x[:, :-2], v24, meta, bias), "K"),
        (lambda: ops.sparse24_mm(x, v24.half(), meta, bias), "values"),
        (lambda: ops.sparse24_mm(x, v24, meta, bias[None]), "bias"),
    ]
    for i, (call, name) in enumerate(cases):
        with pytest.raises(RuntimeError, match=name):
            call()


def test_large_k_and_many_threads_match():
    """A decode-sized problem (K = 4096) on the best CPU kernels: every path's sums stay within
    the fp32 tolerance and the gather / chunk paths agree."""
    require_kernel("csr_mm", "cpu")
    K, N = 4096, 96
    w = _pruned(N, K, 0.9, "cpu")
    fmt = ref.to_csr(w)
    for M in (1, 3, 4, 17):
        x = torch.randn(M, K)
        _check(ops.csr_mm(x, *fmt, None), x, fmt, None, ref.csr_linear, f"csr_mm M={M}")


# The AVX2 engines (sparse_cpu_panels.h; BSR from 16 rows, CSR from 48 rows at >= 40% stored, 2:4
# from 4 rows): several row blocks (> 264 rows), k blocks (> 256 inputs; BSR: one per block) and
# feature blocks (> 128, not a multiple of 16), row groups of 16 and 32 with partial ones (2:4),
# every weight dtype.
ENGINE_SHAPES = [(16, 520, 150), (50, 264, 40), (300, 136, 133)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ENGINE_SHAPES, ids=str)
def test_engines(dtypes, shape, cpu_isa):
    for op in ("csr_mm", "bsr_mm", "sparse24_mm"):
        require_kernel(op, "cpu")
    (M, K, N), (xdt, wdt) = shape, dtypes
    x = _x(M, K, xdt, "cpu", noncontig=(M % 2 == 1))
    bias = _bias(N, M, xdt, "cpu")
    w = _pruned(N, K, 0.4, "cpu")  # dense enough for the CSR engine
    w[3] = 0
    fmt = ref.to_csr(w.to(wdt))
    _check(ops.csr_mm(x, *fmt, bias), x, fmt, bias, ref.csr_linear, "csr_mm")
    for B in (8, 24):  # one 16-feature strip spans block rows; several blocks per k block
        Nb, Kb = N // B * B, K // B * B
        keep = torch.rand(Nb // B, 1, Kb // B, 1) >= 0.5
        wb = torch.randn(Nb, Kb) * keep.expand(Nb // B, B, Kb // B, B).reshape(Nb, Kb)
        fmt = ref.to_bsr(wb.to(wdt), B)
        xb = x[:, :Kb]
        _check(ops.bsr_mm(xb, *fmt, bias if bias is None else bias[:Nb]), xb, fmt,
               bias if bias is None else bias[:Nb], ref.bsr_linear, f"bsr_mm B={B}")
    if K % 64 == 0:  # B = 64: one block per k block, missing ones skipped
        keep = torch.rand(N // 64 or 1, 1, K // 64, 1) >= 0.7
        keep[0, 0, 0, 0] = True
        Nb = keep.shape[0] * 64
        wb = torch.randn(Nb, K) * keep.expand(-1, 64, -1, 64).reshape(Nb, K)
        fmt = ref.to_bsr(wb.to(wdt), 64)
        b = None if bias is None else torch.randn(Nb).to(bias.dtype)
        _check(ops.bsr_mm(x, *fmt, b), x, fmt, b, ref.bsr_linear, "bsr_mm B=64")
    g = torch.randn(N, K // 4, 4)
    w24 = (g * torch.zeros_like(g).scatter_(2, torch.rand_like(g).argsort(-1)[..., :2], 1.0)).reshape(N, K)
    fmt = ref.to_sparse24(w24.to(wdt))
    _check(ops.sparse24_mm(x, *fmt, bias), x, fmt, bias, ref.sparse24_linear, "sparse24_mm")


def test_csr_engine_takes_unsorted_rows_and_reports_bad_columns(cpu_isa):
    """CSR rows in any column order give the same product on the engine's batch sizes; a column
    outside [0, K) is still reported."""
    require_kernel("csr_mm", "cpu")
    M, K, N = 60, 300, 40
    w = _pruned(N, K, 0.4, "cpu")
    crow, col, values = ref.to_csr(w)
    perm = torch.cat([torch.randperm(int(crow[r + 1] - crow[r])) + crow[r] for r in range(N)])
    col_u, values_u = col[perm], values[perm]
    assert not torch.equal(col_u, col)
    x = torch.randn(M, K)
    _check(ops.csr_mm(x, crow, col_u, values_u, None), x, (crow, col_u, values_u), None, ref.csr_linear,
           "csr_mm unsorted")
    for bad in (K, -1):
        col_b = col.clone()
        col_b[int(crow[5]) + 1] = bad
        with pytest.raises(RuntimeError, match="col"):
            ops.csr_mm(x, crow, col_b, values, None)


@pytest.mark.parametrize("M", [1, 2, 3, 9])
def test_csr_small_batches_report_bad_columns_without_reading_outside_x(M, cpu_isa):
    """The small-batch kernels check each vector of column indices before loading x through it:
    an index anywhere in a row (in a whole vector of indices or in the row's tail), however far
    outside [0, K), is reported and nothing is read at it (2**31 - 1 would be 8 GB past x)."""
    require_kernel("csr_mm", "cpu")
    K, N = 50, 7
    w = torch.randn(N, K)
    w[torch.rand(N, K) < 0.3] = 0
    w[:, :20] = torch.randn(N, 20)  # every row has at least 20 entries: whole vectors (8, 16 lanes) and a tail
    crow, col, values = ref.to_csr(w)
    x = torch.randn(M, K)
    _check(ops.csr_mm(x, crow, col, values, None), x, (crow, col, values), None, ref.csr_linear, "csr_mm")
    for row, offset in ((0, 0), (3, 5), (6, -1)):
        for bad in (K, -1, 2 ** 31 - 1, -(2 ** 31)):
            col_b = col.clone()
            col_b[int(crow[row + 1]) - 1 if offset < 0 else int(crow[row]) + offset] = bad
            with pytest.raises(RuntimeError, match="col"):
                ops.csr_mm(x, crow, col_b, values, None)


@pytest.mark.parametrize("density", [0.3, 0.5])
def test_csr_engine_and_x_chunk_kernel_agree(density, monkeypatch):
    """Both large-batch CSR kernels (decoded panels; per-entry FMAs on x chunks) give the product,
    whichever the density threshold picks (BIGKERNELS_CSR_PANEL_DENSITY forces either)."""
    require_kernel("csr_mm", "cpu")
    M, K, N = 70, 2100, 24  # K * 32 rows * 4 bytes > 256 KB: the wide-K threshold
    w = _pruned(N, K, 1 - density, "cpu")
    crow, col, values = ref.to_csr(w)
    x = torch.randn(M, K)
    for forced in ("0", "2", None):
        if forced is None:
            monkeypatch.delenv("BIGKERNELS_CSR_PANEL_DENSITY", raising=False)
        else:
            monkeypatch.setenv("BIGKERNELS_CSR_PANEL_DENSITY", forced)
        _check(ops.csr_mm(x, crow, col, values, None), x, (crow, col, values), None, ref.csr_linear, f"csr_mm threshold {forced}")


# ----- the dense weight from a format (the layers' "decompress" path and the ops' backward) -----
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 124), (5, 4), (9, 12), (0, 8), (3, 0), (64, 1024)], ids=str)
def test_to_dense_equals_the_reference_bit_for_bit(device, dtype, shape, cpu_isa):
    N, K = shape
    torch.manual_seed(N * 1000 + K)
    # any 2 of every 4 (a random pair per group), some groups all zero; K = 4, 12: odd group counts
    keep = torch.rand(N, K // 4, 4, device=device).argsort(-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, device=device).scatter_(-1, keep, 1.0)
    w24 = torch.randn(N, K // 4, 4, device=device) * mask * (torch.rand(N, K // 4, 1, device=device) > 0.1)
    w24 = w24.reshape(N, K).to(dtype)
    values, meta = ref.to_sparse24(w24)
    got = ops.sparse24_to_dense(values, meta)
    assert got.dtype == dtype and torch.equal(got, ref.from_sparse24(values, meta)) and torch.equal(got, w24)
    w = _pruned(N, K, 0.7, device).to(dtype)
    crow, col, vals = ref.to_csr(w)
    got = ops.csr_to_dense(crow, col, vals, K)
    assert got.dtype == dtype and torch.equal(got, w)


@pytest.mark.parametrize("device", devices())
def test_to_dense_ops_opcheck_and_bad_input(device):
    w = _pruned(20, 16, 0.5, device)
    crow, col, vals = ref.to_csr(w)
    torch.library.opcheck(ops.csr_to_dense.default, (crow, col, vals, 16))
    w24 = w.reshape(20, 4, 4).clone()
    w24[..., 2:] = 0
    values, meta = ref.to_sparse24(w24.reshape(20, 16))
    torch.library.opcheck(ops.sparse24_to_dense.default, (values, meta))
    torch._dynamo.reset()

    def f(v, m, c, k, x):
        return ops.sparse24_to_dense(v, m) + ops.csr_to_dense(c, k, x, 16)

    args = (values.t().contiguous().t(), meta, crow, col, vals)  # (values non-contiguous)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert_close(got, f(*args), rtol=0, atol=0, what="compiled to_dense")
    assert_close(got, ref.from_sparse24(values, meta) + w, rtol=0, atol=0, what="to_dense sum")
    if device == "cpu":  # the C++ kernel's errors (other devices run the reference)
        bad = col.clone()
        bad[3] = 16
        with pytest.raises(RuntimeError, match="col"):
            ops.csr_to_dense(crow, bad, vals, 16)
        with pytest.raises(RuntimeError, match="meta"):
            ops.sparse24_to_dense(values, meta[:, :-1])
        with pytest.raises(RuntimeError, match="values"):
            ops.sparse24_to_dense(values.int(), meta)
