"""Triton int8 quantisation kernels vs bigkernels.reference.quant.

Runs under the Triton interpreter on CPU tensors (its own pytest process, with TRITON_INTERPRET=1
set before triton is imported) or on a CUDA GPU; skipped otherwise.
"""
from __future__ import annotations


import pytest
import torch

from conftest import DT_IDS, TRITON_DEVICE, TRITON_FLOAT_DTYPES, skip_module_without_triton_runtime

skip_module_without_triton_runtime()

import bigkernels.ops.quant as quant_ops  # noqa: E402  (defines the main schemas)
from bigkernels.ops import _registry  # noqa: E402
from bigkernels.reference import quant as ref  # noqa: E402
from bigkernels.triton import quant as tri  # noqa: E402,F401  (registers the *_triton ops)

pytestmark = [
    pytest.mark.triton_interpret,
    # The interpreter computes masked-off lanes and x / 0 of zero rows too (results discarded).
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

DEVICE = TRITON_DEVICE
OPS = torch.ops.bigkernels
FLOAT_DTYPES = TRITON_FLOAT_DTYPES



def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _randint8(shape, gen):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8).to(DEVICE)


def _scales(n, gen, scale=1e-2):
    """Positive fp32 scales of realistic size (absmax / 127 of unit-ish data)."""
    return (torch.rand(n, generator=gen) * scale + scale / 10).to(DEVICE)


def _exact_scaled(a, a_scale, b, b_scale, bias):
    """The quantised maths in fp64 (int8 products summed exactly)."""
    acc = a.cpu().long() @ b.cpu().long().T
    out = acc.double() * a_scale.cpu().double()[:, None] * b_scale.cpu().double()[None, :]
    return out + bias.cpu().double() if bias is not None else out


def _max_err(actual, expected):
    return (actual.cpu().double() - expected.cpu().double()).abs().max().item() if actual.numel() else 0.0


def _amax(t):
    return t.abs().max().item() if t.numel() else 0.0


def _assert_rel(actual, expected, rtol, what):
    """|actual - expected| <= rtol * (|expected| + max|expected| * 1e-2) elementwise (finite data)."""
    a, e = actual.cpu().double(), expected.cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not e.numel():
        return
    bound = rtol * (e.abs() + e.abs().max() * 1e-2)
    bad = (a - e).abs() > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{e.numel()} elements off; max |diff| "
                           f"{(a - e).abs().max().item():.3g}, max |expected| {e.abs().max().item():.3g}")


# ------------------------------------------------------------------------------------ int8_mm

INT8_SHAPES = [(1, 33, 17), (5, 123, 77), (37, 40, 64), (16, 16, 16), (3, 20, 0), (0, 7, 9), (4, 0, 9)]


