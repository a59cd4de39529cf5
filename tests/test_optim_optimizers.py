"""FusedAdam / FusedAdamW / FusedSGD against torch.optim's own optimizers: a seeded sweep of random
hyperparameters over 30+ steps, state_dict round trips both ways, schedulers, GradScaler, clipping,
per-step Python cost, and torch's errors for bad input."""
from __future__ import annotations

import copy
import io
import random
import sys
import zipfile

import pytest
import torch

import bigkernels as bk
from conftest import assert_close, devices

PAIRS = {
    "adam": (torch.optim.Adam, bk.optim.FusedAdam),
    "adamw": (torch.optim.AdamW, bk.optim.FusedAdamW),
    "sgd": (torch.optim.SGD, bk.optim.FusedSGD),
}
SHAPES = [(5, 123, 123), (17,), (1,), (300, 7), (64, 65)]


def _hyper(kind, gen):
    if kind == "sgd":
        momentum = gen.choice([0.0, gen.uniform(0.5, 0.95)])
        nesterov = momentum > 0 and gen.random() < 0.5
        return dict(lr=gen.uniform(1e-3, 0.1), momentum=momentum, dampening=0.0 if nesterov else gen.uniform(0, 0.3),
                    weight_decay=gen.choice([0.0, gen.uniform(0, 0.1)]), nesterov=nesterov,
                    maximize=gen.random() < 0.3)
    return dict(lr=gen.uniform(1e-4, 3e-2), betas=(gen.uniform(0.8, 0.95), gen.uniform(0.95, 0.9999)),
                eps=gen.choice([1e-8, 1e-6]), weight_decay=gen.choice([0.0, gen.uniform(0, 0.1)]),
                amsgrad=gen.random() < 0.4, maximize=gen.random() < 0.3)


def _params(device, dtype, seed):
    torch.manual_seed(seed)
    return [torch.randn(s, device=device).to(dtype) for s in SHAPES]


def _two_groups(params, kind, gen):
    """Two param groups with different hyperparameters, as a user with no-decay groups has."""
    h1, h2 = _hyper(kind, gen), _hyper(kind, gen)
    return [dict(params=params[:3], **h1), dict(params=params[3:], **h2)]


def _train(pairs, steps, seed, skip_every=0, device="cpu"):
    """Step each (params, optimizer) with identical random grads; every skip_every-th step one
    param has no grad."""
    torch.manual_seed(seed + 1000)
    for step in range(steps):
        for i, p in enumerate(pairs[0][0]):
            g = torch.randn_like(p, dtype=torch.float32).to(p.dtype)
            none = skip_every and step % skip_every == 0 and i == 1
            for params, _ in pairs:
                params[i].grad = None if none else g.clone()
        for _, opt in pairs:
            opt.step()


