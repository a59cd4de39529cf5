"""bigkernels::adamw8bit_ (the 8-bit AdamW step) against bigkernels.reference.optim: the quantised
state (codes and scales) bit for bit on every CPU instruction set, params within the fp32 / 16-bit
tolerances; the codec's rounding; GradScaler, clipping, masks, NaN, rejected input, opcheck and
torch.compile(fullgraph=True). ``make_case`` is shared with tests/test_optim_8bit_triton.py."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from bigkernels.reference import optim as ref
from conftest import assert_close, devices, require_kernel

OP = "adamw8bit_"
# partial last blocks, tensors smaller than a block, empty, 0-d, a block exactly, several blocks
SHAPES = [(5, 123, 123), (1,), (3,), (0,), (4097,), (33, 65), (), (256,), (529,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ["params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales", "state_steps"]


def make_case(device, dtype, seed, block_size=256, shapes=SHAPES, noncontig_grads=True):
    """(lists by NAMES, keyword arguments): random params and grads, moments quantised from random
    fp32 moments of varied magnitudes (so every code range occurs), random steps and hyperparameters,
    sometimes GradScaler / clipping inputs."""
    gen = random.Random(seed)
    torch.manual_seed(seed)
    lists = {n: [] for n in NAMES}
    for i, s in enumerate(shapes):
        lists["params"].append(torch.randn(s, device=device).to(dtype))
        g = torch.randn(s, device=device) * gen.choice([1e-3, 1.0, 30.0])
        if noncontig_grads and i % 2 == 0 and len(s) >= 1 and g.numel() > 1:
            wide = torch.empty(s[:-1] + (2 * s[-1],), device=device, dtype=dtype)
            wide[..., ::2] = g
            g = wide[..., ::2]
        lists["grads"].append(g.to(dtype))
        spread = torch.exp(torch.randn(s, device=device) * 3)  # magnitudes over many binades
        m = torch.randn(s, device=device) * spread * 0.1
        v = (torch.randn(s, device=device) * spread * 0.01) ** 2
        mc, rc, ms, rs = ref.quantize_adamw8bit_state(m, v, block_size)
        for name, t in zip(NAMES[2:6], (mc, rc, ms, rs)):
            lists[name].append(t)
        lists["state_steps"].append(torch.tensor(float(gen.randint(0, 50)), device=device))
    kw = dict(lr=gen.uniform(1e-4, 1e-1), beta1=gen.uniform(0.5, 0.99), beta2=gen.uniform(0.9, 0.9999),
              weight_decay=gen.choice([0.0, gen.uniform(0, 0.2)]), eps=gen.choice([1e-8, 1e-6]),
              maximize=gen.random() < 0.5, block_size=block_size)
    if gen.random() < 0.5:
        kw["grad_scale"] = torch.tensor(gen.uniform(0.5, 1024.0), device=device)
    if gen.random() < 0.5:
        kw.update(grad_norm=torch.tensor(gen.uniform(1.0, 300.0), device=device), max_grad_norm=gen.uniform(0.5, 5.0))
    return lists, kw


def masks_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) > 0.4).to(p.device) for p in params]


def run_reference(lists, kw):
    ref.adamw8bit_(*lists.values(), **kw)


def upcast(lists):
    """The same case with fp32 params and grads (the reference's own error for 16-bit params)."""
    out = copy.deepcopy(lists)
    for k in ("params", "grads"):
        out[k] = [t.float().contiguous() for t in out[k]]
    return out


def assert_state_equal(got, want, what="", block_size=None):
    """Codes and scales bit for bit; codes compared only in blocks whose scale is finite (a non-finite
    block decodes to non-finite values whatever its codes). ``block_size``: the step's (default:
    the smallest power of two >= 64 giving each tensor its number of scales)."""
    for name in ("exp_avg_scales", "exp_avg_sq_scales"):
        for i, (a, b) in enumerate(zip(got[name], want[name])):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)) or (
                torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())), \
                f"{what}{name}[{i}] differs: {a} vs {b}"
    for codes, scales in (("exp_avgs", "exp_avg_scales"), ("exp_avg_sqs", "exp_avg_sq_scales")):
        for i, (a, b) in enumerate(zip(got[codes], want[codes])):
            if a.numel() == 0:
                continue
            block = block_size
            if block is None:
                block = 64
                while ref.num_blocks(a.numel(), block) > want[scales][i].numel():
                    block *= 2
            finite = want[scales][i].isfinite().repeat_interleave(block)[:a.numel()]
            diff = (a.reshape(-1) != b.reshape(-1)) & finite
            assert not diff.any(), (f"{what}{codes}[{i}]: {int(diff.sum())}/{a.numel()} codes differ, first at "
                                    f"{int(diff.nonzero()[0])}: {int(a.reshape(-1)[diff][0])} vs "
                                    f"{int(b.reshape(-1)[diff][0])}")


