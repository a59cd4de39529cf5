"""GPU-size checks of the CUDA C++ and Triton kernels (issue 9): the paths that only shapes and
placements of real GPU workloads reach, and that CPU CI (interpreter, tiny shapes) cannot.

- the optimizers' multi-chunk paths (CUDA C++: 32,768-element chunks, Triton: 8,192) at GPU sizes;
- split-K w8a16 (CUDA GEMV and Triton) and quantize with K > 8,192 (Triton's two-sweep path);
- the GEMM K loops without masks (K a multiple of every config's BLOCK_K: EVEN_K);
- a tensor over 2^31 elements for the bf16 optimizer step, quantize and w8a16 (int64 offsets);
- the int8 GEMM at K = 131,072 (int32 accumulation near its limit, exact);
- every op with its tensors on cuda:1 while cuda:0 is current (skipped with one GPU);
- 100 SparseLinear calls with bf16 input and an fp32 bias: the cuSPARSELt plan cache does not grow;
- FusedAdamW on the Triton backend over nn.Parameters: kernel launches per step do not grow with
  the number of tensors (one table launch, torch.profiler).

Each test keeps its memory under ~25 GiB (within an 80 GiB GPU) and frees it. References: the
CPU / fp64 references of bigkernels.reference on slices (elementwise ops) or on a few output
columns (GEMMs), with the tolerances of DESIGN.md.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bigkernels.ops  # noqa: F401  (defines the ops and loads bigkernels._C)
from bigkernels.ops import _registry
from bigkernels.reference import optim as ref_optim
from bigkernels.reference import quant as ref_quant
from bigkernels.reference import sparse as ref_sparse

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

OPS = torch.ops.bigkernels
BIG = 2**31 + 4099  # elements: past the int32 range, with an odd tail


def _require_cuda_kernel(op: str) -> None:
    if not _registry.has_kernel(f"bigkernels::{op}", "CUDA"):
        pytest.skip(f"no CUDA kernel registered for bigkernels::{op} (extension built without CUDA)")


def _require_triton() -> None:
    pytest.importorskip("triton")
    from bigkernels import triton as bk_triton

    if not bk_triton.load():
        pytest.skip("triton is not importable")


def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def _require_memory(gib: float) -> None:
    if _free_gib() < gib:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {_free_gib():.0f} free")


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _close_16bit(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same elementwise step from the same 16-bit inputs: at most one rounding step apart."""
    g, e = got.float(), expected.float()
    ulp = torch.where(e == 0, torch.full_like(e, 2.0**-126), e.abs() * 2.0**-7)
    bad = (g - e).abs() > ulp
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{e.numel()} elements more than one bf16 ulp off; "
                           f"max |diff| {(g - e).abs().max().item():.3g}")


def _check_codes(q, s, q_ref, s_ref, what):
    """DESIGN.md: scales exact, codes off by at most 1 in at most 1 of 500."""
    q, s = q.cpu(), s.cpu()
    nan = torch.isnan(s_ref)
    assert torch.equal(torch.isnan(s), nan) and torch.equal(s[~nan], s_ref[~nan]), f"{what}: scales differ"
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1, f"{what}: a code is off by {int(diff.max())}"
    assert int((diff != 0).sum()) * 500 <= diff.numel(), f"{what}: {int((diff != 0).sum())} codes off by one"


def _adam_kwargs():
    return dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


# ----- optimizers: multi-chunk path at GPU sizes -----------------------------------------------------

MULTI_CHUNK_SIZES = [3 * 32768 + 5, 1 << 22, 7 * 8192 + 1, 1, 32768 * 40 - 3, 12345679]


def _adam_state(sizes, dtype, gen_seed):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    params = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
    grads = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
    m = [torch.randn(n, device="cuda", generator=g).mul_(0.1).to(dtype) for n in sizes]
    v = [torch.rand(n, device="cuda", generator=g).mul_(0.01).to(dtype) for n in sizes]
    steps = [torch.full((), 3.0, device="cuda") for _ in sizes]
    return [params, grads, m, v, [], steps]


def _clone_state(state):
    return [[t.clone() for t in lst] for lst in state]