def _assert_params_close(a, b, dtype, what):
    for i, (x, y) in enumerate(zip(a, b)):
        if dtype == torch.float32:
            assert_close(x, y, rtol=1e-5, atol=1e-6, what=f"{what} param {i}")
            scale = y.detach().abs().max().item()
            assert (x - y).abs().max().item() <= 1e-6 * max(scale, 1.0), f"{what} param {i}: > 1e-6 relative"
        else:
            assert_close(x, y, rtol=1e-2, atol=1e-3, what=f"{what} param {i}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_matches_torch_over_30_steps(device, kind, dtype, seed):
    gen = random.Random(seed * 31 + len(kind))
    torch_cls, fused_cls = PAIRS[kind]
    base = _params(device, dtype, seed)
    ours = [p.clone().requires_grad_() for p in base]
    theirs = [p.clone().requires_grad_() for p in base]
    groups = _two_groups(list(range(len(base))), kind, gen)
    # torch's fused kernels also do 16-bit maths in fp32; its default loops do not.
    torch_kw = dict(fused=True) if dtype != torch.float32 else {}
    opt_t = torch_cls([dict(g, params=[theirs[i] for i in g["params"]]) for g in groups], **torch_kw)
    opt_f = fused_cls([dict(g, params=[ours[i] for i in g["params"]]) for g in groups])
    # torch 2.14's fused SGD raises on a param whose grad is None; ours skips it like the loops do.
    skip_every = 0 if (kind == "sgd" and torch_kw) else 5
    _train([(theirs, opt_t), (ours, opt_f)], steps=32, seed=seed, skip_every=skip_every)
    _assert_params_close(ours, theirs, dtype, f"{kind} seed {seed}")
    # same state layout: keys per param, step counts
    st_t, st_f = opt_t.state_dict()["state"], opt_f.state_dict()["state"]
    assert st_t.keys() == st_f.keys()
    for k in st_t:
        assert st_t[k].keys() == st_f[k].keys(), f"state keys of param {k}"
        if "step" in st_t[k]:
            assert float(st_t[k]["step"]) == float(st_f[k]["step"])


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_round_trip(kind, direction):
    gen = random.Random(7)
    hyper = _hyper(kind, gen)
    if kind == "sgd":
        hyper["momentum"] = 0.9
    torch_cls, fused_cls = PAIRS[kind]
    first, second = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)
    params = [p.requires_grad_() for p in _params("cpu", torch.float32, 3)]
    opt = first(params, **hyper)
    _train([(params, opt)], steps=6, seed=1)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    # continue with the same class and with the other class from the checkpoint
    same = [p.clone().requires_grad_() for p in ckpt["params"]]
    other = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt_same, opt_other = first(same, **hyper), second(other, **hyper)
    opt_same.load_state_dict(copy.deepcopy(ckpt["opt"]))
    opt_other.load_state_dict(copy.deepcopy(ckpt["opt"]))
    _train([(same, opt_same), (other, opt_other)], steps=5, seed=2)
    _assert_params_close(other, same, torch.float32, f"{kind} {direction}")
    assert opt_other.state_dict()["param_groups"][0].keys() == opt_same.state_dict()["param_groups"][0].keys()


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_lr_scheduler(kind):
    torch_cls, fused_cls = PAIRS[kind]
    base = _params("cpu", torch.float32, 4)
    a, b = [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]
    opt_t, opt_f = torch_cls(a, lr=0.05), fused_cls(b, lr=0.05)
    sch = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=12) for o in (opt_t, opt_f)]
    for _ in range(10):
        _train([(a, opt_t), (b, opt_f)], steps=1, seed=len(sch))
        for s in sch:
            s.step()
    assert opt_f.param_groups[0]["lr"] == opt_t.param_groups[0]["lr"]
    _assert_params_close(b, a, torch.float32, "scheduled")


def _tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_grad_scaler_skips_inf_steps_like_torch(device, kind):
    torch_cls, fused_cls = PAIRS[kind]
    models = [_tiny_model(0).to(device), _tiny_model(0).to(device)]
    opts = [torch_cls(models[0].parameters(), lr=1e-2), fused_cls(models[1].parameters(), lr=1e-2)]
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in models]
    torch.manual_seed(5)
    for step in range(6):
        x = torch.randn(4, 8, device=device)
        if step == 3:
            x[0, 0] = float("inf")  # this step's grads overflow: both must skip it
        for m, o, s in zip(models, opts, scalers):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            before = [p.detach().clone() for p in m.parameters()]
            state_before = copy.deepcopy(o.state_dict()["state"])
            s.step(o)
            s.update()
            if step == 3:
                assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)), "inf step changed a param"
                after = o.state_dict()["state"]
                for k in state_before:
                    for name, v in state_before[k].items():
                        assert torch.equal(torch.as_tensor(after[k][name]), torch.as_tensor(v)), f"state {name} changed"
    for p, q in zip(models[1].parameters(), models[0].parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what="after GradScaler steps")
    assert scalers[0].get_scale() == scalers[1].get_scale()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_max_grad_norm_matches_clip_grad_norm(device, kind):
    torch_cls, fused_cls = PAIRS[kind]
    base = _params(device, torch.float32, 6)
    a, b = [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]
    opt_t, opt_f = torch_cls(a, lr=1e-2), fused_cls(b, lr=1e-2, max_grad_norm=0.5)
    torch.manual_seed(9)
    for _ in range(5):
        for x, y in zip(a, b):
            g = torch.randn_like(x) * 3
            x.grad, y.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(a, 0.5)
        opt_t.step()
        opt_f.step()
        assert_close(opt_f.last_grad_norm, norm, rtol=1e-5, atol=0, what="last_grad_norm")
    _assert_params_close(b, a, torch.float32, "clipped")


def test_closure_zero_grad_and_none_grads():
    model = _tiny_model(1)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(3, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no grads at all: nothing changes
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # a param that never had a grad gets no state (torch's layout)
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra]})
    opt.step(closure)
    assert extra not in opt.state and len(opt.state) == 4


