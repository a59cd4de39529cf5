"""The CUDA C++ fused optimizer kernels (csrc/optim/optim_cuda*.{cpp,cu}) against
bigkernels.reference.optim, on a GPU.

What this file is after, beyond tests/test_optim_ops.py: the multi-tensor-apply machinery
(tensors spanning several chunks, hundreds of tiny tensors in one launch, zero-numel tensors,
16-byte-misaligned tensors that must take the scalar path, a mix of aligned and misaligned lists),
the device-side GradScaler protocol (grad_scale, found_inf, grad_norm clipping without a host sync),
the step counters (incremented once, after the update, never when found_inf != 0), the current
stream, and the deterministic sum of squares (including a tensor of more than 2**24 elements).

Tolerances (DESIGN.md): fp32 rtol 1e-5 / atol 1e-6 after 10+ steps against the fp32 reference;
fp16/bf16: the error against the fp32 reference run on the upcast data is at most 2x the error of
the reference itself run in that dtype.
"""
from __future__ import annotations

import random

import pytest
import torch

import bigkernels.ops  # noqa: F401  (defines the ops and loads bigkernels._C)
from bigkernels.ops import _registry
from bigkernels.reference import optim as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [1, 3, 4097, 65537, 0, 32768, 32769]  # 65537: three chunks of 32768; 0: no data, still a step
STEPS = 10


def _require(op: str) -> None:
    if not _registry.has_kernel(f"bigkernels::{op}", "CUDA"):
        pytest.skip(f"no CUDA kernel registered for bigkernels::{op} (extension built without CUDA)")


def _op(name: str):
    return getattr(torch.ops.bigkernels, name)


def _tensor(n: int, dtype, *, misaligned: bool = False, positive: bool = False, scale: float = 1.0):
    """A fresh random 1-D tensor; `misaligned` puts it one element past a 16-byte boundary."""
    x = torch.randn(n, device=DEV, dtype=torch.float32) * scale
    if positive:
        x = x.abs()
    if not misaligned:
        return x.to(dtype)
    buf = torch.empty(n + 1, device=DEV, dtype=dtype)
    view = buf[1:1 + n]  # contiguous, data_ptr 2 or 4 bytes past an aligned address
    view.copy_(x)
    assert view.is_contiguous() and (n == 0 or view.data_ptr() % 16 != 0)
    return view


def _f32(ts):
    return [t.detach().to(torch.float32, copy=True) for t in ts]


def _clone(ts):
    return [t.detach().clone() for t in ts]


def _max_err(got, expected):
    """Largest |got - expected| over every element of two lists of tensors (fp64)."""
    worst = 0.0
    for g, e in zip(got, expected):
        if g.numel():
            worst = max(worst, (g.double() - e.double()).abs().max().item())
    return worst


def _check_lists(name, kernel, ref_same_dtype, ref_fp32, dtype):
    assert len(kernel) == len(ref_same_dtype) == len(ref_fp32)
    if dtype == torch.float32:
        for i, (k, r) in enumerate(zip(kernel, ref_same_dtype)):
            torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}[{i}]: {m}")
        return
    own = _max_err(ref_same_dtype, ref_fp32)
    got = _max_err(kernel, ref_fp32)
    assert got <= 2 * own + 1e-6, f"{name} ({dtype}): error {got:.3g} > 2x the reference's own error {own:.3g}"


# ------------------------------------------------------------------------------------------------
# Adam / AdamW


def _adam_state(sizes, dtype, amsgrad, misaligned=()):
    """Lists of the Adam state; `misaligned` names the lists whose tensors are misaligned."""
    mk = lambda name, **kw: [_tensor(n, dtype, misaligned=name in misaligned, **kw) for n in sizes]  # noqa: E731
    return dict(
        params=mk("params"),
        exp_avgs=mk("exp_avgs", scale=0.1),
        exp_avg_sqs=mk("exp_avg_sqs", positive=True, scale=0.01),
        max_exp_avg_sqs=mk("max_exp_avg_sqs", positive=True, scale=0.02) if amsgrad else [],
        state_steps=[torch.tensor(float(random.randint(0, 50)), device=DEV) for _ in sizes],
    )