def assert_params_close(got, want, want32, dtype, what=""):
    """fp32: rtol 1e-5 / atol 1e-6; 16-bit: error vs the fp32 reference within 2x the reference's own."""
    for i, (k, r, r32) in enumerate(zip(got, want, want32)):
        if dtype == torch.float32:
            assert_close(k, r, rtol=1e-5, atol=1e-6, what=f"{what}params[{i}]")
        elif k.numel():
            own = (r.double() - r32.double()).abs().max().item()
            err = (k.double() - r32.double()).abs().max().item()
            assert err <= 2 * own + 1e-6, f"{what}params[{i}] ({dtype}): error {err:.3g} > 2x reference's {own:.3g}"


# ----- the codec (the reference's definition) -----------------------------------------------------


@pytest.mark.parametrize("which", ["exp_avg", "root"])
def test_codes_round_to_nearest_ties_away_from_zero(which):
    """Every encoded value is the nearest code value (brute force over all codes); exact midpoints go
    to the larger magnitude; decode(encode(code value)) is the identity; out-of-range saturates."""
    if which == "exp_avg":
        enc, dec = ref.encode_exp_avg, ref.decode_exp_avg
        mags = ref.decode_exp_avg(torch.arange(122, dtype=torch.uint8))
        values = torch.cat([mags, -mags[1:]])
        x = torch.cat([torch.randn(20000), torch.randn(20000) * 1e-4, torch.rand(2000) * 2 - 1])
    else:
        enc, dec = ref.encode_exp_avg_sq_root, ref.decode_exp_avg_sq_root
        values = ref.decode_exp_avg_sq_root(torch.arange(242, dtype=torch.uint8))
        x = torch.cat([torch.rand(20000), torch.rand(20000) * 1e-4, torch.exp(-torch.rand(2000) * 20)])
    x = x.clamp(-1, 1)
    got = dec(enc(x))
    assert torch.isin(got, values).all()
    best = (x[:, None] - values[None, :]).abs().min(dim=1).values
    nearest = (x - got).abs() <= best
    if which == "root":  # below half the smallest non-zero root: that smallest root, never 0
        nearest |= (x > 0) & (x < 2.0 ** -(ref.SQRT_BINADES + 1)) & (got == 2.0 ** -ref.SQRT_BINADES)
    assert torch.all(nearest), "a value did not go to its nearest code"
    assert torch.equal(dec(enc(values)), values)  # code values encode to themselves
    ordered = values.sort().values
    mids = (ordered[1:] + ordered[:-1]) / 2  # exact in fp32 (few mantissa bits)
    assert torch.all(dec(enc(mids)).abs() > mids.abs()), "a midpoint did not round away from zero"
    assert dec(enc(torch.tensor([2.0, 1.5]))).tolist() == [1.0, 1.0]  # saturates


def test_root_never_rounds_a_nonzero_to_zero_and_exp_avg_flushes_tiny():
    tiny = torch.tensor([1e-30, 2.0 ** -40, 2.0 ** -17])
    assert (ref.decode_exp_avg_sq_root(ref.encode_exp_avg_sq_root(tiny)) == 2.0 ** -ref.SQRT_BINADES).all()
    assert ref.decode_exp_avg(ref.encode_exp_avg(tiny)).tolist() == [0.0, 0.0, 0.0]
    assert ref.decode_exp_avg(ref.encode_exp_avg(-tiny * 0)).tolist() == [0.0, 0.0, 0.0]
    assert ref.encode_exp_avg(torch.tensor([-0.0])).item() == 0  # no negative-zero code


