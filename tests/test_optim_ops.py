"""The fused optimizer ops (torch.ops.bigkernels.*) against bigkernels.reference.optim, on every
device's compiled kernel: dtypes x shapes (odd, empty, non-contiguous grads), every mode, GradScaler
and clipping inputs, opcheck, torch.compile(fullgraph=True), and rejected input."""
from __future__ import annotations

import copy
import functools
import random

import pytest
import torch

from bigkernels.reference import optim as ref
from conftest import assert_close, devices, poison_, require_kernel

SHAPES = [(5, 123, 123), (1,), (3,), (0,), (4097,), (33, 65), ()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(shape, dtype, device, positive=False, noncontig=False):
    t = torch.randn(shape, device=device, dtype=torch.float32)
    t = t.abs() if positive else t
    if noncontig and len(shape) >= 1 and t.numel() > 1:
        wide = torch.empty(shape[:-1] + (shape[-1] * 2,), device=device, dtype=dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    return t.to(dtype)


def _adam_case(device, dtype, seed, amsgrad):
    gen = random.Random(seed)
    torch.manual_seed(seed)
    lists = dict(
        params=[_rand(s, dtype, device) for s in SHAPES],
        grads=[_rand(s, dtype, device, noncontig=(i % 2 == 0)) for i, s in enumerate(SHAPES)],
        exp_avgs=[_rand(s, dtype, device) * 0.1 for s in SHAPES],
        exp_avg_sqs=[_rand(s, dtype, device, positive=True) * 0.01 for s in SHAPES],
        max_exp_avg_sqs=[_rand(s, dtype, device, positive=True) * 0.01 for s in SHAPES] if amsgrad else [],
        state_steps=[torch.tensor(float(gen.randint(0, 50)), device=device) for _ in SHAPES],
    )
    kw = dict(lr=gen.uniform(1e-4, 1e-1), beta1=gen.uniform(0.5, 0.99), beta2=gen.uniform(0.9, 0.9999),
              weight_decay=gen.choice([0.0, gen.uniform(0, 0.2)]), eps=gen.choice([1e-8, 1e-6]),
              amsgrad=amsgrad, maximize=gen.random() < 0.5)
    if gen.random() < 0.5:
        kw["grad_scale"] = torch.tensor(gen.uniform(0.5, 1024.0), device=device)
    if gen.random() < 0.5:
        kw.update(grad_norm=torch.tensor(gen.uniform(1.0, 300.0), device=device), max_grad_norm=gen.uniform(0.5, 5.0))
    return lists, kw


def _upcast(lists):
    return {k: [t.to(torch.float32, copy=True).contiguous() for t in v] if k != "state_steps" else [t.clone() for t in v]
            for k, v in lists.items()}


def _check_against_reference(kernel_lists, ref_lists, ref32_lists, dtype, names):
    """fp32: rtol 1e-5/atol 1e-6. 16-bit: error vs the fp32 reference within 2x the reference's own."""
    for name in names:
        for i, (k, r, r32) in enumerate(zip(kernel_lists[name], ref_lists[name], ref32_lists[name])):
            if dtype == torch.float32:
                assert_close(k, r, rtol=1e-5, atol=1e-6, what=f"{name}[{i}]")
            else:
                own = (r.double() - r32.double()).abs().max().item() if r.numel() else 0.0
                got = (k.double() - r32.double()).abs().max().item() if k.numel() else 0.0
                assert got <= 2 * own + 1e-6, f"{name}[{i}] ({dtype}): error {got:.3g} > 2x reference error {own:.3g}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["fused_adam_", "fused_adamw_"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_matches_reference(device, dtype, op, amsgrad, cpu_isa):
    require_kernel(op, device)
    for seed in range(3):
        lists, kw = _adam_case(device, dtype, seed * 7 + amsgrad, amsgrad)
        ref_lists, ref32 = copy.deepcopy(lists), _upcast(lists)
        getattr(torch.ops.bigkernels, op)(*lists.values(), **kw)
        decoupled = op == "fused_adamw_"
        ref.fused_adam_(*ref_lists.values(), decoupled_weight_decay=decoupled, **kw)
        ref.fused_adam_(*ref32.values(), decoupled_weight_decay=decoupled, **kw)
        names = ["params", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
        _check_against_reference(lists, ref_lists, ref32, dtype, names)
        for s, r in zip(lists["state_steps"], ref_lists["state_steps"]):
            assert s.item() == r.item()


def _sgd_case(device, dtype, seed, first):
    gen = random.Random(seed)
    torch.manual_seed(seed)
    momentum = gen.choice([0.0, gen.uniform(0.1, 0.99)])
    nesterov = momentum > 0 and gen.random() < 0.5
    lists = dict(
        params=[_rand(s, dtype, device) for s in SHAPES],
        grads=[_rand(s, dtype, device, noncontig=(i % 2 == 1)) for i, s in enumerate(SHAPES)],
        momentum_buffers=[poison_(torch.empty(s, device=device, dtype=dtype)) if first else _rand(s, dtype, device)
                          for s in SHAPES] if momentum else [],
    )
    kw = dict(lr=gen.uniform(1e-3, 0.5), momentum=momentum, dampening=0.0 if nesterov else gen.uniform(0, 0.5),
              weight_decay=gen.choice([0.0, gen.uniform(0, 0.1)]), nesterov=nesterov,
              maximize=gen.random() < 0.5, is_first_step=first)
    if gen.random() < 0.5:
        kw["grad_scale"] = torch.tensor(gen.uniform(0.5, 1024.0), device=device)
    if gen.random() < 0.5:
        kw.update(grad_norm=torch.tensor(gen.uniform(1.0, 300.0), device=device), max_grad_norm=gen.uniform(0.5, 5.0))
    return lists, kw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first", [True, False])
def test_sgd_matches_reference(device, dtype, first, cpu_isa):
    require_kernel("fused_sgd_", device)
    for seed in range(4):
        lists, kw = _sgd_case(device, dtype, seed * 11 + first, first)
        ref_lists, ref32 = copy.deepcopy(lists), _upcast(lists)
        torch.ops.bigkernels.fused_sgd_(*lists.values(), **kw)
        ref.fused_sgd_(*ref_lists.values(), **kw)
        ref.fused_sgd_(*ref32.values(), **kw)
        names = ["params"] + (["momentum_buffers"] if kw["momentum"] else [])
        _check_against_reference(lists, ref_lists, ref32, dtype, names)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_of_squares_matches_fp64(device, dtype, cpu_isa):
    require_kernel("sum_of_squares", device)
    torch.manual_seed(0)
    xs = [_rand(s, dtype, device) for s in SHAPES] + [_rand((40, 300), dtype, device).t()]  # non-contiguous
    got = torch.ops.bigkernels.sum_of_squares(xs)
    want = sum(x.double().square().sum() for x in xs)
    assert got.dtype == torch.float32 and got.shape == () and got.device.type == device
    assert_close(got, want, rtol=1e-5, atol=0, what="sum_of_squares")


@pytest.mark.parametrize("device", devices())
def test_found_inf_changes_nothing(device):
    require_kernel("fused_adamw_", device)
    lists, kw = _adam_case(device, torch.float32, 3, amsgrad=True)
    before = copy.deepcopy(lists)
    kw.update(found_inf=torch.tensor(1.0, device=device), grad_scale=torch.tensor(65536.0, device=device))
    torch.ops.bigkernels.fused_adamw_(*lists.values(), **kw)
    for name in lists:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a, b), f"{name} changed although found_inf=1"
    sgd, skw = _sgd_case(device, torch.float32, 1, first=False)
    sgd_before = copy.deepcopy(sgd)
    skw["found_inf"] = torch.tensor(1.0, device=device)
    torch.ops.bigkernels.fused_sgd_(*sgd.values(), **skw)
    for name in sgd:
        for a, b in zip(sgd[name], sgd_before[name]):
            assert torch.equal(a, b), f"sgd {name} changed although found_inf=1"


@pytest.mark.parametrize("device", devices())
def test_nan_grad_stays_in_its_element(device):
    require_kernel("fused_adamw_", device)
    lists, kw = _adam_case(device, torch.float32, 5, amsgrad=False)
    kw.pop("grad_norm", None)
    lists["grads"][0] = lists["grads"][0].contiguous()
    lists["grads"][0].view(-1)[7] = float("nan")
    torch.ops.bigkernels.fused_adamw_(*lists.values(), **kw)
    nan = torch.isnan(lists["params"][0]).view(-1)
    assert nan[7] and int(nan.sum()) == 1


def _masks_for(params, seed):
    """About 40% of every param pruned (random, so vector lanes and tails mix kept and pruned)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) > 0.4).to(p.device) for p in params]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["fused_adam_", "fused_adamw_", "fused_sgd_"])
def test_masks_zero_pruned_params_in_the_step(device, dtype, op, cpu_isa):
    """masks: pruned params stored as exactly 0 (a NaN update too), kept ones and every state as
    without masks, all as the reference."""
    require_kernel(op, device)
    for seed in range(2):
        if op == "fused_sgd_":
            lists, kw = _sgd_case(device, dtype, seed + 40, first=False)
            names = ["params"] + (["momentum_buffers"] if kw["momentum"] else [])
            run_ref = ref.fused_sgd_
        else:
            lists, kw = _adam_case(device, dtype, seed + 40, amsgrad=bool(seed))
            names = ["params", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if seed else [])
            run_ref = functools.partial(ref.fused_adam_, decoupled_weight_decay=op == "fused_adamw_")
        kw.pop("grad_norm", None)  # a NaN gradient below would make the global norm NaN
        masks = _masks_for(lists["params"], seed)
        pruned = (~masks[0]).view(-1).nonzero()
        lists["grads"][0] = lists["grads"][0].contiguous()
        lists["grads"][0].view(-1)[pruned[0]] = float("nan")  # pruned even though its update is NaN
        unmasked = copy.deepcopy(lists)
        ref_lists, ref32 = copy.deepcopy(lists), _upcast(lists)
        getattr(torch.ops.bigkernels, op)(*lists.values(), **kw, masks=masks)
        getattr(torch.ops.bigkernels, op)(*unmasked.values(), **kw)
        run_ref(*ref_lists.values(), **kw, masks=masks)
        run_ref(*ref32.values(), **kw, masks=masks)
        _check_against_reference(lists, ref_lists, ref32, dtype, ["params"])  # states hold the NaN
        for i, (p, m, free) in enumerate(zip(lists["params"], masks, unmasked["params"])):
            assert (p[~m] == 0).all(), f"params[{i}]: a pruned element is not zero"
            assert torch.equal(p[m], free[m]), f"params[{i}]: masks changed a kept element"
        for name in names[1:]:
            for i, (a, b) in enumerate(zip(lists[name], unmasked[name])):
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"masks changed {name}[{i}]"


def _fp32_case(op, device, seed):
    """An fp32 case for ``op`` ("fused_sgd_" or an Adam op), without amsgrad."""
    if op == "fused_sgd_":
        return _sgd_case(device, torch.float32, seed, first=False)
    return _adam_case(device, torch.float32, seed, amsgrad=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", ["fused_adamw_", "fused_sgd_"])
def test_bad_masks_are_rejected_and_nothing_changes(device, op):
    require_kernel(op, device)
    lists, kw = _fp32_case(op, device, 3)
    before = copy.deepcopy(lists)
    good = _masks_for(lists["params"], 0)
    for masks, message in ((good[:-1], "masks"), ([m.float() for m in good], "bool"),
                           ([m.reshape(-1) if m.dim() > 1 else m for m in good], "shape")):
        with pytest.raises(RuntimeError, match=message):
            getattr(torch.ops.bigkernels, op)(*lists.values(), **kw, masks=masks)
    for name in lists:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name} changed by a rejected call"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", ["fused_adamw_", "fused_sgd_"])
def test_params_version_counters_are_bumped(device, op):
    """As torch's in-place ops do: autograd's checks and version-keyed caches see the step."""
    require_kernel(op, device)
    lists, kw = _fp32_case(op, device, 5)
    kw.pop("found_inf", None)
    before = [p._version for p in lists["params"]]
    getattr(torch.ops.bigkernels, op)(*lists.values(), **kw)
    assert all(p._version > v for p, v in zip(lists["params"], before))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_masks_matches_reference_bit_for_bit(device, dtype):
    """Pruned elements become +0 (NaN and -0 included); kept ones keep their exact bits."""
    require_kernel("apply_masks_", device)
    torch.manual_seed(12)
    tensors = [_rand(s, dtype, device) for s in SHAPES]
    tensors[0].view(-1)[:6] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40, -2.0, float("nan")])
    masks = _masks_for(tensors, 3)
    masks[0].view(-1)[:6] = torch.tensor([False, False, True, True, True, True])
    want = [t.clone() for t in tensors]
    ref.apply_masks_(want, masks)
    before = [t._version for t in tensors]
    torch.ops.bigkernels.apply_masks_(tensors, masks)
    for i, (t, w, m) in enumerate(zip(tensors, want, masks)):
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(t.view(bits), w.view(bits)), f"tensors[{i}] differs from the reference"
        assert (t.view(bits)[~m] == 0).all(), f"tensors[{i}]: a pruned element is not +0"
    assert all(t._version > v for t, v in zip(tensors, before))


@pytest.mark.parametrize("device", devices())
def test_apply_masks_rejects_bad_input(device):
    require_kernel("apply_masks_", device)
    tensors = [torch.randn(4, 6, device=device), torch.randn(5, device=device)]
    masks = _masks_for(tensors, 4)
    before = [t.clone() for t in tensors]
    op = torch.ops.bigkernels.apply_masks_
    for bad_t, bad_m, message in (
        (tensors, masks[:1], "masks"),
        (tensors, [m.float() for m in masks], "bool"),
        (tensors, [masks[0].t().contiguous(), masks[1]], "shape"),
        ([tensors[0].t(), tensors[1]], [masks[0].t(), masks[1]], "contiguous"),
        ([tensors[0], tensors[1].double()], masks, "dtype|Double"),
    ):
        with pytest.raises(RuntimeError, match=message):
            op(bad_t, bad_m)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    torch.library.opcheck(op.default, (tensors, masks))


def _small_adam_args(device):
    lists, kw = _adam_case(device, torch.float32, 9, amsgrad=True)
    lists = {k: v[1:4] for k, v in lists.items()}
    return tuple(lists.values()), kw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", ["fused_adam_", "fused_adamw_", "fused_sgd_", "sum_of_squares"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masks"])
def test_opcheck(device, op, masked):
    require_kernel(op, device)
    if op == "sum_of_squares":
        if masked:
            pytest.skip("sum_of_squares takes no masks")
        args, kw = ([torch.randn(5, device=device), torch.randn(3, 4, device=device)],), {}
    elif op == "fused_sgd_":
        lists, kw = _sgd_case(device, torch.float32, 2, first=False)
        args = tuple(v[1:4] for v in lists.values())
    else:
        args, kw = _small_adam_args(device)
    if masked:
        kw = dict(kw, masks=_masks_for(args[0], 1))
    torch.library.opcheck(getattr(torch.ops.bigkernels, op).default, args, kw)


@pytest.mark.parametrize("device", devices())
def test_compiles_fullgraph(device):
    require_kernel("fused_adamw_", device)
    torch._dynamo.reset()
    (args, kw) = _small_adam_args(device)
    kw = dict(kw, masks=_masks_for(args[0], 2))
    eager = copy.deepcopy(args)

    def step(*lists):
        torch.ops.bigkernels.fused_adamw_(*lists, **kw)
        return torch.ops.bigkernels.sum_of_squares(lists[0])

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    want = step(*eager)
    assert_close(got, want, rtol=1e-6, atol=0, what="compiled sum_of_squares")
    for a, b in zip(args[0], eager[0]):
        assert_close(a, b, rtol=1e-6, atol=1e-7, what="compiled params")


@pytest.mark.parametrize("device", devices())
def test_bad_input_is_rejected_and_nothing_changes(device):
    require_kernel("fused_adamw_", device)
    lists, kw = _adam_case(device, torch.float32, 4, amsgrad=False)
    before = copy.deepcopy(lists)
    op = torch.ops.bigkernels.fused_adamw_
    cases = [
        (dict(lists, grads=lists["grads"][:-1]), kw, "grads"),
        (dict(lists, grads=[g.to(torch.float16) for g in lists["grads"]]), kw, "Half"),
        (dict(lists, state_steps=[s.double() for s in lists["state_steps"]]), kw, "state_steps"),
        (dict(lists, exp_avgs=[torch.zeros(2, device=device)] * len(SHAPES)), kw, "shape"),
        (lists, dict(kw, lr=-1.0), "learning rate"),
        (lists, dict(kw, beta1=1.0), "beta"),
        (lists, dict(kw, grad_scale=torch.ones(2, device=device)), "grad_scale"),
    ]
    for bad_lists, bad_kw, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*bad_lists.values(), **bad_kw)
    for name in lists:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a, b), f"{name} changed by a rejected call"


# ----- flat state: fused_adam_flat_ / fused_adamw_flat_ ----------------------------------------------
def _tensors_of(args):
    """Every tensor of a call's positional arguments (lists flattened, None skipped)."""
    return [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if t is not None]


def _flatten_case(lists, amsgrad):
    """The flat-op arguments holding the same state as ``lists`` (padding poisoned with NaN)."""
    params = lists["params"]
    offsets = ref.flat_offsets([p.numel() for p in params], params[0].element_size())

    def flat(ts):
        buf = poison_(torch.empty(offsets[-1], device=params[0].device, dtype=params[0].dtype))
        for o, t in zip(offsets, ts):
            buf[o:o + t.numel()] = t.reshape(-1)
        return buf

    return (params, lists["grads"], flat(lists["exp_avgs"]), flat(lists["exp_avg_sqs"]),
            flat(lists["max_exp_avg_sqs"]) if amsgrad else None, torch.stack(lists["state_steps"]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["fused_adam_flat_", "fused_adamw_flat_"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_flat_equals_the_list_form(device, dtype, op, amsgrad, cpu_isa):
    """The flat op gives exactly the list op's results (same kernel), within tolerance of the
    reference, writes nothing in the padding between pieces, and takes masks."""
    require_kernel(op, device)
    list_op = op.replace("_flat", "")
    for seed in range(2):
        lists, kw = _adam_case(device, dtype, seed * 5 + amsgrad, amsgrad)
        if seed:
            kw["masks"] = _masks_for(lists["params"], seed)
        flat_args = _flatten_case(copy.deepcopy(lists), amsgrad)
        ref_args = _flatten_case(copy.deepcopy(lists), amsgrad)
        getattr(torch.ops.bigkernels, list_op)(*lists.values(), **kw)
        getattr(torch.ops.bigkernels, op)(*flat_args, **kw)
        ref.fused_adam_flat_(*ref_args, decoupled_weight_decay=op == "fused_adamw_flat_", **kw)
        for got, want in zip(flat_args[0], lists["params"]):
            assert torch.equal(got, want), "params: flat op differs from the list op"
        for k, name in ((2, "exp_avgs"), (3, "exp_avg_sqs")) + (((4, "max_exp_avg_sqs"),) if amsgrad else ()):
            for i, piece in enumerate(ref.flat_views(flat_args[k], flat_args[0])):
                assert torch.equal(piece, lists[name][i]), f"{name}[{i}]: flat op differs from the list op"
            used = torch.zeros(flat_args[k].numel(), dtype=torch.bool, device=device)
            for o, p in zip(ref.flat_offsets([p.numel() for p in flat_args[0]], flat_args[0][0].element_size()),
                            flat_args[0]):
                used[o:o + p.numel()] = True
            assert flat_args[k][~used].isnan().all(), f"{name}: the padding between pieces was written"
        assert torch.equal(flat_args[5], torch.stack(lists["state_steps"]))
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        for got, want in zip(flat_args[0], ref_args[0]):
            assert_close(got, want, what="params vs the flat reference", **tol)


@pytest.mark.parametrize("device", devices())
def test_adam_flat_rejects_bad_buffers_and_changes_nothing(device):
    op = torch.ops.bigkernels.fused_adamw_flat_
    require_kernel("fused_adamw_flat_", device)
    lists, kw = _adam_case(device, torch.float32, 6, amsgrad=False)
    args = _flatten_case(lists, amsgrad=False)
    before = copy.deepcopy(args)
    p, g, m, v, _, s = args
    cases = [((p, g, m[:-1], v, None, s), kw, "exp_avg to be a contiguous 1-D"),
             ((p, g, m, v.double(), None, s), kw, "exp_avg_sq"),
             ((p, g, m, v, None, s[:-1]), kw, "state_steps"),
             ((p, g, m, v, None, s), dict(kw, amsgrad=True), "max_exp_avg_sq"),
             ((p, g[:-1], m, v, None, s), kw, "grads"),
             ((p, g, m.view(1, -1), v, None, s), kw, "1-D")]
    for bad, bad_kw, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*bad, **bad_kw)
        with pytest.raises(ValueError, match=message):
            ref.fused_adam_flat_(*bad, decoupled_weight_decay=True, **bad_kw)
    for x, y in zip(_tensors_of(args), _tensors_of(before)):
        assert torch.equal(x.nan_to_num(), y.nan_to_num()), "a rejected call changed its input"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("masked", [False, True], ids=["", "masks"])
def test_adam_flat_opcheck_and_compile(device, masked):
    require_kernel("fused_adamw_flat_", device)
    lists, kw = _adam_case(device, torch.float32, 8, amsgrad=True)
    lists = {k: v[1:5] for k, v in lists.items()}
    if masked:
        kw = dict(kw, masks=_masks_for(lists["params"], 3))
    args = _flatten_case(lists, amsgrad=True)
    args = tuple(a.nan_to_num() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.bigkernels.fused_adamw_flat_.default, args, kw)
    torch._dynamo.reset()
    eager = copy.deepcopy(args)

    def step(*a):
        torch.ops.bigkernels.fused_adamw_flat_(*a, **kw)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*eager)
    for x, y in zip(_tensors_of(args), _tensors_of(eager)):
        assert_close(x, y, rtol=1e-6, atol=1e-7, what="compiled flat step")


# ----- position independence: shards update like the whole tensor -----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["fused_adamw_", "fused_adam_amsgrad", "fused_sgd_"])
def test_cpu_kernels_update_each_element_as_the_whole_tensor_does(dtype, op, cpu_isa):
    """Every element's update is the same whether it sits in a vector of the kernel's body or in a
    range's tail (as happens when FSDP2 / tensor parallel shard a tensor, or threads split it): one
    call on a 37-element tensor equals 37 calls on its elements, bit for bit, masks included."""
    require_kernel(op.replace("_amsgrad", "_"), "cpu")
    g = torch.Generator().manual_seed(11)
    n = 37  # a tail after 1 / 2 / 4 vectors of every lane width

    def tensors():
        return [torch.randn(n, generator=g).to(dtype) for _ in range(4)] + [
            torch.rand(n, generator=g).to(dtype), torch.rand(n, generator=g) > 0.3]

    p, gr, m, mom, v, keep = tensors()
    v = v.abs()

    def run(sl):
        args = [t[sl].clone() for t in (p, gr, m, v, v, mom)]
        masks = [keep[sl].clone()]
        if op == "fused_sgd_":
            torch.ops.bigkernels.fused_sgd_([args[0]], [args[1]], [args[5]], lr=0.1, momentum=0.9, dampening=0.0,
                                            weight_decay=0.01, nesterov=True, maximize=False, is_first_step=False,
                                            masks=masks)
            return args[0], args[5]
        amsgrad = op == "fused_adam_amsgrad"
        fn = torch.ops.bigkernels.fused_adam_ if amsgrad else torch.ops.bigkernels.fused_adamw_
        fn([args[0]], [args[1]], [args[2]], [args[3]], [args[4]] if amsgrad else [], [torch.full((), 4.0)], lr=0.1,
           beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=amsgrad, maximize=False, masks=masks)
        return args[0], args[2], args[3], args[4]

    whole = run(slice(0, n))
    pieces = [run(slice(i, i + 1)) for i in range(n)]
    for k, w in enumerate(whole):
        got = torch.cat([pc[k] for pc in pieces])
        assert torch.equal(got, w), f"output {k}: elements {(got != w).nonzero().flatten().tolist()} differ"