STATE_NAMES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _run_adam(op, sizes, dtype, *, amsgrad, maximize, weight_decay, misaligned=(), extra_kw=None, steps=STEPS):
    """Runs `steps` steps of the CUDA kernel, the reference in `dtype` and the reference in fp32 on
    the same data (fresh gradients each step) and compares everything, step counters included."""
    _require(op)
    kernel = _adam_state(sizes, dtype, amsgrad, misaligned)
    same = {k: _clone(v) for k, v in kernel.items()}
    fp32 = {k: (_f32(v) if k != "state_steps" else _clone(v)) for k, v in kernel.items()}
    steps0 = [s.item() for s in kernel["state_steps"]]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad,
              maximize=maximize)
    kw.update(extra_kw or {})
    decoupled = op == "fused_adamw_"
    for _ in range(steps):
        grads = [_tensor(n, dtype, misaligned="grads" in misaligned) for n in sizes]
        _op(op)(kernel["params"], grads, kernel["exp_avgs"], kernel["exp_avg_sqs"], kernel["max_exp_avg_sqs"],
                kernel["state_steps"], **kw)
        for lists, g in ((same, _clone(grads)), (fp32, _f32(grads))):
            ref.fused_adam_(lists["params"], g, lists["exp_avgs"], lists["exp_avg_sqs"], lists["max_exp_avg_sqs"],
                            lists["state_steps"], decoupled_weight_decay=decoupled, **kw)
    torch.cuda.synchronize()
    for name in STATE_NAMES:
        _check_lists(name, kernel[name], same[name], fp32[name], dtype)
    assert [s.item() for s in kernel["state_steps"]] == [s0 + steps for s0 in steps0]
    return kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["fused_adam_", "fused_adamw_"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["nowd", "wd"])