def test_quantise_dequantise_relative_error():
    """The state conversion (torch.optim.AdamW -> AdamW8bit): exp_avg within half a step (1/16
    relative) down to 2**-15 of its block maximum, exp_avg_sq within (1 +- 1/32)^2 relative down to
    2**-30 of its block maximum."""
    torch.manual_seed(0)
    m = torch.randn(5000) * torch.exp(torch.randn(5000))
    v = (torch.randn(5000) * torch.exp(torch.randn(5000))) ** 2
    mc, rc, ms, rs = ref.quantize_adamw8bit_state(m, v, 256)
    assert mc.dtype == rc.dtype == torch.uint8 and ms.shape == rs.shape == (20,)
    m2, v2 = ref.dequantize_adamw8bit_state(mc, rc, ms, rs, 256)
    big = m.abs() >= ms.repeat_interleave(256)[:5000] * 2.0 ** -ref.EXP_AVG_BINADES
    assert ((m2 - m).abs()[big] <= m.abs()[big] / 16 + 1e-12).all()
    in_range = v >= rs.repeat_interleave(256)[:5000] ** 2 * 2.0 ** (-2 * ref.SQRT_BINADES)
    ratio = v2[in_range] / v[in_range]
    assert ratio.max() <= (1 + 1 / 32) ** 2 * 1.000001 and ratio.min() >= (1 - 1 / 32) ** 2 / 1.000001


# ----- the op against the reference ------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_adamw8bit_matches_reference(device, dtype, block_size, cpu_isa):
    """Three steps on fresh random cases: codes and scales equal the reference's bit for bit."""
    require_kernel(OP, device)
    for seed in range(2):
        lists, kw = make_case(device, dtype, seed * 13 + block_size, block_size)
        if seed == 1:
            kw["masks"] = masks_for(lists["params"], seed)
        want, want32 = copy.deepcopy(lists), upcast(lists)
        for step in range(3):
            getattr(torch.ops.bigkernels, OP)(*lists.values(), **kw)
            run_reference(want, kw)
            run_reference(want32, kw)
            assert_state_equal(lists, want, f"seed {seed} step {step}: ", kw["block_size"])
            assert_params_close(lists["params"], want["params"], want32["params"], dtype, f"seed {seed} step {step}: ")
        assert [s.item() for s in lists["state_steps"]] == [s.item() for s in want["state_steps"]]


@pytest.mark.parametrize("device", devices())
def test_found_inf_changes_nothing_and_versions_bump(device):
    require_kernel(OP, device)
    lists, kw = make_case(device, torch.float32, 3)
    before = copy.deepcopy(lists)
    getattr(torch.ops.bigkernels, OP)(*lists.values(), **dict(kw, found_inf=torch.tensor(1.0, device=device),
                                                                grad_scale=torch.tensor(65536.0, device=device)))
    for name in NAMES:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a, b), f"{name} changed although found_inf=1"
    versions = [p._version for p in lists["params"]]
    getattr(torch.ops.bigkernels, OP)(*lists.values(), **kw)
    assert all(p._version > v for p, v in zip(lists["params"], versions))


@pytest.mark.parametrize("device", devices())
def test_masks_zero_pruned_params_and_leave_states(device, cpu_isa):
    require_kernel(OP, device)
    lists, kw = make_case(device, torch.float32, 8)
    masks = masks_for(lists["params"], 2)
    unmasked = copy.deepcopy(lists)
    getattr(torch.ops.bigkernels, OP)(*lists.values(), **kw, masks=masks)
    getattr(torch.ops.bigkernels, OP)(*unmasked.values(), **kw)
    for i, (p, m, free) in enumerate(zip(lists["params"], masks, unmasked["params"])):
        assert (p[~m] == 0).all(), f"params[{i}]: a pruned element is not zero"
        assert torch.equal(p[m], free[m]), f"params[{i}]: masks changed a kept element"
    assert_state_equal(lists, unmasked, "masked vs unmasked: ")


