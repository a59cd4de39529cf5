"""Triton fused-optimizer kernels vs bigkernels.reference.optim.

Runs under the Triton interpreter on CPU tensors (its own pytest process, with TRITON_INTERPRET=1
set before triton is imported) or on a CUDA GPU; skipped otherwise.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_DEVICE, skip_module_without_triton_runtime

skip_module_without_triton_runtime()

import bigkernels.ops.optim  # noqa: E402,F401  (defines the main schemas)
from bigkernels.reference import optim as ref  # noqa: E402
from bigkernels.triton import optim as tri  # noqa: E402

pytestmark = pytest.mark.triton_interpret

DEVICE = TRITON_DEVICE
OPS = torch.ops.bigkernels
SHAPES = [(1,), (3,), (129,), (5, 7), (0,)]  # odd sizes; 129 spans several chunks under the interpreter


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, gen, scale=1.0, positive=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    if positive:
        t = t.abs()
    return t.to(device=DEVICE, dtype=dtype)


def _clone(lists):
    return [[t.clone() for t in lst] for lst in lists]


def _adam_state(gen, dtype, shapes=SHAPES, amsgrad=True):
    params = [_rand(s, dtype, gen) for s in shapes]
    exp_avgs = [_rand(s, dtype, gen, 0.1) for s in shapes]
    exp_avg_sqs = [_rand(s, dtype, gen, 0.01, positive=True) for s in shapes]
    max_sqs = [v + _rand(v.shape, dtype, gen, 0.01, positive=True) for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(3 * i), device=DEVICE) for i in range(len(shapes))]
    return [params, exp_avgs, exp_avg_sqs, max_sqs, steps]


def _grads(gen, params, scale=1.0):
    return [_rand(p.shape, p.dtype, gen, scale) for p in params]


def _assert_close_lists(actual, expected, rtol, atol, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def _max_err(a, b):
    return max([0.0] + [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()])


def _scaling(kind, gen):
    """grad_scale / grad_norm / max_grad_norm for a scaling scenario; grads are multiplied by the scale."""
    if kind == "none":
        return 1.0, {}
    scale = 1024.0
    kw = {}
    if kind in ("scale", "scale+clip"):
        kw["grad_scale"] = torch.tensor(scale, device=DEVICE)
    else:
        scale = 1.0
    if kind in ("clip", "scale+clip"):
        # A global norm well above max_grad_norm, so clipping is active.
        kw["grad_norm"] = torch.tensor(37.5 * scale, device=DEVICE)
        kw["max_grad_norm"] = 1.0
    return scale, kw


def _adam_kwargs(amsgrad, maximize, weight_decay, **extra):
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad,
                maximize=maximize, **extra)


def _run_adam(decoupled, state, grads, kw):
    params, exp_avgs, exp_avg_sqs, max_sqs, steps = state
    op = OPS.fused_adamw_triton_ if decoupled else OPS.fused_adam_triton_
    op(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, **{"masks": [], **kw})


def _run_adam_ref(decoupled, state, grads, kw):
    params, exp_avgs, exp_avg_sqs, max_sqs, steps = state
    ref.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, decoupled_weight_decay=decoupled, **kw)


# ------------------------------------------------------------------------------------ Adam(W)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_adam_fp32_matches_reference(decoupled, amsgrad, maximize, weight_decay):
    gen = _gen(1000 + 8 * decoupled + 4 * amsgrad + 2 * maximize + int(weight_decay > 0))
    state = _adam_state(gen, torch.float32, amsgrad=amsgrad)
    expected = _clone(state)
    kw = _adam_kwargs(amsgrad, maximize, weight_decay)
    for _ in range(4):
        grads = _grads(gen, state[0])
        _run_adam(decoupled, state, grads, kw)
        _run_adam_ref(decoupled, expected, grads, kw)
    for name, a, e in zip(("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"), state, expected):
        _assert_close_lists(a, e, rtol=1e-5, atol=1e-6, what=name)
    assert [s.item() for s in state[4]] == [3.0 * i + 4 for i in range(len(SHAPES))]


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_adam_fp16_error_bounded_by_reference(decoupled, amsgrad):
    """fp16 kernel error vs an fp32 reference <= 2x the fp16 reference's own error (+ 1 ulp slack)."""
    gen = _gen(2000 + 2 * decoupled + amsgrad)
    state16 = _adam_state(gen, torch.float16, amsgrad=amsgrad)
    ref16 = _clone(state16)
    ref32 = [[t.float() for t in lst] for lst in state16]
    ref32[4] = [s.clone() for s in state16[4]]
    kw = _adam_kwargs(amsgrad, True, 0.05)
    for _ in range(3):
        grads16 = _grads(gen, state16[0])
        _run_adam(decoupled, state16, grads16, kw)
        _run_adam_ref(decoupled, ref16, grads16, kw)
        _run_adam_ref(decoupled, ref32, [g.float() for g in grads16], kw)
    for k in range(4):
        err_kernel = _max_err(state16[k], ref32[k])
        err_ref = _max_err(ref16[k], ref32[k])
        assert err_kernel <= 2 * err_ref + 1e-3, (k, err_kernel, err_ref)
    assert [s.item() for s in state16[4]] == [s.item() for s in ref16[4]]