def test_adam_odd_sizes(dtype, op, amsgrad, maximize, weight_decay):
    torch.manual_seed(0)
    random.seed(0)
    _run_adam(op, ODD_SIZES, dtype, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_adam_300_small_tensors(dtype, amsgrad):
    torch.manual_seed(1)
    random.seed(1)
    sizes = [random.randint(1, 300) for _ in range(300)]
    _run_adam("fused_adamw_", sizes, dtype, amsgrad=amsgrad, maximize=False, weight_decay=0.01)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("misaligned", [
    ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),  # every list: scalar path
    ("grads",),        # only the gradients
    ("exp_avg_sqs",),  # only one state list
    ("max_exp_avg_sqs",),
], ids=["all", "grads", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_adam_misaligned(dtype, misaligned):
    torch.manual_seed(2)
    random.seed(2)
    _run_adam("fused_adam_", [1, 7, 4097, 65537], dtype, amsgrad=True, maximize=False, weight_decay=0.05,
              misaligned=misaligned)


def test_adam_large_tensor_many_chunks():
    torch.manual_seed(3)
    random.seed(3)
    _run_adam("fused_adamw_", [(1 << 21) + 5, 3], torch.float32, amsgrad=False, maximize=False, weight_decay=0.01,
              steps=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", ["unscale", "unscale+clip", "clip-only", "clip-inactive"])
def test_adam_grad_scale_and_clipping(dtype, clip):
    torch.manual_seed(4)
    random.seed(4)
    extra = {}
    if clip.startswith("unscale"):
        extra["grad_scale"] = torch.tensor(512.0, device=DEV)
        extra["found_inf"] = torch.tensor(0.0, device=DEV)
    if "clip" in clip:
        # grads are ~N(0, 1) (times grad_scale when scaled: the norm is of the scaled gradients)
        scale = 512.0 if "unscale" in clip else 1.0
        norm = 40.0 * scale
        extra["grad_norm"] = torch.tensor(norm, device=DEV)
        extra["max_grad_norm"] = 1e9 if clip == "clip-inactive" else 2.0
    _run_adam("fused_adamw_", [1, 4097, 65537], dtype, amsgrad=False, maximize=False, weight_decay=0.01,
              extra_kw=extra)


@pytest.mark.parametrize("steps0", [0.0, 1.0, 999.0, 123456.0])
def test_adam_bias_correction_at_any_step(steps0):
    _require("fused_adam_")
    torch.manual_seed(5)
    st = _adam_state([4097], torch.float32, amsgrad=False)
    st["state_steps"] = [torch.tensor(steps0, device=DEV)]
    other = {k: _clone(v) for k, v in st.items()}
    grads = [_tensor(4097, torch.float32)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    _op("fused_adam_")(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], [], st["state_steps"], **kw)
    ref.fused_adam_(other["params"], _clone(grads), other["exp_avgs"], other["exp_avg_sqs"], [], other["state_steps"],
                    decoupled_weight_decay=False, **kw)
    torch.testing.assert_close(st["params"][0], other["params"][0], rtol=1e-5, atol=1e-6)
    assert st["state_steps"][0].item() == steps0 + 1


# ------------------------------------------------------------------------------------------------
# SGD


def _run_sgd(sizes, dtype, *, momentum, dampening, nesterov, maximize, weight_decay, misaligned=False,
             extra_kw=None, steps=STEPS):
    _require("fused_sgd_")
    params = [_tensor(n, dtype, misaligned=misaligned) for n in sizes]
    bufs = [_tensor(n, dtype, misaligned=misaligned) for n in sizes] if momentum != 0 else []
    same_p, same_b = _clone(params), _clone(bufs)
    f_p, f_b = _f32(params), _f32(bufs)
    kw = dict(lr=1e-2, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
              maximize=maximize)
    kw.update(extra_kw or {})
    for step in range(steps):
        grads = [_tensor(n, dtype, misaligned=misaligned) for n in sizes]
        first = step == 0  # torch writes the buffer with the gradient on its first step
        _op("fused_sgd_")(params, grads, bufs, is_first_step=first, **kw)
        ref.fused_sgd_(same_p, _clone(grads), same_b, is_first_step=first, **kw)
        ref.fused_sgd_(f_p, _f32(grads), f_b, is_first_step=first, **kw)
    torch.cuda.synchronize()
    _check_lists("params", params, same_p, f_p, dtype)
    _check_lists("momentum_buffers", bufs, same_b, f_b, dtype)


SGD_MODES = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False),
    "dampening": dict(momentum=0.9, dampening=0.3, nesterov=False),
    "nesterov": dict(momentum=0.8, dampening=0.0, nesterov=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(SGD_MODES))
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["nowd", "wd"])
def test_sgd_odd_sizes(dtype, mode, maximize, weight_decay):
    torch.manual_seed(6)
    _run_sgd(ODD_SIZES, dtype, maximize=maximize, weight_decay=weight_decay, **SGD_MODES[mode])


@pytest.mark.parametrize("steps", [1, 2], ids=["first-step-only", "first-then-later"])
def test_sgd_first_step_writes_the_gradient(steps):
    torch.manual_seed(7)
    _run_sgd([5, 4097], torch.float32, momentum=0.9, dampening=0.5, nesterov=False, maximize=False,
             weight_decay=0.1, steps=steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_misaligned_and_many_tensors(dtype):
    torch.manual_seed(8)
    random.seed(8)
    _run_sgd([1, 3, 4097, 65537], dtype, momentum=0.9, dampening=0.1, nesterov=False, maximize=False,
             weight_decay=0.0, misaligned=True)
    _run_sgd([random.randint(1, 300) for _ in range(300)], dtype, momentum=0.9, dampening=0.0, nesterov=True,
             maximize=False, weight_decay=0.01)


def test_sgd_grad_scale_and_clipping():
    torch.manual_seed(9)
    extra = dict(grad_scale=torch.tensor(64.0, device=DEV), found_inf=torch.tensor(0.0, device=DEV),
                 grad_norm=torch.tensor(64.0 * 30.0, device=DEV), max_grad_norm=1.5)
    _run_sgd([3, 65537], torch.float32, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
             weight_decay=0.0, extra_kw=extra)


# ------------------------------------------------------------------------------------------------
# found_inf, empty lists, streams, rejected input


@pytest.mark.parametrize("inf_value", [1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("op", ["fused_adam_", "fused_adamw_", "fused_sgd_"])
def test_found_inf_changes_nothing(op, inf_value):
    _require(op)
    torch.manual_seed(10)
    sizes = [1, 4097, 65537, 0]
    params = [_tensor(n, torch.float32) for n in sizes]
    grads = [_tensor(n, torch.float32) for n in sizes]
    states = [[_tensor(n, torch.float32, positive=True) for n in sizes] for _ in range(3)]
    steps = [torch.tensor(7.0, device=DEV) for _ in sizes]
    before = [_clone(params)] + [_clone(s) for s in states] + [_clone(steps)]
    control = dict(grad_scale=torch.tensor(128.0, device=DEV), found_inf=torch.tensor(inf_value, device=DEV),
                   grad_norm=torch.tensor(10.0, device=DEV), max_grad_norm=1.0)
    if op == "fused_sgd_":
        _op(op)(params, grads, states[0], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False,
                maximize=False, is_first_step=False, **control)
    else:
        _op(op)(params, grads, states[0], states[1], states[2], steps, lr=0.1, beta1=0.9, beta2=0.999,
                weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False, **control)
    torch.cuda.synchronize()
    after = [params] + states + [steps]
    for b_list, a_list in zip(before, after):
        for b, a in zip(b_list, a_list):
            assert torch.equal(a, b)  # bitwise: nothing written at all
    assert all(s.item() == 7.0 for s in steps)


def test_found_inf_zero_updates_and_counts_steps():
    _require("fused_adam_")
    st = _adam_state([3], torch.float32, amsgrad=False)
    s0 = st["state_steps"][0].item()
    p0 = st["params"][0].clone()
    _op("fused_adam_")(st["params"], [_tensor(3, torch.float32)], st["exp_avgs"], st["exp_avg_sqs"], [],
                       st["state_steps"], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                       maximize=False, found_inf=torch.tensor(0.0, device=DEV))
    torch.cuda.synchronize()
    assert st["state_steps"][0].item() == s0 + 1
    assert not torch.equal(st["params"][0], p0)


def test_empty_lists_are_a_no_op():
    for op in ("fused_adam_", "fused_adamw_", "fused_sgd_"):
        _require(op)
    scale = torch.tensor(2.0, device=DEV)  # a CUDA tensor argument, so the CUDA kernel is the one called
    _op("fused_adamw_")([], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                        amsgrad=False, maximize=False, grad_scale=scale)
    _op("fused_adam_")([], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                       amsgrad=True, maximize=False, grad_scale=scale)
    _op("fused_sgd_")([], [], [], lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                      maximize=False, is_first_step=True, grad_scale=scale)
    torch.cuda.synchronize()


def test_only_empty_tensors_still_count_steps():
    _require("fused_adam_")
    st = _adam_state([0, 0], torch.float32, amsgrad=False)
    s0 = [s.item() for s in st["state_steps"]]
    _op("fused_adam_")(st["params"], [_tensor(0, torch.float32)] * 2, st["exp_avgs"], st["exp_avg_sqs"], [],
                       st["state_steps"], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                       maximize=False)
    torch.cuda.synchronize()
    assert [s.item() for s in st["state_steps"]] == [s + 1 for s in s0]


def test_non_contiguous_grads():
    _require("fused_adamw_")
    torch.manual_seed(11)
    shapes = [(33, 65), (128, 257)]
    params = [torch.randn(s, device=DEV) for s in shapes]
    grads = [torch.randn(s[::-1], device=DEV).t() for s in shapes]  # transposed views
    assert not any(g.is_contiguous() for g in grads)
    m = [torch.randn(s, device=DEV) * 0.1 for s in shapes]
    v = [torch.rand(s, device=DEV) * 0.01 for s in shapes]
    steps = [torch.tensor(3.0, device=DEV) for _ in shapes]
    r = [_clone(x) for x in (params, m, v, steps)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    _op("fused_adamw_")(params, grads, m, v, [], steps, **kw)
    ref.fused_adam_(r[0], [g.clone() for g in grads], r[1], r[2], [], r[3], decoupled_weight_decay=True, **kw)
    for a, b in zip(params + m + v + steps, r[0] + r[1] + r[2] + r[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_runs_on_the_current_stream():
    _require("fused_adamw_")
    torch.manual_seed(12)
    st = _adam_state([65537, 3], torch.float32, amsgrad=True)
    other = {k: _clone(v) for k, v in st.items()}
    grads = [_tensor(n, torch.float32) for n in (65537, 3)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=True, maximize=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        scale = torch.tensor(4.0, device=DEV)  # made on the side stream, read by the kernel there
        _op("fused_adamw_")(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
                            st["state_steps"], grad_scale=scale, **kw)
    side.synchronize()
    ref.fused_adam_(other["params"], _clone(grads), other["exp_avgs"], other["exp_avg_sqs"], other["max_exp_avg_sqs"],
                    other["state_steps"], decoupled_weight_decay=True, grad_scale=torch.tensor(4.0, device=DEV), **kw)
    for name in (*STATE_NAMES, "state_steps"):
        for a, b in zip(st[name], other[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_input_is_rejected_and_nothing_changes():
    _require("fused_adam_")
    _require("fused_sgd_")
    st = _adam_state([5], torch.float32, amsgrad=False)
    before = {k: _clone(v) for k, v in st.items()}
    g = [_tensor(5, torch.float32)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    lists = (st["params"], g, st["exp_avgs"], st["exp_avg_sqs"], [], st["state_steps"])
    bad = [
        (dict(kw, lr=-1.0), "learning rate"),
        (dict(kw, eps=-1.0), "epsilon"),
        (dict(kw, beta1=1.0), "beta parameter at index 0"),
        (dict(kw, beta2=-0.1), "beta parameter at index 1"),
        (dict(kw, weight_decay=-0.5), "weight_decay"),
        (dict(kw, amsgrad=True), "max_exp_avg_sqs"),  # amsgrad needs the list
        (dict(kw, found_inf=torch.tensor(0.0)), "found_inf"),  # on the CPU
        (dict(kw, grad_scale=torch.tensor([1.0, 2.0], device=DEV)), "grad_scale"),
    ]
    for kwargs, match in bad:
        with pytest.raises(RuntimeError, match=match):
            _op("fused_adam_")(*lists, **kwargs)
    with pytest.raises(RuntimeError, match="shape"):
        _op("fused_adam_")(st["params"], [_tensor(6, torch.float32)], *lists[2:], **kw)
    with pytest.raises(RuntimeError, match="Nesterov"):
        _op("fused_sgd_")(st["params"], g, [torch.zeros(5, device=DEV)], lr=0.1, momentum=0.9, dampening=0.5,
                          weight_decay=0.0, nesterov=True, maximize=False, is_first_step=False)
    torch.cuda.synchronize()
    for k, v in st.items():
        for a, b in zip(v, before[k]):
            assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------------
# sum_of_squares


def _sos_fp64(tensors):
    return sum(t.double().square().sum().item() for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_of_squares_odd_sizes_and_misaligned(dtype):
    _require("sum_of_squares")
    torch.manual_seed(13)
    ts = [_tensor(n, dtype) for n in ODD_SIZES]
    ts += [_tensor(n, dtype, misaligned=True) for n in (1, 3, 4097, 65537)]
    ts += [torch.randn(64, 33, device=DEV).to(dtype).t()]  # non-contiguous
    out = _op("sum_of_squares")(ts)
    assert out.dtype == torch.float32 and out.dim() == 0 and out.device.type == "cuda"
    torch.testing.assert_close(out.double().cpu(), torch.tensor(_sos_fp64(ts), dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
    torch.testing.assert_close(out, ref.sum_of_squares(ts), rtol=1e-5, atol=0.0)


def test_sum_of_squares_300_small_tensors():
    _require("sum_of_squares")
    torch.manual_seed(14)
    random.seed(14)
    ts = [_tensor(random.randint(1, 300), torch.float32) for _ in range(300)]
    out = _op("sum_of_squares")(ts)
    torch.testing.assert_close(out.double().cpu(), torch.tensor(_sos_fp64(ts), dtype=torch.float64),
                               rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sum_of_squares_over_2_pow_24_elements_is_deterministic(dtype):
    _require("sum_of_squares")
    torch.manual_seed(15)
    ts = [_tensor((1 << 24) + 77, dtype), _tensor(3, dtype)]
    out = _op("sum_of_squares")(ts)
    torch.testing.assert_close(out.double().cpu(), torch.tensor(_sos_fp64(ts), dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
    for _ in range(3):
        assert torch.equal(_op("sum_of_squares")(ts), out)  # same partials, same order: bitwise


def test_sum_of_squares_only_empty_tensors_is_zero():
    _require("sum_of_squares")
    out = _op("sum_of_squares")([torch.empty(0, device=DEV), torch.empty(0, 3, device=DEV)])
    assert out.item() == 0.0


def test_sum_of_squares_feeds_clipping():
    """The reduction and the fused step together: clip_grad_norm_-style training step."""
    _require("sum_of_squares")
    _require("fused_adamw_")
    torch.manual_seed(16)
    sizes = [3, 4097, 65537]
    st = _adam_state(sizes, torch.float32, amsgrad=False)
    other = {k: _clone(v) for k, v in st.items()}
    grads = [_tensor(n, torch.float32) * 10 for n in sizes]
    norm = _op("sum_of_squares")(grads).sqrt()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
              grad_norm=norm, max_grad_norm=1.0)
    _op("fused_adamw_")(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], [], st["state_steps"], **kw)
    ref.fused_adam_(other["params"], _clone(grads), other["exp_avgs"], other["exp_avg_sqs"], [],
                    other["state_steps"], decoupled_weight_decay=True, **kw)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for a, b in zip(st[name], other[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
