"""The RMSprop / Lion / Adafactor ops (torch.ops.bigkernels.fused_rmsprop_, fused_lion_,
fused_adafactor_) against bigkernels.reference.optim on every device's compiled kernel: dtypes x odd
shapes (empty, 0-d, non-contiguous grads, > 2-D Adafactor params), every mode, GradScaler and
clipping inputs, masks, found_inf, opcheck, torch.compile(fullgraph=True), rejected input."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from bigkernels.reference import optim as ref
from conftest import assert_close, devices, require_kernel
from test_optim_ops import _check_against_reference, _upcast
from test_optim_ops import _rand as _rand_base

SHAPES = [(5, 123, 123), (1,), (3,), (0,), (4097,), (33, 65), ()]
FACTORED_SHAPES = [(5, 123, 123), (33, 65), (1, 1), (2, 3, 4, 9), (7, 300), (0, 5), (300, 7)]
VECTOR_SHAPES = [(1,), (3,), (0,), (4097,), (), (70000,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(shape, dtype, device, positive=False, noncontig=False, scale=1.0):
    t = _rand_base(shape, dtype, device, positive=positive, noncontig=noncontig)
    return t if scale == 1.0 else t * scale


def _tail(gen, device, kw):
    """GradScaler / clipping inputs, each half of the time."""
    if gen.random() < 0.5:
        kw["grad_scale"] = torch.tensor(gen.uniform(0.5, 1024.0), device=device)
    if gen.random() < 0.5:
        kw.update(grad_norm=torch.tensor(gen.uniform(1.0, 300.0), device=device), max_grad_norm=gen.uniform(0.5, 5.0))
    return kw


def rmsprop_case(device, dtype, seed, shapes=SHAPES):
    gen = random.Random(seed)
    torch.manual_seed(seed)
    centered, momentum = gen.random() < 0.5, gen.choice([0.0, gen.uniform(0.1, 0.95)])
    lists = dict(
        params=[_rand(s, dtype, device) for s in shapes],
        grads=[_rand(s, dtype, device, noncontig=(i % 2 == 0)) for i, s in enumerate(shapes)],
        square_avgs=[_rand(s, dtype, device, positive=True) + 0.5 for s in shapes],
        grad_avgs=[_rand(s, dtype, device, scale=0.1) for s in shapes] if centered else [],
        momentum_buffers=[_rand(s, dtype, device, scale=0.1) for s in shapes] if momentum else [],
        state_steps=[torch.tensor(float(gen.randint(0, 50)), device=device) for _ in shapes],
    )
    kw = dict(lr=gen.uniform(1e-4, 1e-1), alpha=gen.choice([0.99, gen.uniform(0.3, 0.999)]), eps=gen.choice([1e-8, 1e-6]),
              weight_decay=gen.choice([0.0, gen.uniform(0, 0.2)]), momentum=momentum, centered=centered,
              maximize=gen.random() < 0.5)
    return lists, _tail(gen, device, kw)


def lion_case(device, dtype, seed, shapes=SHAPES):
    gen = random.Random(seed)
    torch.manual_seed(seed)
    lists = dict(params=[_rand(s, dtype, device) for s in shapes],
                 grads=[_rand(s, dtype, device, noncontig=(i % 2 == 1)) for i, s in enumerate(shapes)],
                 exp_avgs=[_rand(s, dtype, device, scale=0.1) for s in shapes])
    lists["exp_avgs"][-2].view(-1)[:5] = 0.0  # c = 0 where the gradient is 0 too: sign(0) = 0
    lists["grads"][-2] = lists["grads"][-2].contiguous()
    lists["grads"][-2].view(-1)[:3] = 0.0
    kw = dict(lr=gen.uniform(1e-4, 1e-2), beta1=gen.uniform(0.8, 0.95), beta2=gen.uniform(0.95, 0.999),
              weight_decay=gen.choice([0.0, gen.uniform(0, 1.0)]), maximize=gen.random() < 0.5)
    return lists, _tail(gen, device, kw)


def adafactor_case(device, dtype, seed, factored=True, shapes=None):
    gen = random.Random(seed)
    torch.manual_seed(seed)
    shapes = shapes or (FACTORED_SHAPES if factored else VECTOR_SHAPES)
    lists = dict(
        params=[_rand(s, dtype, device) for s in shapes],
        grads=[_rand(s, dtype, device, noncontig=(i % 2 == 0)) for i, s in enumerate(shapes)],
        row_vars=[_rand(s[:-1] + (1,), dtype, device, positive=True, scale=0.1) for s in shapes] if factored else [],
        col_vars=[_rand(s[:-2] + (1, s[-1]), dtype, device, positive=True, scale=0.1) for s in shapes]
        if factored else [],
        variances=[] if factored else [_rand(s, dtype, device, positive=True, scale=0.1) for s in shapes],
        state_steps=[torch.tensor(float(gen.choice([0, 1, gen.randint(2, 500)])), device=device) for _ in shapes],
    )
    kw = dict(lr=gen.uniform(1e-3, 1e-1), beta2_decay=gen.choice([-0.8, -1.0, gen.uniform(-1.0, -0.3)]),
              eps1=gen.choice([1e-30, 1e-3, torch.finfo(dtype).eps]), eps2=gen.choice([1e-3, 1e-2]),
              d=gen.choice([1.0, 1.5]), weight_decay=gen.choice([0.0, gen.uniform(0, 0.2)]),
              maximize=gen.random() < 0.5)
    return lists, _tail(gen, device, kw)


CASES = {"fused_rmsprop_": (rmsprop_case, ref.fused_rmsprop_, ["params", "square_avgs", "grad_avgs",
                                                                "momentum_buffers"]),
         "fused_lion_": (lion_case, ref.fused_lion_, ["params", "exp_avgs"]),
         "fused_adafactor_": (adafactor_case, ref.fused_adafactor_, ["params", "row_vars", "col_vars", "variances"])}


def _run_and_compare(op, device, dtype, seed, **case_kw):
    make, reference, names = CASES[op]
    lists, kw = make(device, dtype, seed, **case_kw)
    ref_lists, ref32 = copy.deepcopy(lists), _upcast(lists)
    getattr(torch.ops.bigkernels, op)(*lists.values(), **kw)
    reference(*ref_lists.values(), **kw)
    reference(*ref32.values(), **kw)
    _check_against_reference(lists, ref_lists, ref32, dtype, names)
    for s, r in zip(lists.get("state_steps", []), ref_lists.get("state_steps", [])):
        assert s.item() == r.item()
    return lists, kw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["fused_rmsprop_", "fused_lion_"])
def test_elementwise_ops_match_reference(device, dtype, op, cpu_isa):
    require_kernel(op, device)
    for seed in range(4):
        _run_and_compare(op, device, dtype, seed * 13 + len(op))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factored", [True, False], ids=["factored", "vector"])
def test_adafactor_matches_reference(device, dtype, factored, cpu_isa):
    require_kernel("fused_adafactor_", device)
    for seed in range(3):
        _run_and_compare("fused_adafactor_", device, dtype, seed * 7 + factored, factored=factored)


@pytest.mark.parametrize("device", devices())
def test_adafactor_many_small_and_one_large_param(device):
    """Small params stepped whole by one thread each, large ones by parallel passes, in one call;
    a tall, a wide and a batched (> 2-D) param across the parallel split."""
    require_kernel("fused_adafactor_", device)
    shapes = [(3, 4)] * 40 + [(700, 300), (130, 1200), (6, 90, 300)]
    _run_and_compare("fused_adafactor_", device, torch.float32, 5, factored=True, shapes=shapes)


@pytest.mark.parametrize("device", devices())
def test_rmsprop_momentum_centered_all_modes(device):
    require_kernel("fused_rmsprop_", device)
    for centered in (False, True):
        for momentum in (0.0, 0.9):
            lists, kw = rmsprop_case(device, torch.float32, 3)
            if not centered:
                lists["grad_avgs"] = []
            elif not lists["grad_avgs"]:
                lists["grad_avgs"] = [_rand(p.shape, torch.float32, device, scale=0.1) for p in lists["params"]]
            if momentum == 0:
                lists["momentum_buffers"] = []
            elif not lists["momentum_buffers"]:
                lists["momentum_buffers"] = [_rand(p.shape, torch.float32, device) for p in lists["params"]]
            kw.update(centered=centered, momentum=momentum)
            expected = copy.deepcopy(lists)
            torch.ops.bigkernels.fused_rmsprop_(*lists.values(), **kw)
            ref.fused_rmsprop_(*expected.values(), **kw)
            _check_against_reference(lists, expected, expected, torch.float32, ["params", "square_avgs", "grad_avgs", "momentum_buffers"])


def test_lion_sign_of_zero_and_nan():
    """sign(0) = 0: an element with c = 0 only decays; a NaN in c makes the param NaN."""
    require_kernel("fused_lion_", "cpu")
    p = torch.tensor([1.0, 2.0, 3.0, -4.0])
    g = torch.tensor([0.0, float("nan"), 1.0, -1.0])
    m = torch.tensor([0.0, 0.0, 0.0, 0.0])
    torch.ops.bigkernels.fused_lion_([p], [g], [m], lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
    assert p[0] == 1.0 and torch.isnan(p[1]) and p[2] == 2.5 and p[3] == -3.5
    assert torch.isnan(m[1]) and m[0] == 0.0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", list(CASES))
def test_found_inf_changes_nothing(device, op):
    require_kernel(op, device)
    make, _, _ = CASES[op]
    lists, kw = make(device, torch.float32, 3)
    before = copy.deepcopy(lists)
    kw.update(found_inf=torch.tensor(1.0, device=device), grad_scale=torch.tensor(65536.0, device=device))
    getattr(torch.ops.bigkernels, op)(*lists.values(), **kw)
    for name in lists:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a, b), f"{name} changed although found_inf=1"


def _masks_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) > 0.4).to(p.device) for p in params]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(CASES))
def test_masks_zero_pruned_params_in_the_step(device, dtype, op, cpu_isa):
    """Pruned params stored as exactly 0, kept ones and every state as without masks."""
    require_kernel(op, device)
    make, reference, names = CASES[op]
    lists, kw = make(device, dtype, 40)
    masks = _masks_for(lists["params"], 1)
    unmasked, ref_lists, ref32 = copy.deepcopy(lists), copy.deepcopy(lists), _upcast(lists)
    getattr(torch.ops.bigkernels, op)(*lists.values(), **kw, masks=masks)
    getattr(torch.ops.bigkernels, op)(*unmasked.values(), **kw)
    reference(*ref_lists.values(), **kw, masks=masks)
    reference(*ref32.values(), **kw, masks=masks)
    _check_against_reference(lists, ref_lists, ref32, dtype, ["params"])
    for i, (p, m, free) in enumerate(zip(lists["params"], masks, unmasked["params"])):
        assert (p[~m] == 0).all(), f"params[{i}]: a pruned element is not zero"
        assert torch.equal(p[m], free[m]), f"params[{i}]: masks changed a kept element"
    for name in names[1:]:
        for i, (a, b) in enumerate(zip(lists[name], unmasked[name])):
            assert torch.equal(a, b), f"masks changed {name}[{i}]"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", list(CASES))
def test_params_version_counters_are_bumped(device, op):
    require_kernel(op, device)
    lists, kw = CASES[op][0](device, torch.float32, 5)
    before = [p._version for p in lists["params"]]
    getattr(torch.ops.bigkernels, op)(*lists.values(), **kw)
    assert all(p._version > v for p, v in zip(lists["params"], before))


def _small(op, device, masked):
    make = CASES[op][0]
    shapes = {"fused_adafactor_": [(3, 5), (2, 2, 3)]}.get(op, [(3,), (2, 5)])
    lists, kw = make(device, torch.float32, 9, shapes=shapes)
    if masked:
        kw = dict(kw, masks=_masks_for(lists["params"], 2))
    return tuple(lists.values()), kw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("masked", [False, True], ids=["", "masks"])
def test_opcheck(device, op, masked):
    require_kernel(op, device)
    args, kw = _small(op, device, masked)
    torch.library.opcheck(getattr(torch.ops.bigkernels, op).default, args, kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", list(CASES))
def test_compiles_fullgraph(device, op):
    require_kernel(op, device)
    torch._dynamo.reset()
    args, kw = _small(op, device, True)
    eager = copy.deepcopy(args)

    def step(*lists):
        getattr(torch.ops.bigkernels, op)(*lists, **kw)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*eager)
    for got, want in zip(args, eager):
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-6, atol=1e-7, what=f"compiled {op}")


@pytest.mark.parametrize("device", devices())
def test_bad_input_is_rejected_and_nothing_changes(device):
    for op in CASES:
        require_kernel(op, device)
    rms, rkw = rmsprop_case(device, torch.float32, 4)
    ada, akw = adafactor_case(device, torch.float32, 4)
    lion, lkw = lion_case(device, torch.float32, 4)
    before = copy.deepcopy((rms, ada, lion))
    ops = torch.ops.bigkernels
    cases = [
        (ops.fused_rmsprop_, dict(rms, grads=rms["grads"][:-1]), rkw, "grads"),
        (ops.fused_rmsprop_, dict(rms, square_avgs=[s.half() for s in rms["square_avgs"]]), rkw, "square_avgs"),
        (ops.fused_rmsprop_, rms, dict(rkw, alpha=-0.5), "alpha"),
        (ops.fused_rmsprop_, dict(rms, grad_avgs=[]), dict(rkw, centered=True), "grad_avgs"),
        (ops.fused_rmsprop_, rms, dict(rkw, grad_scale=torch.ones(2, device=device)), "grad_scale"),
        (ops.fused_lion_, dict(lion, exp_avgs=lion["exp_avgs"][1:]), lkw, "exp_avgs"),
        (ops.fused_lion_, lion, dict(lkw, beta1=1.5), "beta"),
        (ops.fused_adafactor_, dict(ada, row_vars=ada["col_vars"]), akw, "row_vars"),
        (ops.fused_adafactor_, dict(ada, variances=ada["row_vars"]), akw, "variances"),
        (ops.fused_adafactor_, dict(ada, params=ada["params"][:1] + [torch.randn(4, device=device)],
                                    grads=ada["grads"][:1] + [torch.randn(4, device=device)],
                                    state_steps=ada["state_steps"][:2]), akw, "mixes"),
        (ops.fused_adafactor_, ada, dict(akw, d=0.5), "clipping threshold d"),
        (ops.fused_adafactor_, ada, dict(akw, beta2_decay=0.5), "beta2_decay"),
    ]
    for op, bad_lists, bad_kw, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*bad_lists.values(), **bad_kw)
    for lists, old in zip((rms, ada, lion), before):
        for name in lists:
            for a, b in zip(lists[name], old[name]):
                assert torch.equal(a, b), f"{name} changed by a rejected call"


def test_reference_rejects_mixed_adafactor_lists():
    p = [torch.randn(3, 4), torch.randn(5)]
    with pytest.raises(ValueError, match="mixes"):
        ref.fused_adafactor_(p, p, [], [], [], [torch.zeros(())] * 2, lr=0.1, beta2_decay=-0.8, eps1=1e-3, eps2=1e-3,
                             d=1.0, weight_decay=0.0, maximize=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,seed", [("fused_rmsprop_", s) for s in range(4)] + [("fused_lion_", s) for s in range(2)])
def test_cpu_kernels_update_each_element_as_the_whole_tensor_does(dtype, op, seed, cpu_isa):
    """As Adam's (tests/test_optim_ops.py): an element's update does not depend on whether it sits in a
    vector of the kernel's body or in a range's tail (FSDP2 / tensor-parallel shards, thread ranges):
    one call on a 37-element tensor equals 37 one-element calls, bit for bit, masks included."""
    require_kernel(op, "cpu")
    make, _, names = CASES[op]
    n = 37
    lists, kw = make("cpu", dtype, 100 + seed, shapes=[(n,), (n,)])
    lists["grads"] = [g.contiguous() for g in lists["grads"]]
    keep = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.3

    def run(sl):
        args = {k: [t[sl].clone() if t.dim() else t.clone() for t in v] for k, v in lists.items()}
        getattr(torch.ops.bigkernels, op)(*args.values(), **kw, masks=[keep[sl].clone()] * 2)
        return [args[k][0] for k in names if args[k]]

    whole = run(slice(0, n))
    pieces = [run(slice(i, i + 1)) for i in range(n)]
    for k, w in enumerate(whole):
        got = torch.cat([pc[k] for pc in pieces])
        assert torch.equal(got, w), f"{op} output {k} ({kw}): elements {(got != w).nonzero().flatten().tolist()} differ"
