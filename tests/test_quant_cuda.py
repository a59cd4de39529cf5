"""The CUDA C++ int8 kernels (csrc/quant/quant_cuda*.{cpp,cu}) against bigkernels.reference.quant,
on a GPU: ``quantize_per_token`` and ``w8a16_mm`` called through the dispatcher
(``torch.ops.bigkernels.*``, whose CUDA key the extension registers).

What this file is after: odd shapes (K and N not multiples of 16, 64, 128 or 256; K = 1), the row
counts around the GEMV's 16-row launches (0, 1, 3, 16, 17, 40), the 16-byte-vector paths and their
scalar fallbacks (views one element past an aligned address, K % 16 != 0), non-contiguous x,
zero / NaN / inf rows, split-K (small N, long K), a large layer (4096 x 14336) once, the bias in
every float dtype, the current stream, opcheck, and clear errors for bad input.

Tolerances (DESIGN.md): quantisation codes off by at most 1 in at most 1 of 500 elements (scales
exact); fp32 GEMV within 1e-5 of the fp32 reference (relative to the output's magnitude);
bf16/fp16 GEMV: error against the fp32 reference at most 2x the error of the same computation run
in that dtype (F.linear on the dequantised weight).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bigkernels.ops  # noqa: F401  (defines the ops and loads bigkernels._C)
from bigkernels.ops import _registry
from bigkernels.reference import quant as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [0, 1, 3, 16, 17, 40]


def _require(op: str) -> None:
    if not _registry.has_kernel(f"bigkernels::{op}", "CUDA"):
        pytest.skip(f"no CUDA kernel registered for bigkernels::{op} (extension built without CUDA)")


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN bytes in the caching allocator's next blocks, so output elements a kernel forgets
    to write show up as garbage (outputs are allocated by the op itself)."""
    for _ in range(2):
        torch.empty(max(nbytes, 1), dtype=torch.uint8, device=DEV).fill_(0xFF)  # 0xFF..: NaN in every float type