@pytest.mark.parametrize("kind", ["scale", "clip", "scale+clip"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_grad_scale_and_clipping(kind, decoupled):
    gen = _gen(3000 + 2 * ["scale", "clip", "scale+clip"].index(kind) + decoupled)
    scale, extra = _scaling(kind, gen)
    state = _adam_state(gen, torch.float32, amsgrad=True)
    expected = _clone(state)
    kw = _adam_kwargs(True, False, 0.1, found_inf=torch.zeros(1, device=DEVICE), **extra)
    for _ in range(3):
        grads = _grads(gen, state[0], scale)
        _run_adam(decoupled, state, grads, kw)
        _run_adam_ref(decoupled, expected, grads, kw)
    for a, e in zip(state, expected):
        _assert_close_lists(a, e, rtol=1e-5, atol=1e-6)
    # Clipping really changed the result: the unclipped update differs.
    if "clip" in kind:
        unclipped = _clone(expected)
        kw_noclip = dict(kw, max_grad_norm=0.0)
        grads = _grads(gen, state[0], scale)
        _run_adam_ref(decoupled, unclipped, grads, kw_noclip)
        _run_adam_ref(decoupled, expected, grads, kw)
        assert not torch.allclose(unclipped[0][2], expected[0][2])


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_found_inf_changes_nothing(decoupled):
    gen = _gen(4000 + decoupled)
    state = _adam_state(gen, torch.float32, amsgrad=True)
    before = _clone(state)
    grads = _grads(gen, state[0])
    grads[2][5] = float("inf")
    kw = _adam_kwargs(True, False, 0.1, grad_scale=torch.tensor(2.0, device=DEVICE),
                      found_inf=torch.ones(1, device=DEVICE))
    _run_adam(decoupled, state, grads, kw)
    for a, b in zip(state, before):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_adam_non_contiguous_and_cache():
    gen = _gen(5000)
    state = _adam_state(gen, torch.float32, shapes=[(6, 5), (4,)], amsgrad=False)
    state[0][0] = _rand((5, 6), torch.float32, gen).t()  # a non-contiguous param
    assert not state[0][0].is_contiguous()
    expected = _clone(state)
    expected[0][0] = state[0][0].clone().t().contiguous().t()
    kw = _adam_kwargs(False, False, 0.1)
    grads = _grads(gen, state[0])
    _run_adam(True, state, grads, kw)
    _run_adam_ref(True, expected, grads, kw)
    for a, e in zip(state, expected):
        _assert_close_lists(a, e, rtol=1e-5, atol=1e-6)
    # Same contiguous tensors twice: the second call reuses the cached table.
    state = _adam_state(gen, torch.float32, shapes=[(6, 5), (4,)], amsgrad=False)
    _run_adam(True, state, _grads(gen, state[0]), kw)
    size = len(tri._TABLE_CACHE)
    assert size > 0  # eager calls take the single-launch table path
    _run_adam(True, state, _grads(gen, state[0]), kw)
    assert len(tri._TABLE_CACHE) == size


def test_adam_rejects_bad_input_without_changes():
    gen = _gen(6000)
    state = _adam_state(gen, torch.float32, shapes=[(3,), (4,)], amsgrad=False)
    before = _clone(state)
    kw = _adam_kwargs(False, False, 0.0)
    params, exp_avgs, exp_avg_sqs, max_sqs, steps = state
    with pytest.raises(ValueError, match="grads"):
        OPS.fused_adam_triton_(params, [torch.randn(3, device=DEVICE)], exp_avgs, exp_avg_sqs, max_sqs, steps,
                               masks=[], **kw)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        bad = [torch.randn(3, device=DEVICE), torch.randn(5, device=DEVICE)]
        OPS.fused_adam_triton_(params, bad, exp_avgs, exp_avg_sqs, max_sqs, steps, masks=[], **kw)
    for a, b in zip(state, before):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------------ SGD


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "momentum,dampening,nesterov",
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)],
    ids=["plain", "momentum", "dampening", "nesterov"],
)
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_sgd_matches_reference(dtype, momentum, dampening, nesterov, maximize):
    gen = _gen(7000 + int(momentum * 10) + int(dampening * 100) + 2 * nesterov + maximize)
    params = [_rand(s, dtype, gen) for s in SHAPES]
    bufs = [torch.full(s, float("nan"), device=DEVICE, dtype=dtype) for s in SHAPES] if momentum else []
    mine = [params, bufs]
    expected = _clone(mine)
    base = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=0.01, nesterov=nesterov,
                maximize=maximize)
    for step in range(3):  # the first step must overwrite the (poisoned) buffers
        grads = _grads(gen, params)
        kw = dict(base, is_first_step=step == 0)
        OPS.fused_sgd_triton_(mine[0], grads, mine[1], masks=[], **kw)
        ref.fused_sgd_(expected[0], grads, expected[1], **kw)
    if dtype == torch.float32:
        for a, e in zip(mine, expected):
            _assert_close_lists(a, e, rtol=1e-5, atol=1e-6)
    else:
        for a, e in zip(mine, expected):  # same fp32 maths, same fp16 rounding: within one fp16 ulp
            _assert_close_lists(a, e, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["scale", "clip", "scale+clip"])