@pytest.mark.parametrize("shape", INT8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_mm_exact(shape):
    M, N, K = shape
    gen = _gen(100 + M * 7 + N * 3 + K)
    a, b = _randint8((M, K), gen), _randint8((N, K), gen)
    out = OPS.int8_mm_triton(a, b)
    assert out.dtype == torch.int32 and out.shape == (M, N) and out.device == a.device
    assert torch.equal(out.cpu(), ref.int8_mm(a.cpu(), b.cpu()))


def test_int8_mm_extremes_and_non_contiguous():
    gen = _gen(200)
    a = torch.full((9, 70), -127, dtype=torch.int8, device=DEVICE)  # largest |sum| per row
    b = torch.full((11, 70), 127, dtype=torch.int8, device=DEVICE)
    assert torch.equal(OPS.int8_mm_triton(a, b).cpu(), ref.int8_mm(a.cpu(), b.cpu()))
    a_big = _randint8((13, 2 * 35), gen)
    a_nc = a_big[:, ::2]  # K-stride 2
    b_nc = _randint8((35, 19), gen).T  # transposed
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous()
    assert torch.equal(OPS.int8_mm_triton(a_nc, b_nc).cpu(), ref.int8_mm(a_nc.cpu(), b_nc.cpu()))


# ------------------------------------------------------------------------------------ int8_scaled_mm

SCALED_SHAPES = [(1, 33, 17), (5, 123, 77), (37, 40, 64), (0, 7, 9)]


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SCALED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_scaled_mm_fp32(shape, has_bias):
    M, N, K = shape
    gen = _gen(300 + M + N + K + has_bias)
    a, b = _randint8((M, K), gen), _randint8((N, K), gen)
    a_scale, b_scale = _scales(M, gen), _scales(N, gen)
    bias = _randn((N,), gen) if has_bias else None
    out = OPS.int8_scaled_mm_triton(a, a_scale, b, b_scale, bias, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    _assert_rel(out, _exact_scaled(a, a_scale, b, b_scale, bias), 1e-5, "int8_scaled_mm fp32")


@pytest.mark.parametrize("out_dtype", [d for d in FLOAT_DTYPES if d != torch.float32], ids=DT_IDS.get)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SCALED_SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_int8_scaled_mm_half(shape, has_bias, out_dtype):
    M, N, K = shape
    gen = _gen(400 + M + N + K + has_bias)
    a, b = _randint8((M, K), gen), _randint8((N, K), gen)
    a_scale, b_scale = _scales(M, gen), _scales(N, gen)
    bias = _randn((N,), gen, out_dtype) if has_bias else None
    out = OPS.int8_scaled_mm_triton(a, a_scale, b, b_scale, bias, out_dtype)
    assert out.dtype == out_dtype
    exact = _exact_scaled(a, a_scale, b, b_scale, bias)
    ref_err = _max_err(ref.int8_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype), exact)
    err = _max_err(out, exact)
    assert err <= 2 * ref_err + 1e-6 * _amax(exact), f"error {err:.3g} vs reference's {ref_err:.3g}"


def test_int8_scaled_mm_nan_scale_and_non_contiguous():
    gen = _gen(500)
    a = _randint8((6, 2 * 40), gen)[:, ::2]
    b = _randint8((40, 21), gen).T
    a_scale = _scales(6, gen)
    a_scale[2] = float("nan")
    a_scale[4] = 0.0
    b_scale, bias = _scales(21, gen), _randn((21,), gen)
    out = OPS.int8_scaled_mm_triton(a, a_scale, b, b_scale, bias, torch.float32)
    expected = ref.int8_scaled_mm(a, a_scale, b, b_scale, bias, torch.float32)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3, 4, 5]]).any()
    torch.testing.assert_close(out[4], bias)  # a zero-scale token contributes exactly the bias
    keep = [0, 1, 3, 4, 5]
    _assert_rel(out[keep], expected[keep], 1e-5, "int8_scaled_mm rows")


# ------------------------------------------------------------------------------------ quantize_per_token

QUANT_SHAPES = [(1, 1), (7, 70), (33, 16), (5, 200), (0, 8)]


def _check_quantized(q, s, x):
    qr, sr = ref.quantize_per_token(x.cpu())
    q, s = q.cpu(), s.cpu()
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == qr.shape and s.shape == sr.shape
    assert torch.equal(torch.isnan(s), torch.isnan(sr)), "NaN scales in different rows"
    finite = ~torch.isnan(sr)
    torch.testing.assert_close(s[finite], sr[finite], rtol=1e-6, atol=0)
    diff = (q.int() - qr.int()).abs()
    if diff.numel():
        assert diff.max().item() <= 1, f"codes off by {diff.max().item()}"
        assert int((diff > 0).sum()) * 500 <= diff.numel(), f"{int((diff > 0).sum())}/{diff.numel()} codes off by one"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_per_token_matches_reference(shape, dtype):
    gen = _gen(600 + shape[0] + shape[1])
    x = _randn(shape, gen, dtype, scale=3.0)
    q, s = OPS.quantize_per_token_triton(x)
    _check_quantized(q, s, x)