def test_mixed_dtypes_and_noncontiguous_params():
    fp32 = torch.nn.Parameter(torch.randn(6, 5))
    bf16 = torch.nn.Parameter(torch.randn(7).bfloat16())
    strided = torch.nn.Parameter(torch.randn(5, 6).t())  # non-contiguous: taken by the reference path
    params = [fp32, bf16, strided]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_f = bk.optim.FusedAdamW(params, lr=1e-2)
    opt_t = torch.optim.AdamW(twins, lr=1e-2)
    for _ in range(4):
        for p, q in zip(params, twins):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt_f.step()
        opt_t.step()
    assert_close(fp32, twins[0], rtol=1e-5, atol=1e-6, what="fp32")
    assert_close(strided, twins[2], rtol=1e-5, atol=1e-6, what="strided")
    assert_close(bf16, twins[1], rtol=1e-2, atol=1e-2, what="bf16")


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_bad_input_raises_like_torch(kind):
    torch_cls, fused_cls = PAIRS[kind]
    p = torch.nn.Parameter(torch.randn(3))
    bad = [dict(lr=-1.0)]
    if kind != "sgd":
        bad += [dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0)]
    else:
        bad += [dict(momentum=-0.5), dict(nesterov=True, momentum=0.0)]
    for kw in bad:
        with pytest.raises(ValueError) as ours:
            fused_cls([p], **kw)
        with pytest.raises(ValueError) as theirs:
            torch_cls([p], **kw)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="more than one parameter group"):
        fused_cls([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="complex"):
        fused_cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_cls([p], max_grad_norm=-1.0)


def test_sparse_grad_raises_and_changes_nothing():
    dense = torch.nn.Parameter(torch.randn(4))
    emb = torch.nn.Parameter(torch.randn(5, 3))
    opt = bk.optim.FusedAdamW([dense, emb])
    dense.grad = torch.randn(4)
    emb.grad = torch.randn(5, 3).to_sparse()
    before = [dense.detach().clone(), emb.detach().clone()]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(emb, before[1])


def _python_lines_per_step(n_params):
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n_params)]
    opt = bk.optim.FusedAdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn(8)
    opt.step()  # builds buckets and state
    for p in params:
        p.grad = torch.randn(8)  # new grad tensors, as after zero_grad(set_to_none=True)
    count = [0]

    def tracer(frame, event, arg):
        if event == "line":
            count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        opt.step()
    finally:
        sys.settrace(None)
    return count[0]


def test_python_cost_per_step_does_not_grow_with_params():
    assert _python_lines_per_step(2000) == _python_lines_per_step(20)


# ----- flat state -------------------------------------------------------------------------------------
class _ListStateAdamW(bk.optim.FusedAdamW):
    """FusedAdamW keeping one state tensor per param (the list form): the baseline of flat state."""
    _flat_state = False


def _storages(opt, name):
    return {opt.state[p][name].untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"]
            if p in opt.state}


def test_flat_state_is_one_buffer_per_name_and_equals_list_state_through_changes():
    """Flat state (views of one buffer per state name and bucket) gives bit-for-bit the list form's
    results through: steps with missing grads, a torch checkpoint loaded (re-flattened once), a
    torch.save/load round trip (re-flattened once), amsgrad switched on, and a pruning mask
    that moves params to another bucket."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
                                torch.nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    flat, lists = bk.optim.FusedAdamW(model.parameters(), lr=0.02), _ListStateAdamW(twin.parameters(), lr=0.02)
    torch.manual_seed(3)

    def steps(n, drop=None):
        for i in range(n):
            x = torch.randn(5, 8)
            for m, o in ((model, flat), (twin, lists)):
                o.zero_grad()
                m(x).square().mean().backward()
                if drop is not None and i % 2 == 0:
                    m[drop].weight.grad = None  # some steps without this param's grad: list-form calls
                o.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b), "flat state diverged from list state"

    steps(3)
    assert all(len(_storages(flat, n)) == 1 for n in ("step", "exp_avg", "exp_avg_sq"))
    assert flat.state[model[0].weight]["exp_avg"].untyped_storage().nbytes() > model[0].weight.nbytes
    steps(4, drop=2)
    # a checkpoint in torch.optim's layout (separate tensors): copied into flat buffers at the next step
    sd = flat.state_dict()
    sd["state"] = {k: {n: v.clone() for n, v in st.items()} for k, st in sd["state"].items()}
    flat.load_state_dict(sd)
    assert len(_storages(flat, "exp_avg")) > 1
    steps(1)
    assert len(_storages(flat, "exp_avg")) == 1
    # torch.save / torch.load of flat state: compact tensors in the checkpoint, flat again after a step
    buf = io.BytesIO()
    torch.save(flat.state_dict(), buf)
    buf.seek(0)
    flat.load_state_dict(torch.load(buf))
    assert len(_storages(flat, "exp_avg")) > 1
    steps(1)
    assert len(_storages(flat, "exp_avg")) == 1
    for o in (flat, lists):
        o.param_groups[0]["amsgrad"] = True
    steps(2)
    assert len(_storages(flat, "max_exp_avg_sq")) == 1
    for m in (model, twin):
        bk.prune_(m, sparsity=0.5, filter_fn=lambda mod, fqn: fqn == "2")  # layer 2 moves to a masked bucket
    steps(3)
    assert all(len(_storages(flat, n)) == 2 for n in ("exp_avg", "step"))  # one buffer per bucket


def _saved(obj):
    """``torch.save``'s bytes of ``obj`` and the total size of the storage records in them."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        data = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    return len(buf.getvalue()), data