@pytest.mark.parametrize("device", devices())
def test_nan_gradient_poisons_only_its_block(device, cpu_isa):
    require_kernel(OP, device)
    lists, kw = make_case(device, torch.float32, 5, shapes=[(3000,)])
    kw.pop("grad_norm", None)
    lists["grads"][0] = lists["grads"][0].contiguous()
    lists["grads"][0][700] = float("nan")  # block 2 of 256
    want = copy.deepcopy(lists)
    getattr(torch.ops.bigkernels, OP)(*lists.values(), **kw)
    run_reference(want, kw)
    assert_state_equal(lists, want)
    for name in ("exp_avg_scales", "exp_avg_sq_scales"):
        nan = lists[name][0].isnan()
        assert nan[2] and int(nan.sum()) == 1, f"{name}: NaN blocks {nan.nonzero().flatten().tolist()}"
    p = lists["params"][0]
    assert p[700].isnan() and int(p.isnan().sum()) == 1


@pytest.mark.parametrize("device", devices())
def test_bad_input_is_rejected_and_nothing_changes(device):
    require_kernel(OP, device)
    lists, kw = make_case(device, torch.float32, 4)
    before = copy.deepcopy(lists)
    op = getattr(torch.ops.bigkernels, OP)
    bad = [
        (dict(lists, exp_avgs=[c.float() for c in lists["exp_avgs"]]), kw, "exp_avgs"),
        (dict(lists, exp_avg_scales=[s[:-1] if s.numel() else s for s in lists["exp_avg_scales"]]), kw,
         "exp_avg_scales"),
        (dict(lists, exp_avg_sqs=lists["exp_avg_sqs"][:-1]), kw, "exp_avg_sqs"),
        (dict(lists, exp_avg_sqs=[c.reshape(-1) if c.dim() > 1 else c for c in lists["exp_avg_sqs"]]), kw, "shape"),
        (lists, dict(kw, block_size=100), "block_size"),
        (lists, dict(kw, block_size=32), "block_size"),
        (lists, dict(kw, lr=-1.0), "learning rate"),
        (lists, dict(kw, beta2=1.0), "beta"),
        (dict(lists, grads=[g.double() for g in lists["grads"]]), kw, "Double|dtype"),
        (dict(lists, state_steps=[s.double() for s in lists["state_steps"]]), kw, "state_steps"),
    ]
    for bad_lists, bad_kw, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(*bad_lists.values(), **bad_kw)
    for name in NAMES:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a, b), f"{name} changed by a rejected call"


def test_reference_rejects_bad_state_naming_the_argument():
    lists, kw = make_case("cpu", torch.float32, 4, shapes=[(300,)])
    with pytest.raises(ValueError, match=r"exp_avg_sq_scales\[0\]"):
        ref.adamw8bit_(*dict(lists, exp_avg_sq_scales=[torch.zeros(1)]).values(), **kw)
    with pytest.raises(ValueError, match="block_size"):
        ref.adamw8bit_(*lists.values(), **dict(kw, block_size=3))


def _small_args(device):
    lists, kw = make_case(device, torch.float32, 9, shapes=[(300,), (5, 7), (64,)])
    return tuple(lists.values()), kw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("masked", [False, True], ids=["", "masks"])
def test_opcheck(device, masked):
    require_kernel(OP, device)
    args, kw = _small_args(device)
    if masked:
        kw = dict(kw, masks=masks_for(args[0], 1))
    torch.library.opcheck(getattr(torch.ops.bigkernels, OP).default, args, kw)


@pytest.mark.parametrize("device", devices())
def test_compiles_fullgraph(device):
    require_kernel(OP, device)
    torch._dynamo.reset()
    args, kw = _small_args(device)
    eager = copy.deepcopy(args)

    def step(*lists):
        torch.ops.bigkernels.adamw8bit_(*lists, **kw)
        return lists[4][0].sum()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    want = step(*eager)
    assert torch.equal(got, want)
    for a, b in zip(args[2] + args[3], eager[2] + eager[3]):
        assert torch.equal(a, b), "compiled step wrote other codes"