def test_sgd_grad_scale_and_clipping(kind):
    gen = _gen(8000 + ["scale", "clip", "scale+clip"].index(kind))
    scale, extra = _scaling(kind, gen)
    params = [_rand(s, torch.float32, gen) for s in SHAPES]
    bufs = [_rand(s, torch.float32, gen) for s in SHAPES]
    mine = [params, bufs]
    expected = _clone(mine)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
              is_first_step=False, found_inf=torch.zeros(1, device=DEVICE), **extra)
    for _ in range(2):
        grads = _grads(gen, params, scale)
        OPS.fused_sgd_triton_(mine[0], grads, mine[1], masks=[], **kw)
        ref.fused_sgd_(expected[0], grads, expected[1], **kw)
    for a, e in zip(mine, expected):
        _assert_close_lists(a, e, rtol=1e-5, atol=1e-6)


def test_sgd_found_inf_changes_nothing():
    gen = _gen(9000)
    params = [_rand(s, torch.float32, gen) for s in SHAPES]
    bufs = [_rand(s, torch.float32, gen) for s in SHAPES]
    before = _clone([params, bufs])
    OPS.fused_sgd_triton_(params, _grads(gen, params), bufs, masks=[], lr=0.1, momentum=0.9, dampening=0.0,
                          weight_decay=0.0, nesterov=False, maximize=False, is_first_step=False,
                          found_inf=torch.tensor([1.0], device=DEVICE))
    for a, b in zip([params, bufs], before):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------------ sum_of_squares


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.float32, torch.float16)],
                         ids=["fp32", "fp16", "mixed"])