@pytest.mark.parametrize("backend", ["cuda-c++", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optimizer_multi_chunk_path(backend, dtype):
    """Tensors of many chunks (with partial last chunks) in one launch vs the reference: 3 steps in
    fp32; one in bf16 (from the same bf16 inputs the results are then at most one rounding apart)."""
    if backend == "cuda-c++":
        _require_cuda_kernel("fused_adamw_")
        op, extra = OPS.fused_adamw_, {}
    else:
        _require_triton()
        op, extra = OPS.fused_adamw_triton_, {"masks": []}
    state = _adam_state(MULTI_CHUNK_SIZES, dtype, 1)
    expected = _clone_state(state)
    kw = _adam_kwargs()
    for _ in range(3 if dtype == torch.float32 else 1):
        if backend == "cuda-c++":
            op(*state, **kw)
        else:
            op(*state[:5], state[5], extra["masks"], **kw)
        ref_optim.fused_adam_(*expected, decoupled_weight_decay=True, **kw)
    torch.cuda.synchronize()
    for lst, exp, name in zip(state, expected, ("params", "grads", "exp_avgs", "exp_avg_sqs", "-", "steps")):
        for i, (t, e) in enumerate(zip(lst, exp)):
            if dtype == torch.float32 or name == "steps":
                torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}[{i}]: {m}")
            else:
                _close_16bit(t, e, f"{name}[{i}]")


@pytest.mark.parametrize("backend", ["cuda-c++", "triton"])
def test_optimizer_bf16_tensor_over_2_31_elements(backend):
    """One bf16 param of 2^31 + 4,099 elements (4 tensors: ~17 GiB): int64 offsets in every path.
    Checked on slices at the start, across element 2^31 and at the end."""
    _require_memory(24)
    if backend == "cuda-c++":
        _require_cuda_kernel("fused_adamw_")
    else:
        _require_triton()
    g = torch.Generator(device="cuda").manual_seed(2)
    p = torch.randn(BIG, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(BIG, device="cuda", dtype=torch.bfloat16, generator=g)
    m = torch.randn(BIG, device="cuda", dtype=torch.bfloat16, generator=g).mul_(0.1)
    v = torch.rand(BIG, device="cuda", dtype=torch.bfloat16, generator=g).mul_(0.01)
    step = torch.zeros((), device="cuda")
    slices = [slice(0, 1 << 20), slice(2**31 - (1 << 19), 2**31 + (1 << 19)), slice(BIG - (1 << 20), BIG)]
    before = [[t[s].clone() for t in (p, grad, m, v)] for s in slices]
    kw = _adam_kwargs()
    if backend == "cuda-c++":
        OPS.fused_adamw_([p], [grad], [m], [v], [], [step], **kw)
    else:
        OPS.fused_adamw_triton_([p], [grad], [m], [v], [], [step], [], **kw)
    torch.cuda.synchronize()
    assert step.item() == 1.0
    for s, (p0, g0, m0, v0) in zip(slices, before):
        ref_optim.fused_adam_([p0], [g0], [m0], [v0], [], [torch.zeros((), device="cuda")],
                              decoupled_weight_decay=True, **kw)
        for got, exp, name in ((p[s], p0, "param"), (m[s], m0, "exp_avg"), (v[s], v0, "exp_avg_sq")):
            _close_16bit(got, exp, f"{name}[{s.start}:{s.stop}]")
    del p, grad, m, v


# ----- quantize ---------------------------------------------------------------------------------------


def _quantize_op(backend):
    if backend == "cuda-c++":
        _require_cuda_kernel("quantize_per_token")
        return OPS.quantize_per_token
    _require_triton()
    return OPS.quantize_per_token_triton


@pytest.mark.parametrize("backend", ["cuda-c++", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [8193, 16384, 40000])
def test_quantize_k_over_8192(backend, dtype, K):
    """Rows longer than Triton's 8,192-wide block take two sweeps; the CUDA kernel one block per row."""
    op = _quantize_op(backend)
    x = (torch.randn(300, K, device="cuda") * 3).to(dtype)
    x[1] = 0
    x[2, K - 1] = float("nan")
    x[3, K // 2] = 1000.0  # the absmax in the second sweep's half
    q, s = op(x)
    q_ref, s_ref = ref_quant.quantize_per_token(x.cpu())
    _check_codes(q, s, q_ref, s_ref, f"{backend} K={K}")


@pytest.mark.parametrize("backend", ["cuda-c++", "triton"])
def test_quantize_tensor_over_2_31_elements(backend):
    """x [262,145, 8,192] bf16 (4 GiB, 2^31 + 8,192 elements), checked on rows at both ends."""
    _require_memory(12)
    op = _quantize_op(backend)
    K = 8192
    M = 2**31 // K + 1
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    q, s = op(x)
    torch.cuda.synchronize()
    for rows in (slice(0, 64), slice(M - 64, M)):
        q_ref, s_ref = ref_quant.quantize_per_token(x[rows].cpu())
        _check_codes(q[rows], s[rows], q_ref, s_ref, f"{backend} rows {rows.start}:{rows.stop}")
    del x, q, s


# ----- w8a16 ------------------------------------------------------------------------------------------


def _w8a16_reference_cols(x, w_int8, w_scale, bias, cols):
    """fp32 reference of out[:, cols] (a few output columns of a large layer)."""
    w = w_int8[cols].float() * w_scale[cols].float()[:, None]
    out = x.float() @ w.T
    return out + bias[cols].float() if bias is not None else out


def _check_w8a16(out, x, w_int8, w_scale, bias, cols, what):
    exact = _w8a16_reference_cols(x, w_int8, w_scale, bias, cols)
    got = out[:, cols].float()
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")
    else:
        in_dtype = _w8a16_reference_cols(x, w_int8, w_scale, bias, cols).to(x.dtype).float()
        # DESIGN.md: at most twice the error of the same product rounded to x's dtype (plus fp32 noise)
        err = (got - exact).abs().max().item()
        ref_err = (in_dtype - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * exact.abs().max().item(), f"{what}: error {err:.3g} vs {ref_err:.3g}"


@pytest.mark.parametrize("backend", ["cuda-c++", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("M", [1, 8, 16])
def test_w8a16_split_k(backend, dtype, M, monkeypatch):
    """Small N, long K: the GEMV (CUDA) / M <= 16 (Triton) variants split K over programs."""
    N, K = 256, 16384
    x = torch.randn(M, K, device="cuda").to(dtype)
    w_int8, w_scale = ref_quant.quantize_weight(torch.randn(N, K, device="cuda") * 0.02)
    bias = torch.randn(N, device="cuda")
    if backend == "cuda-c++":
        _require_cuda_kernel("w8a16_mm")
        out = OPS.w8a16_mm(x, w_int8, w_scale, bias)
    else:
        _require_triton()
        from bigkernels.triton import quant as tq

        launched = []
        real = tq._launch

        def spy(kernel):
            launched.append(getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", "")))
            return real(kernel)

        monkeypatch.setattr(tq, "_launch", spy)
        out = OPS.w8a16_mm_triton(x, w_int8, w_scale, bias)
        assert "_splitk_epilogue_kernel" in launched, "K was not split"
    _check_w8a16(out, x, w_int8, w_scale, bias, slice(0, N), f"{backend} M={M}")


@pytest.mark.parametrize("backend", ["cuda-c++", "triton"])
def test_w8a16_weight_over_2_31_elements(backend):
    """w_int8 [131,072, 16,400] (2^31 + 1.1M elements, 2 GiB): output columns at both ends."""
    _require_memory(8)
    N, K = 1 << 17, 16400
    w_int8 = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    w_scale = torch.rand(N, device="cuda") * 1e-3
    bias = torch.randn(N, device="cuda")
    for M in (4, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        if backend == "cuda-c++":
            if M > 16:
                continue  # the CUDA GEMV serves M <= 16 (the dispatch sends larger M to Triton)
            _require_cuda_kernel("w8a16_mm")
            out = OPS.w8a16_mm(x, w_int8, w_scale, bias)
        else:
            _require_triton()
            out = OPS.w8a16_mm_triton(x, w_int8, w_scale, bias)
        for cols in (slice(0, 64), slice(N - 64, N)):
            _check_w8a16(out, x, w_int8, w_scale, bias, cols, f"{backend} M={M} cols {cols.start}:{cols.stop}")
    del w_int8


# ----- GEMM loops without K masks ----------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 16, 17, 256])
def test_gemm_loops_without_k_masks(M):
    """K = 4,096: a multiple of every config's BLOCK_K, so every Triton GEMM runs EVEN_K (no masks)."""
    _require_triton()
    from bigkernels.triton import quant as tq
    from bigkernels.triton import sparse as ts

    K, N = 4096, 1024
    for tuned in list(tq._INT8_TUNED.values()) + list(tq._W8A16_TUNED.values()) + list(ts._SPARSE24_TUNED.values()):
        assert K % tuned.kdiv == 0
    g = torch.Generator(device="cuda").manual_seed(M)
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=g)
    assert torch.equal(OPS.int8_mm_triton(a, b), ref_quant.int8_mm(a, b)), "int8_mm"
    a_s, b_s = torch.rand(M, device="cuda"), torch.rand(N, device="cuda")
    torch.testing.assert_close(OPS.int8_scaled_mm_triton(a, a_s, b, b_s, None, torch.float32),
                               ref_quant.int8_scaled_mm(a, a_s, b, b_s, None, torch.float32), rtol=1e-5, atol=1e-3)
    w_int8, w_scale = ref_quant.quantize_weight(torch.randn(N, K, device="cuda") * 0.02)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(M, K, device="cuda").to(dtype)
        _check_w8a16(OPS.w8a16_mm_triton(x, w_int8, w_scale, None), x, w_int8, w_scale, None, slice(0, N),
                     f"w8a16 {dtype}")
        w = torch.randn(N, K, device="cuda")
        keep = torch.rand(N, K // 4, 4, device="cuda").argsort(dim=2)[..., :2]
        mask = torch.zeros(N, K // 4, 4, device="cuda", dtype=torch.bool).scatter_(2, keep, True).reshape(N, K)
        values, meta = ref_sparse.to_sparse24((w * mask).to(dtype))
        out = OPS.sparse24_mm_triton(x, values, meta, None)
        exact = ref_sparse.sparse24_linear(x.float(), values.float(), meta, None)
        err = (out.float() - exact).abs().max().item()
        ref_err = (ref_sparse.sparse24_linear(x, values, meta, None).float() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * exact.abs().max().item(), f"sparse24 {dtype}: {err:.3g} vs {ref_err:.3g}"


# ----- int8 GEMM at K = 131,072 ----------------------------------------------------------------------


@pytest.mark.parametrize("M,N", [(16, 64), (300, 256)])
def test_int8_mm_k_131072_is_exact(M, N):
    """int32 sums up to 127 * 127 * 131,072 = 2,114,060,288 (just under 2^31): exact."""
    _require_triton()
    K = 131072
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    a[0], b[0] = 127, 127  # out[0, 0] = +2,114,060,288
    a[1], b[1] = -127, 127  # out[1, 1] = -2,114,060,288
    out = OPS.int8_mm_triton(a, b)
    assert out[0, 0].item() == 127 * 127 * K and out[1, 1].item() == -127 * 127 * K
    assert torch.equal(out, ref_quant.int8_mm(a, b))
    a_s, b_s = torch.rand(M, device="cuda"), torch.rand(N, device="cuda")
    torch.testing.assert_close(OPS.int8_scaled_mm_triton(a, a_s, b, b_s, None, torch.float32),
                               ref_quant.int8_scaled_mm(a, a_s, b, b_s, None, torch.float32), rtol=1e-5, atol=1e-2)


# ----- every op on cuda:1 while cuda:0 is current -------------------------------------------------------


def _op_calls(dev):
    """(name, call) for every op with CUDA C++ or Triton kernels; each call builds its inputs on
    ``dev`` from a fixed seed and returns its output tensors (mutated inputs included)."""
    calls = []

    def data(seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        return lambda *shape, dtype=torch.float32: torch.randn(*shape, device=dev, generator=g).to(dtype)

    def adam(op, extra):
        def call():
            r = data(1)
            st = [[r(4099)], [r(4099)], [r(4099) * 0.1], [r(4099).abs() * 0.01], [], [torch.zeros((), device=dev)]]
            op(*st, *extra, **_adam_kwargs())
            return [st[0][0], st[2][0], st[3][0], st[5][0]]
        return call

    def sgd(op, extra):
        def call():
            r = data(2)
            st = [[r(70000)], [r(70000)], [r(70000)]]
            op(*st, *extra, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False, maximize=False,
               is_first_step=False)
            return [st[0][0], st[2][0]]
        return call

    def sos(op):
        return lambda: [op([data(3)(5000), data(4)(70001)])]

    def quant(op):
        return lambda: list(op(data(5)(33, 4100, dtype=torch.bfloat16)))

    def w8a16(op, m):
        def call():
            r = data(6)
            w_int8, w_scale = ref_quant.quantize_weight(r(256, 4096) * 0.02)
            return [op(r(m, 4096, dtype=torch.bfloat16), w_int8, w_scale, r(256))]
        return call

    if _registry.has_kernel("bigkernels::fused_adamw_", "CUDA"):
        calls += [("fused_adamw_", adam(OPS.fused_adamw_, [])), ("fused_adam_", adam(OPS.fused_adam_, [])),
                  ("fused_sgd_", sgd(OPS.fused_sgd_, [])), ("sum_of_squares", sos(OPS.sum_of_squares))]

        def masks():
            r = data(7)
            t = r(70000)
            OPS.apply_masks_([t], [r(70000) > 0])
            return [t]
        calls.append(("apply_masks_", masks))
    if _registry.has_kernel("bigkernels::quantize_per_token", "CUDA"):
        calls += [("quantize_per_token", quant(OPS.quantize_per_token)), ("w8a16_mm", w8a16(OPS.w8a16_mm, 4))]
    try:
        from bigkernels import triton as bk_triton

        triton_ok = bk_triton.load()
    except Exception:  # noqa: BLE001
        triton_ok = False
    if triton_ok:
        calls += [("fused_adamw_triton_", adam(OPS.fused_adamw_triton_, [[]])),
                  ("fused_sgd_triton_", sgd(OPS.fused_sgd_triton_, [[]])),
                  ("sum_of_squares_triton", sos(OPS.sum_of_squares_triton)),
                  ("quantize_per_token_triton", quant(OPS.quantize_per_token_triton)),
                  ("w8a16_mm_triton M=4 (split-K)", w8a16(OPS.w8a16_mm_triton, 4)),
                  ("w8a16_mm_triton M=64", w8a16(OPS.w8a16_mm_triton, 64))]

        def int8(scaled):
            def call():
                g = torch.Generator(device=dev).manual_seed(8)
                a = torch.randint(-127, 128, (100, 1024), device=dev, dtype=torch.int8, generator=g)
                b = torch.randint(-127, 128, (256, 1024), device=dev, dtype=torch.int8, generator=g)
                if not scaled:
                    return [OPS.int8_mm_triton(a, b)]
                r = data(9)
                return [OPS.int8_scaled_mm_triton(a, r(100).abs(), b, r(256).abs(), r(256), torch.bfloat16)]
            return call

        def bsr():
            r = data(10)
            w = r(256, 512) * (torch.rand(4, 1, 8, 1, device=dev) > 0.5).repeat_interleave(64, 1).repeat_interleave(
                64, 3).reshape(256, 512)
            crow, col, blocks = ref_sparse.to_bsr(w, 64)
            return [OPS.bsr_mm_triton(r(40, 512), crow, col, blocks, r(256))]

        def s24(dtype):
            def call():
                r = data(11)
                values, meta = ref_sparse.to_sparse24(_two_of_four(r(256, 512)).to(dtype))
                return [OPS.sparse24_mm_triton(r(40, 512, dtype=dtype), values, meta, r(256))]
            return call

        def csr():
            r = data(12)
            w = r(256, 512) * (torch.rand(256, 512, device=dev) > 0.9)
            crow, col, values = ref_sparse.to_csr(w)
            return [OPS.csr_mm_triton(r(40, 512), crow, col, values, r(256))]

        calls += [("int8_mm_triton", int8(False)), ("int8_scaled_mm_triton", int8(True)), ("bsr_mm_triton", bsr),
                  ("sparse24_mm_triton fp32", s24(torch.float32)), ("sparse24_mm_triton bf16", s24(torch.bfloat16)),
                  ("csr_mm_triton", csr)]
    from bigkernels.ops import sparse_cuda

    if sparse_cuda.sparse24_supported(dev):
        def cslt():
            r = data(13)
            w = _two_of_four(r(256, 512)).to(torch.bfloat16)
            c = OPS.sparse24_compress(w)
            return [c, OPS.sparse24_cslt_mm(r(40, 512, dtype=torch.bfloat16), c, 256, r(256))]
        calls.append(("sparse24_compress + cslt_mm", cslt))
    return calls


def _two_of_four(w):
    n, k = w.shape
    keep = torch.rand(n, k // 4, 4, device=w.device).argsort(dim=2)[..., :2]
    mask = torch.zeros(n, k // 4, 4, device=w.device, dtype=torch.bool).scatter_(2, keep, True).reshape(n, k)
    return w * mask


def _same(name, got, expected, what):
    """Bit for bit (deterministic kernels, same autotuned config); cuSPARSELt's own algorithm
    within bf16 rounding."""
    if "cslt" in name and got.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, expected), what


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_op_on_cuda1_while_cuda0_is_current():
    """Each op with its tensors on cuda:1 under cuda:0 as the current device gives what it gives
    with cuda:1 current (same config, same bits), allocates nothing on cuda:0 and leaves cuda:0
    current; a side stream of cuda:1 is honoured (the result is ready after syncing that stream)."""
    dev = torch.device("cuda", 1)
    calls = _op_calls(dev)
    assert len(calls) >= 5, "expected the CUDA C++ and/or Triton ops to be available"
    failures = []
    for name, call in calls:
        try:
            torch.manual_seed(0)
            with torch.cuda.device(1):
                expected = [t.clone() for t in call()]
            torch.cuda.synchronize(1)
            before0 = torch.cuda.memory_allocated(0)
            torch.manual_seed(0)
            with torch.cuda.device(0):
                got = call()
                assert torch.cuda.current_device() == 0, "the op changed the current device"
            torch.cuda.synchronize(1)
            assert torch.cuda.memory_allocated(0) == before0, "allocated on cuda:0"
            for g, e in zip(got, expected):
                assert g.device == dev, f"result on {g.device}"
                _same(name, g, e, "differs from the run with cuda:1 current")
            side = torch.cuda.Stream(device=dev)
            torch.manual_seed(0)
            with torch.cuda.device(0), torch.cuda.stream(side):
                got = call()
            side.synchronize()
            for g, e in zip(got, expected):
                _same(name, g, e, "differs on a side stream of cuda:1")
        except Exception as e:  # noqa: BLE001 - report every op, not just the first
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failures, "\n".join(failures)


# ----- SparseLinear: cuSPARSELt plans with a bias converted per call ----------------------------------


def test_sparse_linear_bf16_input_fp32_bias_keeps_plan_count(force_linear_dispatch):
    """An fp32 SparseLinear (2:4) called with bf16 inputs converts its bias per call; the plan
    cache must not grow with the converted bias's address (100 calls, other allocations between)."""
    from bigkernels.nn import SparseLinear
    from bigkernels.ops import sparse_cuda

    if not sparse_cuda.sparse24_supported("cuda"):
        pytest.skip("cuSPARSELt 2:4 needs sm_80+ and an extension built with it")
    force_linear_dispatch("kernel")  # the first kernel path: cuSPARSELt
    lin = torch.nn.Linear(1024, 512).cuda()
    with torch.no_grad():
        lin.weight.copy_(_two_of_four(lin.weight))
    layer = SparseLinear.from_linear(lin, "2:4")
    assert layer.bias.dtype == torch.float32
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    keep = []
    with torch.no_grad():
        out = layer(x)
        count = sparse_cuda.plan_count()
        assert count > 0, "the call did not take the cuSPARSELt path"
        for i in range(99):
            keep.append(torch.empty(1024 * (i % 7 + 1), device="cuda"))  # move the allocator along
            out = layer(x)
            assert sparse_cuda.plan_count() == count, f"call {i + 2} built a new plan"
            if len(keep) > 20:
                keep.pop(0)
    err = (out.float() - expected).abs().max().item()
    ref_err = (F.linear(x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16)).float() - expected).abs().max()
    assert err <= 2 * ref_err.item() + 1e-5, f"{err:.3g} vs bf16 F.linear's {ref_err.item():.3g}"


# ----- FusedAdamW on the Triton backend: launches per step ---------------------------------------------


def _kernel_launches(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len([n for n in names if not n.lower().startswith(("memcpy", "memset"))])


def test_triton_fused_adamw_launches_do_not_grow_with_tensors(monkeypatch):
    """BIGKERNELS_IMPL=triton: FusedAdamW over nn.Parameters takes the one-launch table path."""
    _require_triton()
    from bigkernels.optim import FusedAdamW

    monkeypatch.setenv("BIGKERNELS_IMPL", "triton")
    _registry.clear_choice_cache()
    try:
        counts = {}
        for n in (10, 200):
            params = [torch.nn.Parameter(torch.randn(1000 + 17 * i, device="cuda")) for i in range(n)]
            opt = FusedAdamW(params, lr=1e-3)
            for p in params:
                p.grad = torch.randn_like(p)
            for _ in range(2):  # state init, table built and cached
                opt.step()
            counts[n] = _kernel_launches(opt.step)
        assert counts[200] == counts[10], f"kernel launches per step: {counts}"
        assert counts[10] <= 8, f"kernel launches per step: {counts}"
    finally:
        monkeypatch.delenv("BIGKERNELS_IMPL")
        _registry.clear_choice_cache()