def _view_at_offset(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """The same values in a contiguous view `offset` elements past an aligned allocation."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    v = buf[offset:offset + t.numel()].view(t.shape)
    v.copy_(t)
    assert v.is_contiguous() and (t.numel() == 0 or v.data_ptr() % 16 != 0)
    return v


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous (column-major) view."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous() or t.shape[0] <= 1 or t.shape[1] <= 1
    return v


# ----- quantize_per_token ------------------------------------------------------------------------
def _check_quant(x: torch.Tensor) -> None:
    _poison_allocator(x.numel() + 4 * x.shape[0] + 1024)
    q, s = torch.ops.bigkernels.quantize_per_token(x)
    torch.cuda.synchronize()
    # The reference on the CPU copy: the semantics, independent of how this GPU divides.
    q_ref, s_ref = (t.to(DEV) for t in ref.quantize_per_token(x.cpu()))
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (x.shape[0],)
    assert q.is_contiguous() and s.is_contiguous()
    nan = torch.isnan(s_ref)
    assert torch.equal(torch.isnan(s), nan), "NaN scales differ"
    assert torch.equal(s[~nan], s_ref[~nan]), f"scales differ: max |diff| {(s - s_ref)[~nan].abs().max()}"
    diff = (q.int() - q_ref.int()).abs()
    if diff.numel() == 0:
        return
    assert int(diff.max()) <= 1, f"a code is off by {int(diff.max())}"
    off = int((diff != 0).sum())
    assert off * 500 <= max(diff.numel(), 1), f"{off}/{diff.numel()} codes off by one (> 1 in 500)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K", [1, 7, 123, 1000, 1024, 4097])
def test_quantize_per_token_matches_reference(dtype, M, K):
    _require("quantize_per_token")
    x = (torch.randn(M, K, device=DEV) * 3).to(dtype)
    _check_quant(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_quantize_on_cuda_divides_like_cpu(dtype):
    """The reference is also the CUDA fallback: on CUDA it must give the CPU's (correctly rounded)
    scales and codes bit for bit. ATen's CUDA division by a Python scalar multiplies by the
    reciprocal, which was 1 ulp off for ~4.5% of rows."""
    x = (torch.randn(4096, 257, device=DEV) * 3).to(dtype)
    q_cuda, s_cuda = ref.quantize_per_token(x)
    q_cpu, s_cpu = ref.quantize_per_token(x.cpu())
    assert torch.equal(s_cuda.cpu(), s_cpu), f"{int((s_cuda.cpu() != s_cpu).sum())}/4096 scales differ"
    assert torch.equal(q_cuda.cpu(), q_cpu)
    w_int8, w_scale = ref.quantize_weight(x.float())
    w_int8_cpu, w_scale_cpu = ref.quantize_weight(x.float().cpu())
    assert torch.equal(w_scale.cpu(), w_scale_cpu) and torch.equal(w_int8.cpu(), w_int8_cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [9, 123, 4097])
def test_quantize_per_token_layouts(dtype, K):
    _require("quantize_per_token")
    x = torch.randn(17, K, device=DEV).to(dtype)
    _check_quant(_view_at_offset(x))  # misaligned rows: scalar head, vector body, scalar tail
    _check_quant(_transposed(x))  # non-contiguous
    _check_quant(torch.randn(17, 2 * K, device=DEV).to(dtype)[:, ::2])  # column stride 2
    _check_quant(torch.randn(40, K + 3, device=DEV).to(dtype)[:, 1:K + 1])  # row stride != K, offset rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [5, 300, 4096])
def test_quantize_per_token_special_rows(dtype, K):
    _require("quantize_per_token")
    x = torch.randn(6, K, device=DEV).to(dtype)
    x[1] = 0  # zero row: scale 0, codes 0
    x[2, K // 2] = float("nan")  # NaN row: scale NaN, codes 0
    x[3, 0] = float("inf")  # inf row: scale inf, codes 0 (inf/inf -> NaN -> 0)
    if dtype == torch.float32:
        x[4] = x[4] * 1e-38  # subnormal scale: 1/scale overflows, the kernel divides instead
    x[5, :] = 2.5  # constant row: every code 127
    _check_quant(x)
    q, s = torch.ops.bigkernels.quantize_per_token(x)
    assert s[1].item() == 0 and not q[1].any()
    assert torch.isnan(s[2]) and not q[2].any()
    assert not q[3].any()
    assert (q[5] == 127).all()


def test_quantize_per_token_rounds_half_to_even():
    _require("quantize_per_token")
    # absmax 127 -> scale 1: codes are round(x), ties to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=DEV)
    q, s = torch.ops.bigkernels.quantize_per_token(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def test_quantize_per_token_errors():
    _require("quantize_per_token")
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.bigkernels.quantize_per_token(torch.randn(2, 3, 4, device=DEV))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.bigkernels.quantize_per_token(torch.randn(2, 3, device=DEV).double())
    with pytest.raises(RuntimeError, match="K >= 1"):
        torch.ops.bigkernels.quantize_per_token(torch.empty(2, 0, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_per_token_opcheck(dtype):
    _require("quantize_per_token")
    torch.library.opcheck(torch.ops.bigkernels.quantize_per_token.default,
                          (torch.randn(5, 37, device=DEV).to(dtype),))


# ----- w8a16_mm -----------------------------------------------------------------------------------
def _weights(N: int, K: int):
    w_int8, w_scale = ref.quantize_weight(torch.randn(N, K, device=DEV) * 0.05)
    return w_int8, w_scale


def _check_w8a16(x, w_int8, w_scale, bias, what=""):
    M, N = x.shape[0], w_int8.shape[0]
    _poison_allocator(M * N * 4 + 1024)
    out = torch.ops.bigkernels.w8a16_mm(x, w_int8, w_scale, bias)
    torch.cuda.synchronize()
    assert out.dtype == x.dtype and out.shape == (M, N) and out.device == x.device, what
    expected = ref.w8a16_linear(x.float(), w_int8, w_scale, None if bias is None else bias.float())  # fp32
    if out.numel() == 0:
        return
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten elements?)"
    err = (out.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item() + 1e-30
    if x.dtype == torch.float32:
        assert err <= 1e-5 * scale, f"{what}: fp32 max |diff| {err:.3g} > 1e-5 x {scale:.3g}"
    else:
        w_deq = ref.dequantize_weight(w_int8, w_scale, x.dtype)
        same_dtype = F.linear(x, w_deq, None if bias is None else bias.to(x.dtype))
        ref_err = (same_dtype.double() - expected.double()).abs().max().item()
        # the final rounding to the dtype alone: half an ulp of the largest output
        ulp = torch.finfo(x.dtype).eps * scale
        bound = 2 * max(ref_err, ulp)
        assert err <= bound, f"{what}: {x.dtype} max |diff| {err:.3g} > 2 x reference-in-dtype error {ref_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("KN", [(4097, 33), (123, 77), (256, 128), (1024, 300), (64, 1)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_w8a16_mm_matches_reference(dtype, M, KN, with_bias):
    _require("w8a16_mm")
    K, N = KN
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_int8, w_scale = _weights(N, K)
    bias = torch.randn(N, device=DEV).to(dtype) if with_bias else None
    _check_w8a16(x, w_int8, w_scale, bias, f"M={M} K={K} N={N}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("KN", [(8192, 64), (14336, 256), (4096, 4096)], ids=str)
def test_w8a16_mm_split_k(dtype, M, KN):
    """Small N, long K: the grid splits K and a second kernel sums the partials."""
    _require("w8a16_mm")
    K, N = KN
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_int8, w_scale = _weights(N, K)
    _check_w8a16(x, w_int8, w_scale, torch.randn(N, device=DEV).to(dtype), f"M={M} K={K} N={N}")


@pytest.mark.parametrize("M", [1, 16])
def test_w8a16_mm_large(M):
    _require("w8a16_mm")
    K, N = 4096, 14336
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    w_int8, w_scale = _weights(N, K)
    _check_w8a16(x, w_int8, w_scale, torch.randn(N, device=DEV, dtype=torch.bfloat16), "4096x14336")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("KN", [(512, 130), (123, 77)], ids=str)
def test_w8a16_mm_layouts(dtype, M, KN):
    _require("w8a16_mm")
    K, N = KN
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_int8, w_scale = _weights(N, K)
    bias = torch.randn(N, device=DEV).to(dtype)
    _check_w8a16(_view_at_offset(x), w_int8, w_scale, bias, "misaligned x")
    _check_w8a16(x, _view_at_offset(w_int8), w_scale, bias, "misaligned w (byte-load path)")
    _check_w8a16(x, w_int8, _view_at_offset(w_scale), _view_at_offset(bias), "misaligned scale and bias")
    _check_w8a16(_transposed(x), w_int8, w_scale, bias, "non-contiguous x")
    xs = torch.randn(M, K + 5, device=DEV).to(dtype)[:, 2:K + 2]
    _check_w8a16(xs, w_int8, w_scale, bias, "row-strided x")
    ws = torch.randint(-127, 128, (N, K + 32), device=DEV, dtype=torch.int8)[:, 16:K + 16]
    _check_w8a16(x, ws, w_scale, bias, "row-strided w")
    _check_w8a16(x, _transposed(w_int8), w_scale, bias, "non-contiguous w")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_w8a16_mm_bias_and_scale_dtypes(dtype, bias_dtype):
    _require("w8a16_mm")
    x = torch.randn(3, 200, device=DEV).to(dtype)
    w_int8, w_scale = _weights(70, 200)
    _check_w8a16(x, w_int8, w_scale, torch.randn(70, device=DEV).to(bias_dtype), f"bias {bias_dtype}")
    _check_w8a16(x, w_int8, w_scale.to(bias_dtype), None, f"w_scale {bias_dtype}")


def test_w8a16_mm_degenerate_sizes():
    _require("w8a16_mm")
    w_int8, w_scale = _weights(9, 32)
    out = torch.ops.bigkernels.w8a16_mm(torch.randn(0, 32, device=DEV), w_int8, w_scale, None)
    assert out.shape == (0, 9)
    out = torch.ops.bigkernels.w8a16_mm(torch.randn(4, 32, device=DEV), w_int8[:0], w_scale[:0], None)
    assert out.shape == (4, 0)
    bias = torch.randn(9, device=DEV)
    out = torch.ops.bigkernels.w8a16_mm(torch.randn(4, 0, device=DEV), w_int8[:, :0], w_scale, bias)
    torch.testing.assert_close(out, bias.expand(4, 9), rtol=0, atol=0)  # K = 0: just the bias
    x = torch.randn(2, 32, device=DEV)
    x[1] = 0
    out = torch.ops.bigkernels.w8a16_mm(x, w_int8, w_scale, bias)
    torch.testing.assert_close(out[1], bias, rtol=0, atol=0)  # a zero row gives exactly the bias


def test_w8a16_mm_nan_row_stays_in_its_row():
    _require("w8a16_mm")
    x = torch.randn(4, 96, device=DEV)
    x[2, 5] = float("nan")
    w_int8, w_scale = _weights(40, 96)
    out = torch.ops.bigkernels.w8a16_mm(x, w_int8, w_scale, None)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()


def test_w8a16_mm_current_stream():
    _require("w8a16_mm")
    x = torch.randn(5, 4096, device=DEV, dtype=torch.bfloat16)
    w_int8, w_scale = _weights(512, 4096)
    expected = ref.w8a16_linear(x, w_int8, w_scale, None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = torch.ops.bigkernels.w8a16_mm(x, w_int8, w_scale, None)
    s.synchronize()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_w8a16_mm_errors():
    _require("w8a16_mm")
    x = torch.randn(3, 32, device=DEV)
    w_int8, w_scale = _weights(8, 32)
    with pytest.raises(RuntimeError, match="same K"):
        torch.ops.bigkernels.w8a16_mm(x, w_int8[:, :16], w_scale, None)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.bigkernels.w8a16_mm(x, w_int8.float(), w_scale, None)
    with pytest.raises(RuntimeError, match="w_scale of shape"):
        torch.ops.bigkernels.w8a16_mm(x, w_int8, w_scale[:4], None)
    with pytest.raises(RuntimeError, match="bias of shape"):
        torch.ops.bigkernels.w8a16_mm(x, w_int8, w_scale, torch.randn(3, device=DEV))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.bigkernels.w8a16_mm(x.double(), w_int8, w_scale, None)
    with pytest.raises(RuntimeError, match="w_int8 on"):
        torch.ops.bigkernels.w8a16_mm(x, w_int8.cpu(), w_scale, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 17])
def test_w8a16_mm_opcheck(dtype, M):
    _require("w8a16_mm")
    w_int8, w_scale = _weights(48, 80)
    x = torch.randn(M, 80, device=DEV).to(dtype)
    bias = torch.randn(48, device=DEV).to(dtype)
    torch.library.opcheck(torch.ops.bigkernels.w8a16_mm.default, (x, w_int8, w_scale, bias))
    torch.library.opcheck(torch.ops.bigkernels.w8a16_mm.default, (x, w_int8, w_scale, None))