def test_sum_of_squares_matches_fp64(dtypes):
    gen = _gen(10000 + len(dtypes) + int(dtypes[0] == torch.float16))
    tensors = [_rand(s, dtypes[i % len(dtypes)], gen, 3.0) for i, s in enumerate(SHAPES + [(2, 65)])]
    tensors.append(_rand((9, 4), dtypes[0], gen).t())  # non-contiguous
    out = OPS.sum_of_squares_triton(tensors)
    expected = sum(t.double().square().sum() for t in tensors)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(out, ref.sum_of_squares(tensors), rtol=1e-5, atol=0)
    assert torch.equal(OPS.sum_of_squares_triton(tensors), out)  # deterministic


# ------------------------------------------------------------------------------------ opcheck / compile


def _small_adam_args(gen, amsgrad):
    params, exp_avgs, exp_avg_sqs, max_sqs, steps = _adam_state(gen, torch.float32, shapes=[(3,), (5,)],
                                                                amsgrad=amsgrad)
    return (params, _grads(gen, params), exp_avgs, exp_avg_sqs, max_sqs, steps)


@pytest.mark.parametrize("name", ["fused_adam_triton_", "fused_adamw_triton_"])
def test_opcheck_adam(name):
    gen = _gen(11000)
    kw = _adam_kwargs(True, False, 0.1, grad_scale=torch.tensor(2.0, device=DEVICE),
                      found_inf=torch.zeros(1, device=DEVICE))
    torch.library.opcheck(getattr(OPS, name).default, _small_adam_args(gen, True), dict(kw, masks=[]))


def test_opcheck_sgd():
    gen = _gen(12000)
    params = [_rand(s, torch.float32, gen) for s in [(3,), (5,)]]
    args = (params, _grads(gen, params), [_rand(p.shape, torch.float32, gen) for p in params])
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False,
              is_first_step=False, grad_norm=torch.tensor(5.0, device=DEVICE), max_grad_norm=1.0, masks=[])
    torch.library.opcheck(OPS.fused_sgd_triton_.default, args, kw)


def test_opcheck_sum_of_squares():
    gen = _gen(13000)
    torch.library.opcheck(OPS.sum_of_squares_triton.default, ([_rand((3,), torch.float32, gen),
                                                               _rand((70,), torch.float32, gen)],))


@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["finite", "found_inf"])
def test_compiled_adamw_matches_eager(found_inf):
    """torch.compile traces the op into per-tensor kernel launches (the traced path)."""
    gen = _gen(14000)
    args = _small_adam_args(gen, True)
    before = _clone(args)
    expected = _clone(args)
    kw = _adam_kwargs(True, False, 0.1, found_inf=torch.full((1,), found_inf, device=DEVICE), masks=[])
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    @torch.compile(backend=backend, fullgraph=True)
    def step(*a):
        OPS.fused_adamw_triton_(*a, **kw)

    step(*args)
    OPS.fused_adamw_triton_(*expected, **kw)
    for a, e in zip(args, expected):
        _assert_close_lists(a, e, rtol=1e-5, atol=1e-6)
    if found_inf:
        for a, b in zip(args, before):
            _assert_close_lists(a, b, rtol=0, atol=0)
    else:
        assert not torch.equal(args[0][0], before[0][0])
        assert [s.item() for s in args[5]] == [s.item() + 1 for s in before[5]]


