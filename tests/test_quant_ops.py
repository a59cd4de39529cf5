"""The int8 quantisation kernel ops (torch.ops.bigkernels.quantize_per_token / int8_mm /
int8_scaled_mm / w8a16_mm, and dense_mm, the same tiles with a float weight) against bigkernels.reference.quant on every device's compiled kernel:
dtypes x shapes (odd, empty, non-contiguous), every CPU instruction set, K = 65,536 exactness,
zero and NaN tokens, opcheck, torch.compile(fullgraph=True), and rejected input."""
from __future__ import annotations

import pytest
import torch

from bigkernels.reference import quant as ref
from conftest import assert_close, check_16bit, devices, has_kernel, poison_, require_kernel

ops = torch.ops.bigkernels
# (M, K, N): K and N not multiples of any tile (64-byte steps, 4 x 6 tiles), M = 0 and 1.
SHAPES = [(5, 123, 77), (1, 4097, 33), (0, 64, 16), (1, 64, 6), (13, 200, 7), (33, 130, 25)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _float(shape, dtype, device, noncontig=False):
    t = torch.randn(shape, device=device) * torch.rand(shape[:-1] + (1,), device=device).add_(0.1) * 4
    if noncontig:  # every other column of a wider matrix
        wide = torch.empty(shape[:-1] + (2 * shape[-1],), device=device, dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.to(dtype)


def _int8(shape, device, noncontig=False):
    t = torch.randint(-128, 128, shape, device=device, dtype=torch.int8)
    return t.t().contiguous().t() if noncontig and t.numel() > 1 else t  # column-major


def _weight(N, K, device):
    return ref.quantize_weight(torch.randn(N, K, device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_per_token(device, dtype, shape, cpu_isa):
    require_kernel("quantize_per_token", device)
    M, K, _ = shape
    x = _float((M, K), dtype, device, noncontig=(M % 2 == 1))
    if M >= 5:
        x[1] = 0  # an all-zero token
        x[3, K // 2] = float("nan")  # a NaN token
        x[4, 0] = x[4].abs().max() * 1.5  # a token whose absmax is its first element
    q, s = ops.quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (M, K) and s.shape == (M,)
    assert_close(s, rs, rtol=1e-6, atol=0, what="scale")
    off = (q.int() - rq.int()).abs()
    assert off.numel() == 0 or off.max().item() <= 1, "a quantised value is off by more than 1"
    assert int((off > 0).sum()) * 500 <= off.numel(), f"{int((off > 0).sum())} of {off.numel()} values off by 1"
    if M >= 5:
        assert s[1].item() == 0 and not q[1].any(), "an all-zero token must quantise to 0 with scale 0"
        assert torch.isnan(s[3]) and not torch.isnan(s[torch.arange(M, device=device) != 3]).any()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES + [(3, 65536, 5)], ids=str)
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
def test_int8_mm_is_exact(device, shape, noncontig, cpu_isa):
    require_kernel("int8_mm", device)
    M, K, N = shape
    a, b = _int8((M, K), device, noncontig), _int8((N, K), device)
    if M >= 2 and N >= 2:  # the largest magnitudes int8 allows: 128 * 128 * K
        a[0], b[0], a[1], b[1] = -128, -128, -128, 127
    got = ops.int8_mm(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.int8_mm(a, b))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_int8_scaled_mm(device, out_dtype, shape, with_bias, cpu_isa):
    require_kernel("int8_scaled_mm", device)
    M, K, N = shape
    x = _float((M, K), torch.float32, device)
    if M >= 2:
        x[1] = 0
    xq, xs = ref.quantize_per_token(x)
    if M % 2 == 1:
        xq = xq.t().contiguous().t()
    wq, ws = _weight(N, K, device)
    bias = torch.randn(N, device=device, dtype=out_dtype) if with_bias else None
    got = ops.int8_scaled_mm(xq, xs, wq, ws, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    if out_dtype == torch.float32:  # vs fp64 of the same quantised maths
        want = (xq.double() @ wq.double().T) * xs.double()[:, None] * ws.double()[None, :]
        want = want + bias.double() if with_bias else want
        assert_close(got, want, rtol=1e-5, atol=1e-6 * (want.abs().max().item() if want.numel() else 0),
                     what="int8_scaled_mm fp32")
    else:
        ref32 = ref.int8_scaled_mm(xq, xs, wq, ws, bias, torch.float32)
        check_16bit(got, ref32, ref.int8_scaled_mm(xq, xs, wq, ws, bias, out_dtype), "int8_scaled_mm")
    if M >= 2:  # an all-zero token gives exactly the bias
        assert torch.equal(got[1], bias if with_bias else torch.zeros_like(got[1]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_w8a16_mm(device, dtype, shape, cpu_isa):
    require_kernel("w8a16_mm", device)
    M, K, N = shape
    x = _float((M, K), dtype, device, noncontig=(M % 2 == 1))
    wq, ws = _weight(N, K, device)
    bias = torch.randn(N, device=device, dtype=dtype)
    got = ops.w8a16_mm(x, wq, ws, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    w64 = wq.double() * ws.double()[:, None]
    if dtype == torch.float32:  # vs fp64 of the same maths, relative to the sum of |terms|
        want = x.double() @ w64.T + bias.double()
        mag = (x.double().abs() @ w64.abs().T + bias.double().abs()).max().item() if want.numel() else 0
        assert_close(got, want, rtol=1e-5, atol=1e-5 * mag, what="w8a16_mm fp32")
    else:
        ref32 = ref.w8a16_linear(x.float(), wq, ws, bias.float())
        lowp = torch.nn.functional.linear(x, ref.dequantize_weight(wq, ws, dtype), bias)
        check_16bit(got, ref32, lowp, "w8a16_mm")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 1024, 1030), (40, 77, 9)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_dense_mm(device, dtype, shape, with_bias, cpu_isa):
    """F.linear with fp32 sums: odd shapes, M = 0 and 1, strided x rows, a column-major weight."""
    require_kernel("dense_mm", device)
    M, K, N = shape
    x = _float((M, K), dtype, device, noncontig=(M % 2 == 1))
    w = _float((N, K), dtype, device)
    if N % 2:
        w = w.t().contiguous().t()  # column-major: the binding copies it
    bias = torch.randn(N, device=device, dtype=dtype) if with_bias else None
    got = ops.dense_mm(x, w, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    b64 = bias.double() if with_bias else torch.zeros(N, device=device, dtype=torch.float64)
    if dtype == torch.float32:  # vs fp64 of the same maths, relative to the sum of |terms|
        want = x.double() @ w.double().T + b64
        mag = (x.double().abs() @ w.double().abs().T + b64.abs()).max().item() if want.numel() else 0
        assert_close(got, want, rtol=1e-5, atol=1e-5 * mag, what="dense_mm fp32")
    else:
        ref32 = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        check_16bit(got, ref32, torch.nn.functional.linear(x, w, bias), "dense_mm")
        assert_close(ref.dense_mm(x, w, bias).float(), ref32, rtol=1e-2, atol=1e-2, what="dense_mm reference")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w8a8_zero_and_nan_tokens_stay_in_their_rows(device, dtype, cpu_isa):
    for op in ("quantize_per_token", "int8_scaled_mm", "w8a16_mm"):
        require_kernel(op, device)
    M, K, N = 6, 200, 19
    x = _float((M, K), dtype, device)
    x[2] = 0
    x[4, 7] = float("nan")
    wq, ws = _weight(N, K, device)
    bias = torch.randn(N, device=device, dtype=dtype)
    xq, xs = ops.quantize_per_token(x)
    for out in (ops.int8_scaled_mm(xq, xs, wq, ws, bias, dtype), ops.w8a16_mm(x, wq, ws, bias)):
        assert torch.equal(out[2], bias), "an all-zero token must give exactly the bias"
        assert torch.isnan(out[4]).all(), "the NaN token's row must be NaN"
        others = torch.tensor([0, 1, 3, 5], device=device)
        assert not torch.isnan(out[others]).any(), "NaN leaked into other rows"


def _small_args(device):
    x = torch.randn(5, 70, device=device)
    xq, xs = ref.quantize_per_token(x)
    wq, ws = _weight(9, 70, device)
    bias = torch.randn(9, device=device)
    return x, xq, xs, wq, ws, bias


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", ["quantize_per_token", "int8_mm", "int8_scaled_mm", "w8a16_mm", "dense_mm"])
def test_opcheck(device, op):
    require_kernel(op, device)
    x, xq, xs, wq, ws, bias = _small_args(device)
    args = {"quantize_per_token": (x,), "int8_mm": (xq, wq),
            "int8_scaled_mm": (xq, xs, wq, ws, bias, torch.bfloat16), "w8a16_mm": (x, wq, ws, bias),
            "dense_mm": (x, ref.dequantize_weight(wq, ws, torch.float32), bias)}[op]
    torch.library.opcheck(getattr(ops, op).default, args)


@pytest.mark.parametrize("device", devices())
def test_compiles_fullgraph(device):
    for op in ("quantize_per_token", "int8_mm", "int8_scaled_mm", "w8a16_mm", "dense_mm"):
        require_kernel(op, device)
    torch._dynamo.reset()
    x, _, _, wq, ws, bias = _small_args(device)
    w = ref.dequantize_weight(wq, ws, torch.float32)

    def f(x):
        q, s = ops.quantize_per_token(x)
        y = ops.int8_scaled_mm(q, s, wq, ws, bias, torch.float32)
        return y + ops.w8a16_mm(x, wq, ws, bias) + ops.dense_mm(x, w, bias), ops.int8_mm(q, wq)

    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x)
    assert_close(got[0], want[0], rtol=0, atol=0, what="compiled float output")
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", devices())
def test_bad_input_is_rejected(device):
    for op in ("quantize_per_token", "int8_mm", "int8_scaled_mm", "w8a16_mm", "dense_mm"):
        require_kernel(op, device)
    x, xq, xs, wq, ws, bias = _small_args(device)
    f32 = torch.float32
    w = ref.dequantize_weight(wq, ws, f32)
    cases = [
        (lambda: ops.dense_mm(x, w.double(), bias), "weight"),
        (lambda: ops.dense_mm(x, w.half(), bias), "dtype"),
        (lambda: ops.dense_mm(x, w, bias.half()), "bias"),
        (lambda: ops.dense_mm(x, w, bias[:-1]), "bias"),
        (lambda: ops.dense_mm(x, w[:, :-1], bias), "K"),
        (lambda: ops.dense_mm(x[0], w, bias), "x"),
        (lambda: ops.dense_mm(xq, w, bias), "x"),
        (lambda: ops.quantize_per_token(x[None]), "x"),
        (lambda: ops.quantize_per_token(xq), "x"),
        (lambda: ops.int8_mm(x, wq), "a"),
        (lambda: ops.int8_mm(xq, wq.float()), "b"),
        (lambda: ops.int8_mm(xq, wq[:, :-1]), "K"),
        (lambda: ops.int8_mm(xq[0], wq), "a"),
        (lambda: ops.int8_scaled_mm(xq, xs[:-1], wq, ws, bias, f32), "a_scale"),
        (lambda: ops.int8_scaled_mm(xq, xs, wq, ws[:, None], bias, f32), "b_scale"),
        (lambda: ops.int8_scaled_mm(xq, xs, wq, ws, bias[:-1], f32), "bias"),
        (lambda: ops.int8_scaled_mm(xq, xs.int(), wq, ws, bias, f32), "a_scale"),
        (lambda: ops.int8_scaled_mm(xq, xs, wq, ws, bias, torch.int32), "out_dtype"),
        (lambda: ops.w8a16_mm(x, wq.float(), ws, bias), "w_int8"),
        (lambda: ops.w8a16_mm(x, wq, ws[:-1], bias), "w_scale"),
        (lambda: ops.w8a16_mm(x, wq, ws, bias[:, None]), "bias"),
        (lambda: ops.w8a16_mm(xq, wq, ws, bias), "x"),
        (lambda: ops.w8a16_mm(x[:, :-1], wq, ws, bias), "K"),
    ]
    for i, (call, name) in enumerate(cases):
        with pytest.raises(RuntimeError, match=name):
            call()


@pytest.mark.parametrize("device", devices())
def test_outputs_are_fully_written(device):
    """Results are fresh tensors; poisoned inputs' unused storage never leaks into them."""
    require_kernel("int8_scaled_mm", device)
    wide = poison_(torch.empty(7, 2 * 150, device=device))
    wide[:, :150] = torch.randn(7, 150, device=device)
    x = wide[:, :150]  # row stride 300: the NaN columns must not be read
    wq, ws = _weight(11, 150, device)
    xq, xs = ops.quantize_per_token(x)
    assert not torch.isnan(xs).any()
    assert not torch.isnan(ops.int8_scaled_mm(xq, xs, wq, ws, None, torch.float32)).any()
    assert not torch.isnan(ops.w8a16_mm(x, wq, ws, None)).any()
    if has_kernel("dense_mm", "CUDA" if device == "cuda" else "CPU"):
        assert not torch.isnan(ops.dense_mm(x, ref.dequantize_weight(wq, ws, torch.float32), None)).any()


# The AVX2 panel engine (int8 from 16 rows, w8a16 from 32; quant_cpu_panels.h): several row blocks
# (> 264 rows), k blocks (> 256 inputs; odd K for the int16 pairs) and feature blocks (> 128, not
# a multiple of 16), and strided rows.
ENGINE_SHAPES = [(16, 1029, 40), (37, 520, 150), (300, 131, 33)]


@pytest.mark.parametrize("shape", ENGINE_SHAPES, ids=str)
def test_int8_engine_is_exact(shape, cpu_isa):
    require_kernel("int8_mm", "cpu")
    M, K, N = shape
    a, b = _int8((M, K), "cpu", noncontig=(M % 2 == 1)), _int8((N, K), "cpu")
    a[0], b[0], a[1], b[1] = -128, -128, -128, 127  # the largest magnitudes int8 allows
    assert torch.equal(ops.int8_mm(a, b), ref.int8_mm(a, b))
    wide = torch.randint(-128, 128, (M, K + 7), dtype=torch.int8)
    assert torch.equal(ops.int8_mm(wide[:, :K], b), ref.int8_mm(wide[:, :K], b))  # row stride K + 7


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ENGINE_SHAPES, ids=str)
def test_engine_float_outputs(dtype, shape, cpu_isa):
    """int8_scaled_mm and w8a16_mm (M >= 32: x packed from its own dtype) on the engine."""
    for op in ("int8_scaled_mm", "w8a16_mm"):
        require_kernel(op, "cpu")
    M, K, N = shape
    M = max(M, 32)
    x = _float((M, K), dtype, "cpu", noncontig=True)
    wq, ws = _weight(N, K, "cpu")
    bias = torch.randn(N, dtype=dtype)
    got = ops.w8a16_mm(x, wq, ws, bias)
    w64 = wq.double() * ws.double()[:, None]
    if dtype == torch.float32:
        want = x.double() @ w64.T + bias.double()
        mag = (x.double().abs() @ w64.abs().T + bias.double().abs()).max().item()
        assert_close(got, want, rtol=1e-5, atol=1e-5 * mag, what="w8a16_mm fp32")
    else:
        ref32 = ref.w8a16_linear(x.float(), wq, ws, bias.float())
        lowp = torch.nn.functional.linear(x, ref.dequantize_weight(wq, ws, dtype), bias)
        check_16bit(got, ref32, lowp, "w8a16_mm")
    xq, xs = ref.quantize_per_token(x)
    got = ops.int8_scaled_mm(xq, xs, wq, ws, bias, dtype)
    ref32 = ref.int8_scaled_mm(xq, xs, wq, ws, bias, torch.float32)
    if dtype == torch.float32:
        assert_close(got, ref32, rtol=1e-5, atol=1e-6 * ref32.abs().max().item(), what="int8_scaled_mm fp32")
    else:
        check_16bit(got, ref32, ref.int8_scaled_mm(xq, xs, wq, ws, bias, dtype), "int8_scaled_mm")


@pytest.mark.parametrize("shape", ENGINE_SHAPES + [(6, 64, 1), (48, 2048, 1024)], ids=str)
def test_engine_fp32_epilogue_is_the_reference_rounding(shape, cpu_isa):
    """fp32 int8_scaled_mm: the exact int32 sums, then (acc * a_scale) * b_scale + bias in fp32,
    bit for bit the reference's order, in the vector epilogue (8 columns at a time) and its tail."""
    require_kernel("int8_scaled_mm", "cpu")
    M, K, N = shape
    a, b = _int8((M, K), "cpu", noncontig=(M % 2 == 1)), _int8((N, K), "cpu")
    a_scale, b_scale, bias = torch.rand(M) / 100, torch.rand(N) / 100, torch.randn(N)
    for bi in (bias, None):
        got = ops.int8_scaled_mm(a, a_scale, b, b_scale, bi, torch.float32)
        assert torch.equal(got, ref.int8_scaled_mm(a, a_scale, b, b_scale, bi, torch.float32)), shape