@pytest.mark.parametrize("amsgrad", [False, True])
def test_saved_flat_state_holds_exactly_its_elements(amsgrad):
    """torch.save(opt.state_dict()) of flat state writes each entry's own elements (not the flat
    buffers with every param's piece and the alignment padding): its storages sum to the state
    tensors' bytes and the file is byte for byte as large as torch.optim.AdamW's after the same
    steps (same layout); it loads back into flat state and into torch.optim.AdamW, both continuing
    like the optimizer that saved it. Some params never get a gradient (no state, but a piece
    of the buffers is theirs)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Linear(13, 5), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    kw = dict(lr=0.02, weight_decay=0.1, amsgrad=amsgrad)
    ours, theirs = bk.optim.FusedAdamW(model.parameters(), **kw), torch.optim.AdamW(twin.parameters(), **kw)
    for _ in range(3):
        x = torch.randn(4, 7)
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            m[2].bias.grad = None  # never stepped: no state entry
            o.step()
    assert len(_storages(ours, "exp_avg")) == 1 and model[2].bias not in ours.state
    sd = ours.state_dict()
    state = [t for st in sd["state"].values() for t in st.values()]
    assert len(state) == 5 * (4 if amsgrad else 3)
    size, data = _saved(sd)
    assert data == sum(t.numel() * t.element_size() for t in state)
    assert size == _saved(theirs.state_dict())[0]
    for st in ours.state.values():  # the live state is still the flat buffers' views
        assert st["exp_avg"].untyped_storage().nbytes() > st["exp_avg"].numel() * 4
    buf = io.BytesIO()
    torch.save(sd, buf)
    saved_model = copy.deepcopy(model)

    def one_step(m, o):
        o.zero_grad()
        m(torch.ones(2, 7)).square().mean().backward()
        o.step()

    one_step(model, ours)
    for cls in (bk.optim.FusedAdamW, torch.optim.AdamW):
        m = copy.deepcopy(saved_model)
        o = cls(m.parameters(), **kw)
        buf.seek(0)
        o.load_state_dict(torch.load(buf))
        one_step(m, o)
        for p, q in zip(m.parameters(), model.parameters()):
            assert_close(p, q, what=f"continued after loading into {cls.__name__}", rtol=1e-6, atol=1e-7)
        if cls is bk.optim.FusedAdamW:
            assert len(_storages(o, "exp_avg")) == 1  # flat again after the loaded step
            assert all(torch.equal(p, q) for p, q in zip(m.parameters(), model.parameters()))


def test_failed_step_removes_the_state_it_created(monkeypatch):
    """A step whose op raises (after the state was created) leaves no state behind, for the flat
    and list forms and for state made by the step (SGD); the next step starts clean."""
    for make, op in ((lambda ps: bk.optim.FusedAdamW(ps, lr=0.1), "fused_adamw_flat_"),
                     (lambda ps: _ListStateAdamW(ps, lr=0.1), "fused_adamw_"),
                     (lambda ps: bk.optim.FusedSGD(ps, lr=0.1, momentum=0.9), "fused_sgd_")):
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        opt = make(params)
        for p in params:
            p.grad = torch.randn_like(p)
        with monkeypatch.context() as mp:
            def boom(*args, **kwargs):
                raise RuntimeError("injected failure")
            mp.setattr(bk.ops._registry, "call_backend", boom)
            with pytest.raises(RuntimeError, match="injected failure"):
                opt.step()
        assert len(opt.state) == 0 and opt.state_dict()["state"] == {}, (op, dict(opt.state))
        opt.step()
        assert len(opt.state) == 2 and all(len(st) >= 1 for st in opt.state.values())