def test_non_contiguous_placeholders_keep_updates():
    """Non-contiguous tensors in a list the kernel reuses as a placeholder row are updated once."""
    gen = _gen(15000)
    params = [_rand((4, 3), torch.float32, gen).t(), _rand((5,), torch.float32, gen)]
    expected = [p.clone() for p in params]
    grads = _grads(gen, params)
    kw = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
              is_first_step=True)
    OPS.fused_sgd_triton_(params, grads, [], masks=[], **kw)
    ref.fused_sgd_(expected, grads, [], **kw)
    _assert_close_lists(params, expected, rtol=1e-5, atol=1e-6)
    state = _adam_state(gen, torch.float32, shapes=[(3, 4)], amsgrad=False)
    state[2][0] = _rand((4, 3), torch.float32, gen, 0.01, positive=True).t()
    expected = _clone(state)
    grads = _grads(gen, state[0])
    kw = _adam_kwargs(False, False, 0.0)
    _run_adam(False, state, grads, kw)
    _run_adam_ref(False, expected, grads, kw)
    for a, e in zip(state, expected):
        _assert_close_lists(a, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ masks


def _masks(gen, params):
    return [(torch.rand(p.shape, generator=gen) > 0.4).to(DEVICE) for p in params]


@pytest.mark.parametrize("traced", [False, True], ids=["table", "traced"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_masks_zero_pruned_params(kind, traced):
    """Pruned params stored as 0 in the same pass, kept ones as without masks; both launch paths."""
    gen = _gen(16000 + traced)
    if kind == "adamw":
        state = _adam_state(gen, torch.float32, amsgrad=True)
        args = [state[0], _grads(gen, state[0]), state[1], state[2], state[3], state[4]]
        kw = _adam_kwargs(True, False, 0.1)
        op, run_ref = OPS.fused_adamw_triton_, lambda *a, **k: ref.fused_adam_(*a, decoupled_weight_decay=True, **k)
    else:
        params = [_rand(s, torch.float32, gen) for s in SHAPES]
        args = [params, _grads(gen, params), [_rand(p.shape, torch.float32, gen) for p in params]]
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
                  is_first_step=False)
        op, run_ref = OPS.fused_sgd_triton_, ref.fused_sgd_
    masks = _masks(gen, args[0])
    expected, unmasked = _clone(args), _clone(args)
    if traced:
        torch._dynamo.reset()
        torch.compile(lambda *a: op(*a, **kw, masks=masks), backend="aot_eager", fullgraph=True)(*args)
    else:
        op(*args, **kw, masks=masks)
    run_ref(*expected, **kw, masks=masks)
    op(*unmasked, **kw, masks=[])
    for i, (p, e, free, m) in enumerate(zip(args[0], expected[0], unmasked[0], masks)):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
        assert (p[~m] == 0).all() and torch.equal(p[m], free[m]), f"params[{i}]"
    for a, b in zip(args[2:], unmasked[2:]):
        _assert_close_lists(a, b, rtol=0, atol=0, what="state")


def test_masks_opcheck_and_rejected():
    gen = _gen(17000)
    args = _small_adam_args(gen, False)
    masks = _masks(gen, args[0])
    kw = _adam_kwargs(False, False, 0.0)
    torch.library.opcheck(OPS.fused_adamw_triton_.default, args, dict(kw, masks=masks))
    before = _clone(args)
    for bad, msg in ((masks[:-1], "masks"), ([m.float() for m in masks], "bool")):
        with pytest.raises(ValueError, match=msg):
            OPS.fused_adamw_triton_(*args, **kw, masks=bad)
    for a, b in zip(args, before):
        _assert_close_lists(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ table path


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(tri, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, name, spy)
    return calls


@pytest.mark.parametrize("kind", ["adamw", "sgd", "sum_of_squares"])
def test_parameters_take_the_one_launch_table_path(kind, monkeypatch):
    """nn.Parameter lists (what every optimizer passes) take the table path: one table, one update
    launch for all tensors; the per-tensor launches are for tracing only (it was never taken:
    ``type(t) is torch.Tensor`` is False for nn.Parameter)."""
    gen = _gen(18000)
    tables = _count_calls(monkeypatch, "_table")
    per_tensor = []
    real_launcher = tri.launcher

    def launcher(kernel, traced=True):
        if traced and kernel is not tri._sum_partials_kernel:
            per_tensor.append(kernel)
        return real_launcher(kernel, traced)

    monkeypatch.setattr(tri, "launcher", launcher)
    params = [torch.nn.Parameter(_rand(s, torch.float32, gen)) for s in SHAPES]
    expected = [p.detach().clone() for p in params]
    grads = _grads(gen, expected)
    with torch.no_grad():  # as optimizers step
        _step_parameters(kind, params, expected, grads, gen)
    assert len(tables) == 1, f"{kind}: {len(tables)} tables built"
    assert not per_tensor, f"{kind}: per-tensor launches of {[k.__name__ for k in per_tensor]}"
    _assert_close_lists([p.detach() for p in params], expected, rtol=1e-5, atol=1e-6, what=kind)


def _step_parameters(kind, params, expected, grads, gen):
    if kind == "adamw":
        state = [[_rand(s, torch.float32, gen, 0.1) for s in SHAPES],
                 [_rand(s, torch.float32, gen, 0.01, positive=True) for s in SHAPES]]
        steps = [torch.tensor(1.0, device=DEVICE) for _ in SHAPES]
        exp_state = _clone(state) + [[s.clone() for s in steps]]
        kw = _adam_kwargs(False, False, 0.1)
        OPS.fused_adamw_triton_(params, grads, *state, [], steps, [], **kw)
        ref.fused_adam_(expected, grads, *exp_state[:2], [], exp_state[2], decoupled_weight_decay=True, **kw)
    elif kind == "sgd":
        bufs = [_rand(s, torch.float32, gen) for s in SHAPES]
        exp_bufs = [b.clone() for b in bufs]
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                  is_first_step=False)
        OPS.fused_sgd_triton_(params, grads, bufs, [], **kw)
        ref.fused_sgd_(expected, grads, exp_bufs, **kw)
    else:
        got = OPS.sum_of_squares_triton(params)
        torch.testing.assert_close(got, ref.sum_of_squares(expected), rtol=1e-6, atol=0)


def test_table_alignment_flag_follows_the_addresses():
    """ALIGNED (vectorised loads of whole blocks) only when every data tensor starts 16-byte aligned."""
    tri.clear_table_cache()
    gen = _gen(18100)
    a = [_rand((100,), torch.float32, gen) for _ in range(3)]
    steps = [torch.zeros((), device=DEVICE) for _ in a]
    _, _, aligned = tri._table([a, a, a, a, steps, a], a[0].device, 64, "t", tri._ADAM_NAMES, step_rows=(4,))
    assert aligned
    buf = torch.zeros(101, device=DEVICE)
    off = buf[1:]  # 4 bytes past an aligned address
    _, _, aligned = tri._table([[off] + a[1:], a, a, a, steps, a], a[0].device, 64, "t", tri._ADAM_NAMES,
                               step_rows=(4,))
    assert not aligned


def test_misaligned_tensors_take_the_scalar_table_path_correctly():
    """A param one element past an aligned address: the unaligned (scalar) kernel, same results."""
    gen = _gen(18200)
    n = 1000
    buf = torch.zeros(n + 1, device=DEVICE)
    p = buf[1:]
    p.copy_(_rand((n,), torch.float32, gen))
    params = [p, _rand((37,), torch.float32, gen)]
    expected = [t.clone() for t in params]
    grads = _grads(gen, params)
    bufs = [_rand(t.shape, torch.float32, gen) for t in params]
    exp_bufs = [b.clone() for b in bufs]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True, maximize=False,
              is_first_step=False)
    OPS.fused_sgd_triton_(params, grads, bufs, [], **kw)
    ref.fused_sgd_(expected, grads, exp_bufs, **kw)
    _assert_close_lists(params, expected, rtol=1e-5, atol=1e-6, what="params")
    _assert_close_lists(bufs, exp_bufs, rtol=1e-5, atol=1e-6, what="momentum")
