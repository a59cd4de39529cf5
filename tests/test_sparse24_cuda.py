"""The cuSPARSELt 2:4 sparse tensor-core ops (csrc/sparse/sparse24_cuda.cpp, schemas in
bigkernels/ops/sparse_cuda.py) on a GPU: ``sparse24_compress`` + ``sparse24_cslt_mm`` against the
dense masked weight (bigkernels.reference.sparse), called through the dispatcher.

What this file is after: bf16/fp16, M in {0, 1, 3, 16, 2048} (M not a multiple of 8 takes the
zero-padded copy of x), bias / no bias, non-contiguous and misaligned x, the plan cache (a second
call of the same shape; another weight and bias of the same shape; a bias changed in place), the
current stream, opcheck, and clear errors: a weight that is not 2:4, bad shapes / dtypes, a
compressed buffer of the wrong size, and GPUs older than sm_80.

Tolerance (DESIGN.md): error against the fp32 reference at most 2x the error of the same product run
in the dtype (F.linear on the dense masked weight, cuBLAS).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bigkernels.ops  # noqa: F401  (defines the ops and loads bigkernels._C)
from bigkernels.ops import _registry
from bigkernels.ops.sparse_cuda import CSLT_MM, sparse24_supported
from bigkernels.reference import sparse as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
ROWS = [0, 1, 3, 16, 2048]
SHAPES = [(128, 256), (1024, 2048)]  # (N, K): weight [N, K]


def _require() -> None:
    if not _registry.has_kernel(CSLT_MM, "CUDA"):
        pytest.skip("no CUDA kernel registered for bigkernels::sparse24_cslt_mm (built without cuSPARSELt)")
    if not sparse24_supported(DEV):
        pytest.skip(f"2:4 sparse tensor cores need sm_80+, this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}")


def _weight_24(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A random weight with exactly 2 non-zeros (random positions) in every group of 4 along K."""
    w = torch.randn(n, k, device=DEV)
    keep = torch.rand(n, k // 4, 4, device=DEV).argsort(dim=2)[..., :2]
    mask = torch.zeros(n, k // 4, 4, device=DEV, dtype=torch.bool).scatter_(2, keep, True).reshape(n, k)
    return (w * mask).to(dtype)


def _poison_allocator(nbytes: int) -> None:
    for _ in range(2):
        torch.empty(max(nbytes, 1), dtype=torch.uint8, device=DEV).fill_(0xFF)  # NaN in fp16 / bf16


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias, what: str) -> None:
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == x.dtype and out.device == x.device, what
    assert out.is_contiguous(), what
    if out.numel() == 0:
        return
    # the format's own reference (values + meta) agrees with the dense masked weight
    values, meta = ref.to_sparse24(w)
    exact = x.float() @ ref.from_sparse24(values, meta).float().T + (bias.float() if bias is not None else 0)
    in_dtype = F.linear(x, w, bias)
    err = (out.float() - exact).abs().max().item()
    err_ref = (in_dtype.float() - exact).abs().max().item()
    bound = 2 * err_ref + 1e-6 * exact.abs().max().item()
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element left unwritten?)"
    assert err <= bound, f"{what}: max |err| {err:.3g} > 2 x the {x.dtype} reference's {err_ref:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}K{s[1]}")
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_matches_dense_masked_reference(dtype, shape, m, has_bias):
    _require()
    n, k = shape
    w = _weight_24(n, k, dtype)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    bias = torch.randn(n, device=DEV, dtype=dtype) if has_bias else None
    c = torch.ops.bigkernels.sparse24_compress(w)
    assert c.dtype == torch.uint8 and c.dim() == 1 and c.device == w.device
    assert c.numel() >= n * k  # the kept half of a 16-bit weight, plus metadata
    _poison_allocator(m * n * 2 + 4096)
    out = torch.ops.bigkernels.sparse24_cslt_mm(x, c, n, bias)
    torch.cuda.synchronize()
    _check(out, x, w, bias, f"M={m} N={n} K={k} {dtype} bias={has_bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_cache_reuse(dtype):
    """Same shape twice: identical results; another weight and bias of the same shape: their own
    result (the cached plan must not keep the first bias); a bias changed in place: the new values."""
    _require()
    n, k, m = 256, 512, 16
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    w1, w2 = _weight_24(n, k, dtype), _weight_24(n, k, dtype)
    b1, b2 = torch.randn(n, device=DEV, dtype=dtype), torch.randn(n, device=DEV, dtype=dtype)
    c1, c2 = torch.ops.bigkernels.sparse24_compress(w1), torch.ops.bigkernels.sparse24_compress(w2)
    first = torch.ops.bigkernels.sparse24_cslt_mm(x, c1, n, b1)
    second = torch.ops.bigkernels.sparse24_cslt_mm(x, c1, n, b1)
    assert torch.equal(first, second), "the second call of the same shape differs"
    _check(torch.ops.bigkernels.sparse24_cslt_mm(x, c2, n, b2), x, w2, b2, "second weight and bias")
    _check(torch.ops.bigkernels.sparse24_cslt_mm(x, c1, n, None), x, w1, None, "same shape without bias")
    _check(torch.ops.bigkernels.sparse24_cslt_mm(x, c1, n, b1), x, w1, b1, "first again")
    b1.mul_(-3).add_(1)
    _check(torch.ops.bigkernels.sparse24_cslt_mm(x, c1, n, b1), x, w1, b1, "bias changed in place")
    # other M of the same weight: other plans, same weight buffer
    for mm in (1, 24, 16):
        xm = torch.randn(mm, k, device=DEV, dtype=dtype)
        _check(torch.ops.bigkernels.sparse24_cslt_mm(xm, c1, n, b1), xm, w1, b1, f"M={mm}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_and_misaligned_inputs(dtype):
    _require()
    n, k, m = 128, 256, 32
    w = _weight_24(n, k, dtype)
    c = torch.ops.bigkernels.sparse24_compress(w)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    _check(torch.ops.bigkernels.sparse24_cslt_mm(xt, c, n, None), x, w, None, "transposed x")
    buf = torch.empty(x.numel() + 1, device=DEV, dtype=dtype)
    xo = buf[1:].view(m, k)
    xo.copy_(x)
    assert xo.data_ptr() % 16 != 0
    bias = torch.randn(n, device=DEV, dtype=torch.float32)  # another float dtype: converted to x's
    out = torch.ops.bigkernels.sparse24_cslt_mm(xo, c, n, bias)
    _check(out, x, w, bias.to(dtype), "misaligned x, fp32 bias")
    wc = torch.ops.bigkernels.sparse24_compress(w.t().contiguous().t())  # compressed from a non-contiguous view
    _check(torch.ops.bigkernels.sparse24_cslt_mm(x, wc, n, None), x, w, None, "column-major weight view")


def test_current_stream():
    _require()
    n, k, m = 256, 512, 64
    dtype = torch.bfloat16
    w = _weight_24(n, k, dtype)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        c = torch.ops.bigkernels.sparse24_compress(w)
        out = torch.ops.bigkernels.sparse24_cslt_mm(x, c, n, None)
    side.synchronize()
    _check(out, x, w, None, "side stream")


def test_not_24_weight_is_rejected():
    _require()
    w = _weight_24(64, 128, torch.bfloat16)
    w[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=w.dtype)  # 3 non-zeros in one group
    with pytest.raises(RuntimeError, match="not 2:4 sparse"):
        torch.ops.bigkernels.sparse24_compress(w)
    dense = torch.randn(64, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not 2:4 sparse"):
        torch.ops.bigkernels.sparse24_compress(dense)


def test_bad_input_errors():
    _require()
    w = _weight_24(64, 128, torch.bfloat16)
    c = torch.ops.bigkernels.sparse24_compress(w)
    x = torch.randn(4, 128, device=DEV, dtype=torch.bfloat16)
    cases = [
        (lambda: torch.ops.bigkernels.sparse24_compress(w.float()), "float16 or bfloat16"),
        (lambda: torch.ops.bigkernels.sparse24_compress(w[:, :120]), "multiples of 16"),
        (lambda: torch.ops.bigkernels.sparse24_compress(w[0]), "2-D"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x.float(), c, 64, None), "float16 or bfloat16"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x[:, :112], c, 64, None), "bytes"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x, c[:-16], 64, None), "bytes"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x, c, 48, None), "bytes"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x, c, 60, None), "multiples of 16"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x, c.view(torch.int8), 64, None), "uint8"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x, c, 64, torch.randn(32, device=DEV)), "bias of shape"),
        (lambda: torch.ops.bigkernels.sparse24_cslt_mm(x, c, 64, torch.randn(64)), "bias on"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_old_gpu_raises_clear_error():
    if not _registry.has_kernel(CSLT_MM, "CUDA"):
        pytest.skip("built without cuSPARSELt")
    if torch.cuda.get_device_capability() >= (8, 0):
        assert sparse24_supported(DEV)
        pytest.skip("this GPU has sparse tensor cores")
    assert not sparse24_supported(DEV)
    w = torch.zeros(64, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="sm_80"):
        torch.ops.bigkernels.sparse24_compress(w)


def test_sparse24_supported_without_gpu_device():
    assert not sparse24_supported("cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    _require()
    n, k = 128, 256
    w = _weight_24(n, k, dtype)
    c = torch.ops.bigkernels.sparse24_compress(w)
    for m, bias in ((16, torch.randn(n, device=DEV, dtype=dtype)), (5, None)):
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        torch.library.opcheck(torch.ops.bigkernels.sparse24_cslt_mm.default, (x, c, n, bias))
    # the compressed size is data-dependent to the fake implementation (an unbacked SymInt)
    torch.library.opcheck(torch.ops.bigkernels.sparse24_compress.default, (w,),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