def test_quantize_per_token_ties_round_half_to_even():
    # Row absmax 127 -> scale 1, so x / scale hits .5 ties exactly.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 0.49999997, -126.5, 3.5]], device=DEVICE)
    q, s = OPS.quantize_per_token_triton(x)
    assert s.item() == 1.0
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, 0, -126, 4]]
    assert torch.equal(q.cpu(), ref.quantize_per_token(x.cpu())[0])


def test_quantize_per_token_zero_nan_inf_rows_and_non_contiguous():
    gen = _gen(700)
    x = _randn((6, 2 * 45), gen)[:, ::2]  # non-contiguous, K = 45 (several blocks under the interpreter)
    assert not x.is_contiguous()
    x[1] = 0.0
    x[3, 7] = float("nan")
    x[4, 40] = float("inf")
    q, s = OPS.quantize_per_token_triton(x)
    assert s[1].item() == 0.0 and (q[1] == 0).all()
    assert torch.isnan(s[3]) and (q[3] == 0).all()
    assert torch.isinf(s[4]) and (q[4] == 0).all()
    assert not torch.isnan(s[[0, 1, 2, 4, 5]]).any()
    _check_quantized(q, s, x)


# ------------------------------------------------------------------------------------ w8a16_mm

W8A16_SHAPES = [(1, 33, 45), (5, 17, 64), (16, 40, 33), (17, 33, 45), (40, 50, 64), (0, 7, 9)]


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", W8A16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_w8a16_mm_matches_reference(shape, dtype, has_bias):
    M, N, K = shape
    gen = _gen(800 + M + N + K + has_bias)
    x = _randn((M, K), gen, dtype)
    w, w_scale = _randint8((N, K), gen), _scales(N, gen)
    bias = _randn((N,), gen, dtype) if has_bias else None
    out = OPS.w8a16_mm_triton(x, w, w_scale, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    if dtype == torch.float32:
        _assert_rel(out, ref.w8a16_linear(x.double(), w, w_scale.double(), None if bias is None else bias.double()),
                    1e-5, "w8a16 fp32")
    else:
        exact = ref.w8a16_linear(x.cpu().double(), w.cpu(), w_scale.cpu().double(),
                                 None if bias is None else bias.cpu().double())
        ref_err = _max_err(ref.w8a16_linear(x, w, w_scale, bias), exact)
        err = _max_err(out, exact)
        assert err <= 2 * ref_err + 1e-6 * _amax(exact), f"error {err:.3g} vs reference's {ref_err:.3g}"


def test_w8a16_mm_non_contiguous():
    gen = _gen(900)
    x = _randn((3, 2 * 40), gen)[:, ::2]
    w = _randint8((40, 25), gen).T
    w_scale, bias = _scales(25, gen), _randn((25,), gen)
    out = OPS.w8a16_mm_triton(x, w, w_scale, bias)
    _assert_rel(out, ref.w8a16_linear(x.double(), w, w_scale.double(), bias.double()), 1e-5, "w8a16 strided")


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    gen = _gen(1000)
    a, b = _randint8((4, 8), gen), _randint8((5, 8), gen)
    with pytest.raises(ValueError, match="a must have dtype torch.int8, got torch.float32"):
        OPS.int8_mm_triton(a.float(), b)
    with pytest.raises(ValueError, match=r"must share K"):
        OPS.int8_mm_triton(a, _randint8((5, 9), gen))
    with pytest.raises(ValueError, match=r"b must be 2-D, got 1-D"):
        OPS.int8_mm_triton(a, b[0])
    with pytest.raises(ValueError, match=r"a_scale must have shape \(4,\)"):
        OPS.int8_scaled_mm_triton(a, _scales(3, gen), b, _scales(5, gen), None, torch.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        OPS.int8_scaled_mm_triton(a, _scales(4, gen), b, _scales(5, gen), _randn((4,), gen), torch.float32)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        OPS.int8_scaled_mm_triton(a, _scales(4, gen), b, _scales(5, gen), None, torch.int32)
    with pytest.raises(ValueError, match="x must be 2-D, got 3-D"):
        OPS.quantize_per_token_triton(_randn((2, 3, 4), gen))
    with pytest.raises(ValueError, match="x must have dtype one of"):
        OPS.quantize_per_token_triton(a)
    with pytest.raises(ValueError, match="at least one column"):
        OPS.quantize_per_token_triton(_randn((2, 0), gen))
    with pytest.raises(ValueError, match="w_int8 must have dtype torch.int8, got torch.float32"):
        OPS.w8a16_mm_triton(_randn((2, 8), gen), b.float(), _scales(5, gen), None)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(5,\)"):
        OPS.w8a16_mm_triton(_randn((2, 8), gen), b, _scales(8, gen), None)


# ------------------------------------------------------------------------------------ opcheck / compile


def test_opcheck_quantize_per_token():
    torch.library.opcheck(OPS.quantize_per_token_triton.default, (_randn((3, 20), _gen(1100)),))


def test_opcheck_int8_mm():
    gen = _gen(1200)
    torch.library.opcheck(OPS.int8_mm_triton.default, (_randint8((3, 20), gen), _randint8((5, 20), gen)))


def test_opcheck_int8_scaled_mm():
    gen = _gen(1300)
    args = (_randint8((3, 20), gen), _scales(3, gen), _randint8((5, 20), gen), _scales(5, gen),
            _randn((5,), gen), torch.float16)
    torch.library.opcheck(OPS.int8_scaled_mm_triton.default, args)


@pytest.mark.parametrize("M", [2, 17], ids=["splitk", "tiled"])
def test_opcheck_w8a16_mm(M):
    gen = _gen(1400 + M)
    args = (_randn((M, 20), gen), _randint8((5, 20), gen), _scales(5, gen), _randn((5,), gen))
    torch.library.opcheck(OPS.w8a16_mm_triton.default, args)


def test_compiled_w8a8_and_w8a16_match_eager():
    """torch.compile(fullgraph=True) traces every op (no graph break) and matches eager."""
    gen = _gen(1500)
    x = _randn((3, 40), gen)
    w = _randint8((18, 40), gen)
    w_scale, bias = _scales(18, gen), _randn((18,), gen)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def f(x):
        xq, xs = OPS.quantize_per_token_triton(x)
        y8 = OPS.int8_scaled_mm_triton(xq, xs, w, w_scale, bias, torch.float32)
        y16 = OPS.w8a16_mm_triton(x, w, w_scale, bias)
        return y8, y16, OPS.int8_mm_triton(xq, w)

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    for got, want in zip(compiled(x), f(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_registry_dispatch_and_autograd(mode, monkeypatch):
    """BIGKERNELS_IMPL=triton routes QuantLinear's differentiable ops to these kernels."""
    gen = _gen(1600)
    monkeypatch.setenv("BIGKERNELS_IMPL", "triton")
    _registry.clear_choice_cache()
    try:
        for op in ("quantize_per_token", "int8_scaled_mm", "w8a16_mm"):
            assert _registry.choose(op, torch.device(DEVICE).type) == "triton"
        w_int8, w_scale = ref.quantize_weight(_randn((24, 40), gen))
        bias = _randn((24,), gen)
        x = _randn((2, 3, 40), gen).requires_grad_()
        y = quant_ops.quant_linear(x, w_int8, w_scale, bias, mode)
        expected = getattr(ref, f"{mode}_linear")(x.detach().reshape(6, 40), w_int8, w_scale, bias)
        _assert_rel(y.detach().reshape(6, 24), expected, 1e-5, mode)
        y.sum().backward()
        grad = torch.ones(6, 24, device=DEVICE) @ ref.dequantize_weight(w_int8, w_scale, torch.float32)
        torch.testing.assert_close(x.grad.reshape(6, 40), grad, rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        _registry.clear_choice_cache()
