"""bigkernels.optim.AdamW8bit: training quality against fp32 torch.optim.AdamW (the demo's GPT and a
small classifier), state memory, state_dict round trips (weights_only, exactly continuing, from and
to torch.optim.AdamW), GradScaler, max_grad_norm, prune_ masks, LR schedulers, torch.compile,
16-bit and fp64 params, errors."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import bigkernels as bk
from bigkernels.optim import AdamW8bit
from bigkernels.reference import optim as ref
from conftest import assert_close, devices

BIG = (80, 64)  # 5,120 elements: 8-bit state (20 blocks of 256)


def _params(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(BIG, device=device).to(dtype).requires_grad_(),
            torch.randn(7, 700, device=device).to(dtype).requires_grad_(),  # 4,900: 8-bit, partial last block
            torch.randn(64, device=device).to(dtype).requires_grad_()]  # small: fp32 state


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]


def _train(opt, params, steps, seed=0, closure_grads=None):
    for s in range(steps):
        for p, g in zip(params, _grads(params, seed * 1000 + s)):
            p.grad = g
        opt.step()


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


# ----- state layout, memory --------------------------------------------------------------------


def test_state_layout_small_params_keep_fp32():
    params = _params()
    opt = AdamW8bit(params, lr=1e-2)
    _train(opt, params, 2)
    big, odd, small = (opt.state[p] for p in params)
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg"].shape == BIG
    assert big["exp_avg_scale"].dtype == torch.float32 and big["exp_avg_scale"].shape == (20,)
    assert odd["exp_avg_sq_scale"].shape == (ref.num_blocks(4900, 256),)
    assert set(small) == {"step", "exp_avg", "exp_avg_sq"} and small["exp_avg"].dtype == torch.float32
    assert all(float(st["step"]) == 2 for st in (big, odd, small))
    assert "adamw8bit_" in bk.info()["ops"]  # listed by `bigkernels info`


def test_state_memory_at_most_027_of_fp32_adamw_on_the_demo_gpt():
    from bigkernels.demo.model import TinyGPT

    model = TinyGPT(d=128, layers=2, heads=4, seq=64)
    ours, theirs = AdamW8bit(model.parameters()), torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ours.step()
    theirs.step()
    ratio = _state_bytes(ours) / _state_bytes(theirs)
    assert ratio <= 0.27, f"state memory {ratio:.3f}x of fp32 AdamW's"


# ----- training quality ------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models train ~20x faster on one intra-op thread than on two on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_loss(make_opt, model_fn, batches, loss_fn, steps, seed, clip=1.0):
    torch.manual_seed(seed)
    model = model_fn()
    opt = make_opt(model.parameters())
    losses = []
    for _, (x, y) in zip(range(steps), batches()):
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not isinstance(opt, AdamW8bit):
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def _compare(model_fn, batches, loss_fn, steps, lr, first_loss_bound):
    fp32 = _final_loss(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01), model_fn, batches, loss_fn,
                       steps, seed=0)
    q8 = _final_loss(lambda ps: AdamW8bit(ps, lr=lr, weight_decay=0.01, max_grad_norm=1.0), model_fn, batches,
                     loss_fn, steps, seed=0)
    assert abs(q8 / fp32 - 1) <= 0.02, f"AdamW8bit final loss {q8:.4f} vs fp32 AdamW {fp32:.4f} ({100 * (q8 / fp32 - 1):+.2f}%)"
    assert fp32 < first_loss_bound, f"fp32 AdamW did not train (final loss {fp32:.4f})"
    return fp32, q8


@pytest.mark.slow
def test_demo_gpt_final_loss_within_2_percent_of_fp32_adamw(one_thread):
    from bigkernels.demo.data import batches, load_corpus
    from bigkernels.demo.model import TinyGPT

    train, _ = load_corpus(200_000)

    def data():
        return batches(train, 16, 32, torch.Generator().manual_seed(1))

    # byte-level: a uniform guess is ln 256 = 5.55; 150 steps get to ~2.5
    _compare(lambda: TinyGPT(d=64, layers=2, heads=4, seq=32), data,
             lambda m, x, y: F.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1)), steps=150, lr=3e-3,
             first_loss_bound=3.5)


def test_classifier_final_loss_within_2_percent_of_fp32_adamw(one_thread):
    torch.manual_seed(123)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))

    def data():
        gen = torch.Generator().manual_seed(2)
        while True:
            x = torch.randn(128, 64, generator=gen)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            yield x, y  # outside no_grad: the consumer trains between yields

    def model():
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 10))

    _compare(model, data, lambda m, x, y: F.cross_entropy(m(x), y), steps=300, lr=1e-3,
             first_loss_bound=0.5 * 2.303)  # ln 10: chance


# ----- state_dict --------------------------------------------------------------------------------


def test_state_dict_weights_only_round_trip_continues_exactly():
    params = _params()
    opt = AdamW8bit(params, lr=1e-2, betas=(0.8, 0.99), block_size=128)
    _train(opt, params, 4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only=True by default: tensors and numbers only
    resumed = [p.detach().clone().requires_grad_() for p in ckpt["params"]]
    opt2 = AdamW8bit(resumed, lr=1.0, block_size=256)  # the checkpoint's groups (lr, block_size) win
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["block_size"] == 128 and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.uint8
    _train(opt, params, 3, seed=5)
    _train(opt2, resumed, 3, seed=5)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for p, q in zip(params, resumed):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


def test_loading_a_torch_adamw_state_dict_quantises_it():
    params = _params(seed=1)
    twin = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)
    _train(torch_opt, params, 5)
    with torch.no_grad():
        for a, b in zip(twin, params):
            a.copy_(b)
    # a copy, as a checkpoint is (torch's load_state_dict keeps the step tensors it is given)
    ours = AdamW8bit.from_fp32_state(twin, copy.deepcopy(torch_opt.state_dict()))
    assert ours.param_groups[0]["lr"] == 3e-3 and ours.param_groups[0]["weight_decay"] == 0.05
    st = ours.state[twin[0]]
    assert st["exp_avg"].dtype == torch.uint8 and float(st["step"]) == 5
    m, v = ref.dequantize_adamw8bit_state(st["exp_avg"], st["exp_avg_sq"], st["exp_avg_scale"],
                                          st["exp_avg_sq_scale"], 256)
    want_m, want_v = torch_opt.state[params[0]]["exp_avg"], torch_opt.state[params[0]]["exp_avg_sq"]
    assert (m - want_m).abs().max() <= want_m.abs().max() / 16
    assert ours.state[twin[2]]["exp_avg"].dtype == torch.float32  # small param: fp32 moments kept
    assert torch.equal(ours.state[twin[2]]["exp_avg"], torch_opt.state[params[2]]["exp_avg"])
    _train(torch_opt, params, 5, seed=9)
    _train(ours, twin, 5, seed=9)
    for a, b in zip(twin, params):
        assert_close(a, b, rtol=0, atol=3e-3 * 5 * 0.1 + 1e-3, what="continued from torch's state")


def test_fp32_state_dict_loads_into_torch_adamw():
    params = _params(seed=2)
    ours = AdamW8bit(params, lr=1e-2)
    _train(ours, params, 3)
    sd = ours.fp32_state_dict()
    assert all(v.dtype == torch.float32 for st in sd["state"].values() for k, v in st.items() if k != "step")
    torch_opt = torch.optim.AdamW(params, lr=0.5)
    torch_opt.load_state_dict(sd)
    assert torch_opt.param_groups[0]["lr"] == 1e-2 and "block_size" not in torch_opt.param_groups[0]
    _train(torch_opt, params, 1)  # it steps


def test_bad_state_dict_is_rejected_before_anything_changes():
    params = _params()
    opt = AdamW8bit(params)
    _train(opt, params, 1)
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(before)
    sd["state"][0]["exp_avg_scale"] = sd["state"][0]["exp_avg_scale"][:-1]
    with pytest.raises(ValueError, match="exp_avg_scale"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(before)
    sd["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k])


# ----- training features --------------------------------------------------------------------------


def _tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))


@pytest.mark.parametrize("device", devices())
def test_grad_scaler_matches_unscaled_and_skips_inf_steps(device):
    a, b = _tiny_model(0).to(device), _tiny_model(0).to(device)
    oa, ob = AdamW8bit(a.parameters(), lr=1e-2), AdamW8bit(b.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    x = torch.randn(32, 64, device=device)
    for step in range(5):
        oa.zero_grad()
        a(x).square().mean().backward()
        oa.step()
        ob.zero_grad()
        scaler.scale(b(x).square().mean()).backward()
        if step == 2:
            next(b.parameters()).grad[0, 0] = float("inf")
        scaler.step(ob)
        scaler.update()
    # the inf step changed nothing; the others equal unscaled steps (power-of-two scale: exact)
    assert float(ob.state[b[0].weight]["step"]) == 4 and float(oa.state[a[0].weight]["step"]) == 5
    ref_model = _tiny_model(0).to(device)
    oref = AdamW8bit(ref_model.parameters(), lr=1e-2)
    for step in range(5):
        if step == 2:
            continue
        oref.zero_grad()
        ref_model(x).square().mean().backward()
        oref.step()
    # same gradients only at identical params: compare the scaled run with its own unscaled replay
    for p, q in zip(b.parameters(), ref_model.parameters()):
        assert torch.isfinite(p).all()
        assert_close(p, q, rtol=1e-5, atol=1e-6, what="GradScaler run")


def test_max_grad_norm_clips_like_clip_grad_norm():
    params = _params(seed=3)
    twin = [p.detach().clone().requires_grad_() for p in params]
    clipped = AdamW8bit(params, lr=1e-2, max_grad_norm=0.5)
    manual = AdamW8bit(twin, lr=1e-2)
    for s in range(4):
        grads = _grads(params, s)
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g * 10, g.clone() * 10
        clipped.step()
        norm = torch.nn.utils.clip_grad_norm_(twin, 0.5)
        manual.step()
        assert_close(clipped.last_grad_norm, norm, rtol=1e-5, atol=0, what="last_grad_norm")
    for p, q in zip(params, twin):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what="clipped")


def test_prune_masks_keep_pruned_weights_zero():
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))
    bk.prune_(model, sparsity=0.5)
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    x = torch.randn(16, 128)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    w = model[0].weight
    assert opt.state[w]["exp_avg"].dtype == torch.uint8
    assert (w[~model[0].weight_mask] == 0).all() and (w[model[0].weight_mask] != 0).all()


def test_lr_scheduler_drives_the_step():
    base = _params(seed=4)
    a = [p.detach().clone().requires_grad_() for p in base]
    b = [p.detach().clone().requires_grad_() for p in base]
    oa, ob = AdamW8bit(a, lr=0.05), AdamW8bit(b, lr=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(oa, max_lr=0.1, total_steps=10)
    for s in range(6):
        for g in ob.param_groups:  # OneCycleLR drives lr and beta1 (cycle_momentum)
            g["lr"], g["betas"] = oa.param_groups[0]["lr"], oa.param_groups[0]["betas"]
        _train(oa, a, 1, seed=s)
        _train(ob, b, 1, seed=s)
        sched.step()
    assert oa.param_groups[0]["lr"] != 0.05 and oa.param_groups[0]["betas"][0] != 0.9
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_compiled_step_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    base = _params(seed=5)
    a = [p.detach().clone().requires_grad_() for p in base]
    b = [p.detach().clone().requires_grad_() for p in base]
    oa, ob = AdamW8bit(a, lr=1e-2, max_grad_norm=1.0), AdamW8bit(b, lr=1e-2, max_grad_norm=1.0)
    step = torch.compile(ob.step, fullgraph=True, backend="aot_eager")
    for s in range(3):
        for p, q, g in zip(a, b, _grads(a, s)):
            p.grad, q.grad = g, g.clone()
        oa.step()
        step()
    for x, y in zip(a, b):
        assert_close(x, y, rtol=1e-6, atol=1e-7, what="compiled")
    for p, q in zip(a, b):
        for k in oa.state[p]:
            assert torch.equal(oa.state[p][k], ob.state[q][k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_16_bit_and_fp64_params(dtype):
    """bf16 params on the kernel (fp32 maths), fp64 on the reference op: both track fp32 AdamW8bit."""
    params = _params(dtype=dtype, seed=6)
    fp32 = [p.detach().float().requires_grad_() for p in params]
    o, o32 = AdamW8bit(params, lr=1e-2), AdamW8bit(fp32, lr=1e-2)
    for s in range(3):
        for p, q, g in zip(params, fp32, _grads(fp32, s)):
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        o.step()
        o32.step()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for x, y in zip(params, fp32):
        assert_close(x.float(), y, **tol, what=str(dtype))
    assert torch.equal(o.state[params[0]]["exp_avg"], o32.state[fp32[0]]["exp_avg"]) or dtype == torch.bfloat16


def test_constructor_errors_and_pickle():
    ps = _params()
    for kw, msg in ((dict(lr=-1), "learning rate"), (dict(betas=(1.0, 0.9)), "beta"), (dict(eps=-1), "epsilon"),
                    (dict(weight_decay=-1), "weight_decay"), (dict(block_size=100), "block_size"),
                    (dict(block_size=32), "block_size"), (dict(max_grad_norm=0), "max_grad_norm")):
        with pytest.raises(ValueError, match=msg):
            AdamW8bit(ps, **kw)
    with pytest.raises(TypeError):
        AdamW8bit(ps, amsgrad=True)
    opt = AdamW8bit(ps, lr=1e-2, max_grad_norm=2.0)
    _train(opt, ps, 1)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.max_grad_norm == 2.0 and clone.param_groups[0]["block_size"] == 256
    copy.deepcopy(opt).step()


# ----- DTensor params (2 CPU ranks, gloo) ------------------------------------------------------------
def _dtensor_body():
    """DTensor params (an uneven Shard(0) whose shards end on block boundaries, a Replicate one, a
    small one) step exactly like the same params as plain tensors (the blocks coincide), with
    max_grad_norm over the shards; codes are DTensors placed like the params; the state dict
    round-trips on the same mesh and training continues exactly; fp32_state_dict is placed like
    the params."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(75, 64, generator=gen), torch.randn(80, 64, generator=gen), torch.randn(40, generator=gen)]
    pls = [(Shard(0),), (Replicate(),), (Shard(0),)]
    plain = [t.clone().requires_grad_() for t in full]
    dts = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(full, pls)]
    kw = dict(lr=1e-2, block_size=64, max_grad_norm=5.0)
    o_plain, o_dt = AdamW8bit(plain, **kw), AdamW8bit(dts, **kw)

    def step(opt, ps, dist_grads, seed):
        g = torch.Generator().manual_seed(seed)
        grads = [torch.randn(t.shape, generator=g) for t in full]
        for p, gr, pl in zip(ps, grads, pls):
            p.grad = distribute_tensor(gr, mesh, pl) if dist_grads else gr
        opt.step()

    for s in range(3):
        step(o_plain, plain, False, s)
        step(o_dt, dts, True, s)
    # same maths on the same blocks; the clipping norm's sum is reduced across ranks in another
    # order (fp64 partial sums), so equal within the optimizer tolerance rather than bitwise
    for a, b in zip(dts, plain):
        assert_close(a.full_tensor(), b.detach(), rtol=1e-5, atol=1e-6, what="DTensor vs plain")
    assert abs(float(o_dt.last_grad_norm) - float(o_plain.last_grad_norm)) <= 1e-5 * float(o_plain.last_grad_norm)
    st = o_dt.state[dts[0]]
    assert isinstance(st["exp_avg"], DTensor) and tuple(st["exp_avg"].placements) == (Shard(0),)
    codes, want = st["exp_avg"].full_tensor(), o_plain.state[plain[0]]["exp_avg"]
    assert (codes != want).sum() <= codes.numel() // 500, (codes != want).sum()
    assert st["exp_avg_scale"].to_local().shape == (38,)  # the larger shard's 38 blocks (rank 1 pads one)
    assert o_dt.state[dts[2]]["exp_avg"].dtype == torch.float32  # small: fp32 moments
    # state dict round trip on the same mesh, then both continue identically
    sd = copy.deepcopy(o_dt.state_dict())  # as a checkpoint: no tensor shared with o_dt
    dts2 = [torch.nn.Parameter(distribute_tensor(p.full_tensor().detach().clone(), mesh, pl)) for p, pl in zip(dts, pls)]
    o_dt2 = AdamW8bit(dts2, **kw)
    o_dt2.load_state_dict(sd)
    for s in range(3, 5):
        step(o_dt, dts, True, s)
        step(o_dt2, dts2, True, s)
        step(o_plain, plain, False, s)
    for i, (a, b, c) in enumerate(zip(dts, dts2, plain)):
        assert_close(a.full_tensor(), c.detach(), rtol=1e-5, atol=1e-6, what=f"continued {i}")
        assert torch.equal(a.full_tensor(), b.full_tensor()), (i, "reloaded", (a.full_tensor() - b.full_tensor()).abs().max())
    fp32 = o_dt.fp32_state_dict()["state"][0]["exp_avg"]
    want = o_plain.fp32_state_dict()["state"][0]["exp_avg"]
    assert isinstance(fp32, DTensor) and tuple(fp32.placements) == (Shard(0),)
    assert_close(fp32.full_tensor(), want, rtol=0, atol=float(want.abs().max()) / 8, what="fp32_state_dict")
    return float(o_dt.last_grad_norm)


def test_dtensor_params_step_on_their_shards(dist_workers):
    dist_workers.run(_dtensor_body)
