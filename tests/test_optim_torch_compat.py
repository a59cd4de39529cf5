"""FusedAdam / FusedAdamW / FusedSGD accept everything torch.optim's namesakes accept, as torch does:
torch's own ``optim_db`` configurations (results and error inputs), every keyword of the installed
torch's signatures, named parameters, float64, torch.compile without graph breaks in our code, and
steps that fail without leaving state behind."""
from __future__ import annotations

import copy
import gc
import inspect
import io
import pickle
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import bigkernels as bk
from conftest import assert_close

OURS = {torch.optim.Adam: bk.optim.FusedAdam, torch.optim.AdamW: bk.optim.FusedAdamW,
        torch.optim.SGD: bk.optim.FusedSGD}
INFOS = [info for info in optim_db if info.optim_cls in OURS]
SHAPES = [(5, 13, 17), (17,), (1,), (0, 4), (3, 7)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}


def _params(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _pair(base):
    return [torch.nn.Parameter(p.clone()) for p in base], [torch.nn.Parameter(p.clone()) for p in base]


def _steps(pairs, steps, seed=1, none_every=0):
    """Step each (params, optimizer) with the same fresh random gradients; every ``none_every``-th
    step param 1 has no gradient."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(pairs[0][0]):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            none = none_every and step % none_every == 0 and i == 1
            for params, _ in pairs:
                params[i].grad = None if none else g.clone()
        for _, opt in pairs:
            opt.step()


def _close(ours, theirs, dtype, what):
    for i, (x, y) in enumerate(zip(ours, theirs)):
        assert x.dtype == y.dtype
        assert_close(x, y, what=f"{what} param {i}", **TOL[dtype])


def _same_state_layout(opt_f, opt_t, what):
    sd_f, sd_t = opt_f.state_dict(), opt_t.state_dict()
    assert sd_f["state"].keys() == sd_t["state"].keys(), what
    for k, st in sd_t["state"].items():
        assert sd_f["state"][k].keys() == st.keys(), f"{what}: state keys of param {k}"
        for name, v in st.items():
            if name == "step":
                assert float(sd_f["state"][k]["step"]) == float(v), f"{what}: step"
            else:
                assert sd_f["state"][k][name].dtype == v.dtype and sd_f["state"][k][name].shape == v.shape, name
                assert_close(sd_f["state"][k][name], v, rtol=1e-4, atol=1e-6, what=f"{what}: state {name}")
    for gf, gt in zip(sd_f["param_groups"], sd_t["param_groups"]):
        assert gf.keys() == gt.keys(), f"{what}: param group keys"


# ----- torch's optim_db: every configuration (with foreach / fused / differentiable), both ways ------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.optim_cls.__name__)
def test_optim_db_configs_match_torch(info, dtype):
    torch_cls, ours_cls = info.optim_cls, OURS[info.optim_cls]
    configs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, info)
    # foreach is not in torch's CPU list of cliquey flags; it is a keyword all the same.
    configs += [type(c)(params=None, kwargs=dict(c.kwargs, foreach=True), desc=f"{c.desc} & foreach")
                for c in info.optim_inputs_func("cpu") if "capturable" not in c.kwargs]
    ran = 0
    for config in configs:
        kw = config.kwargs
        if "capturable" in kw and kw["capturable"] and torch_cls is not torch.optim.SGD:
            continue  # torch's capturable configs are CUDA-only
        ours_p, theirs_p = _pair(_params(dtype))
        if kw.get("differentiable"):
            with pytest.raises(RuntimeError, match="differentiable"):
                ours_cls(ours_p, **copy.deepcopy(kw))
            continue
        opt_f = ours_cls(ours_p, **copy.deepcopy(kw))
        opt_t = torch_cls(theirs_p, **copy.deepcopy(kw))
        _steps([(theirs_p, opt_t), (ours_p, opt_f)], steps=8)
        _close(ours_p, theirs_p, dtype, f"{torch_cls.__name__} {config.desc}")
        _same_state_layout(opt_f, opt_t, config.desc)
        ran += 1
    assert ran >= 10


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.optim_cls.__name__)
def test_optim_db_error_inputs_raise_like_torch(info):
    torch_cls, ours_cls = info.optim_cls, OURS[info.optim_cls]
    errors = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert len(errors) >= 6
    for err in errors:
        given = err.optimizer_error_input
        for cls in (torch_cls, ours_cls):
            params, kw = copy.deepcopy(given.params), copy.deepcopy(given.kwargs)
            if issubclass(err.error_type, Warning):
                with pytest.warns(err.error_type, match=err.error_regex):
                    opt = cls(params, **kw)
                    if err.error_on == OptimizerErrorEnum.STEP_ERROR:
                        opt.step()
            else:
                with pytest.raises(err.error_type, match=err.error_regex):
                    opt = cls(params, **kw)
                    if err.error_on == OptimizerErrorEnum.STEP_ERROR:
                        opt.step()
    # torch's CUDA-only error inputs: the checks are in the constructors, so they hold on CPU too
    p = torch.nn.Parameter(torch.randn(2))
    for kw, regex in (({"foreach": True, "fused": True}, "`fused` and `foreach` cannot be `True` together"),
                      ({"fused": True, "differentiable": True}, "differentiable")):
        with pytest.raises(RuntimeError, match=regex):
            torch_cls([p], **kw)
        with pytest.raises(RuntimeError, match=regex):
            ours_cls([p], **kw)


# ----- every keyword of the installed torch's signature -------------------------------------------
@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
def test_signature_is_torchs_plus_max_grad_norm(torch_cls):
    theirs = inspect.signature(torch_cls).parameters
    ours = inspect.signature(OURS[torch_cls]).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert [k for k in ours if k not in theirs] == ["max_grad_norm"]
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    with pytest.raises(TypeError, match="unexpected keyword argument 'betass'"):
        OURS[torch_cls]([torch.nn.Parameter(torch.randn(2))], betass=(0.9, 0.99))


@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
def test_every_flag_keyword(torch_cls):
    """Each bool / Optional[bool] keyword of torch's signature, both values: the same results as
    torch with that value (foreach / fused / capturable choose nothing; capturable=True compared
    with torch's capturable=False, which is what torch runs on CPU), differentiable=True refused."""
    base = dict(momentum=0.9) if torch_cls is torch.optim.SGD else dict(weight_decay=0.1)
    flags = [n for n, p in inspect.signature(torch_cls).parameters.items() if (p.default is False or p.default is None)
             and n != "params"]
    assert {"foreach", "fused", "differentiable", "maximize"} <= set(flags)
    for name in flags:
        for value in (True, False):
            kw = dict(base, **{name: value})
            ours_p, theirs_p = _pair(_params(torch.float32, seed=3))
            if name == "differentiable" and value:
                with pytest.raises(RuntimeError, match="differentiable=True"):
                    OURS[torch_cls](ours_p, **kw)
                # also when a param group asks for it; nothing is added
                opt = OURS[torch_cls](ours_p[:2], **base)
                with pytest.raises(RuntimeError, match="differentiable=True"):
                    opt.add_param_group({"params": ours_p[2:], "differentiable": True})
                assert len(opt.param_groups) == 1
                continue
            if name == "nesterov" and value:
                kw["dampening"] = 0.0
            opt_f = OURS[torch_cls](ours_p, **kw)
            opt_t = torch_cls(theirs_p, **dict(kw, capturable=False) if name == "capturable" else kw)
            _steps([(theirs_p, opt_t), (ours_p, opt_f)], steps=5)
            _close(ours_p, theirs_p, torch.float32, f"{torch_cls.__name__} {name}={value}")
            assert opt_f.param_groups[0][name] == value  # stored like torch's (state_dict compatible)


def test_decoupled_weight_decay_makes_adam_adamw():
    ours_p, theirs_p = _pair(_params(torch.float32, seed=4))
    opt_f = bk.optim.FusedAdam(ours_p, lr=0.01, weight_decay=0.3, decoupled_weight_decay=True)
    opt_t = torch.optim.AdamW(theirs_p, lr=0.01, weight_decay=0.3)
    _steps([(theirs_p, opt_t), (ours_p, opt_f)], steps=6)
    _close(ours_p, theirs_p, torch.float32, "Adam(decoupled_weight_decay=True) vs AdamW")
    plain = [torch.nn.Parameter(p.clone()) for p in _params(torch.float32, seed=4)]
    _steps([(plain, bk.optim.FusedAdam(plain, lr=0.01, weight_decay=0.3))], steps=6)
    assert max((a - b).abs().max().item() for a, b in zip(plain, ours_p) if a.numel()) > 1e-4
    # a FusedAdamW checkpoint keeps decoupled weight decay when loaded into Adam's namesake
    assert opt_f.state_dict()["param_groups"][0]["decoupled_weight_decay"] is True


# ----- named parameters ------------------------------------------------------------------------------
def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.LayerNorm(9), torch.nn.Linear(9, 3))


def _train_models(pairs, steps=5):
    torch.manual_seed(11)
    for _ in range(steps):
        x = torch.randn(4, 6)
        for model, opt in pairs:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()


@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
def test_named_parameters_and_named_groups(torch_cls):
    ours_cls = OURS[torch_cls]
    kw = dict(lr=0.02, momentum=0.9) if torch_cls is torch.optim.SGD else dict(lr=0.02)
    m_t, m_f = _model(0), _model(0)
    opt_t, opt_f = torch_cls(m_t.named_parameters(), **kw), ours_cls(m_f.named_parameters(), **kw)
    _train_models([(m_t, opt_t), (m_f, opt_f)])
    _close(list(m_f.parameters()), list(m_t.parameters()), torch.float32, "named_parameters()")
    sd_f, sd_t = opt_f.state_dict(), opt_t.state_dict()
    names = [n for n, _ in m_f.named_parameters()]
    assert sd_f["param_groups"][0]["param_names"] == sd_t["param_groups"][0]["param_names"] == names
    _same_state_layout(opt_f, opt_t, "named")

    # groups of (name, param) tuples with their own hyperparameters (a no-decay group)
    def groups(model):
        named = list(model.named_parameters())
        return [{"params": [t for t in named if t[0].endswith("weight")], "weight_decay": 0.1},
                {"params": [t for t in named if not t[0].endswith("weight")], "weight_decay": 0.0, "lr": 0.05}]

    m_t, m_f = _model(1), _model(1)
    opt_t, opt_f = torch_cls(groups(m_t), **kw), ours_cls(groups(m_f), **kw)
    _train_models([(m_t, opt_t), (m_f, opt_f)])
    _close(list(m_f.parameters()), list(m_t.parameters()), torch.float32, "named groups")
    assert [g["param_names"] for g in opt_f.state_dict()["param_groups"]] == \
        [g["param_names"] for g in opt_t.state_dict()["param_groups"]]

    # a torch checkpoint with names loads here and training continues identically, and back
    buf = io.BytesIO()
    torch.save(opt_t.state_dict(), buf)
    m_f2 = copy.deepcopy(m_t)
    opt_f2 = ours_cls(groups(m_f2), **kw)
    buf.seek(0)
    opt_f2.load_state_dict(torch.load(buf))
    m_t2 = copy.deepcopy(m_t)
    opt_t2 = torch_cls(groups(m_t2), **kw)
    opt_t2.load_state_dict(copy.deepcopy(opt_f2.state_dict()))  # load_state_dict shares tensors
    _train_models([(m_t, opt_t), (m_f2, opt_f2), (m_t2, opt_t2)], steps=3)
    _close(list(m_f2.parameters()), list(m_t.parameters()), torch.float32, "after loading torch's named state")
    _close(list(m_t2.parameters()), list(m_t.parameters()), torch.float32, "torch after loading ours")


def test_mixed_named_and_unnamed_raise_torchs_errors():
    a, b = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(3))
    for cls in (torch.optim.AdamW, bk.optim.FusedAdamW):
        with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
            cls([("a", a), b])
        opt = cls([("a", a)])
        with pytest.raises(ValueError, match="cannot add param group without names"):
            opt.add_param_group({"params": [b]})
        assert len(opt.param_groups) == 1


# ----- float64 ---------------------------------------------------------------------------------------
def test_float64_mixed_with_fp32_bf16_in_one_model():
    """fp64 params step in fp64 (reference op) next to kernel-stepped fp32/bf16 params."""
    base = [torch.randn(7, 5, dtype=torch.float64), torch.randn(9), torch.randn(4, 4).bfloat16()]
    ours_p, theirs_p = _pair(base)
    # max_grad_norm above the norm: the norm pass runs over all three dtypes, nothing is clipped
    opt_f = bk.optim.FusedAdamW(ours_p, lr=0.01, amsgrad=True, max_grad_norm=1e3)
    opt_t = torch.optim.AdamW(theirs_p, lr=0.01, amsgrad=True, fused=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        for p, q in zip(ours_p, theirs_p):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.cat([q.grad.double().flatten() for q in theirs_p]).norm()
        opt_f.step()
        opt_t.step()
        assert_close(opt_f.last_grad_norm, norm, rtol=1e-6, atol=0, what="global norm over fp64+fp32+bf16")
    assert ours_p[0].dtype == torch.float64 and opt_f.state[ours_p[0]]["exp_avg"].dtype == torch.float64
    assert_close(ours_p[0], theirs_p[0], rtol=1e-12, atol=1e-14, what="fp64")
    assert_close(ours_p[1], theirs_p[1], rtol=1e-5, atol=1e-6, what="fp32")
    assert_close(ours_p[2], theirs_p[2], rtol=1e-2, atol=1e-2, what="bf16")


# ----- a failed step leaves nothing behind -----------------------------------------------------------
def test_failed_step_creates_no_state_and_changes_nothing():
    dense, emb = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    for opt in (bk.optim.FusedAdamW([dense, emb]), bk.optim.FusedSGD([dense, emb], momentum=0.9)):
        dense.grad, emb.grad = torch.randn(4), torch.randn(5, 3, dtype=torch.float64).to_sparse()
        before = [dense.detach().clone(), emb.detach().clone()]
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
        assert torch.equal(dense, before[0]) and torch.equal(emb, before[1])
        emb.grad = None
        # hyperparameters made invalid after construction: torch's constructor error, before any state
        opt.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
            opt.step()
        assert len(opt.state) == 0 and torch.equal(dense, before[0])
        opt.param_groups[0]["lr"] = 1e-3
        opt.step()
        assert len(opt.state) == 1 and not torch.equal(dense, before[0])


def test_pickle_and_deepcopy_keep_working():
    params = [torch.nn.Parameter(p) for p in _params(torch.float32, seed=5)]
    opt = bk.optim.FusedAdamW(params, lr=0.01, max_grad_norm=0.5)
    _steps([(params, opt)], steps=2)
    twin = copy.deepcopy(opt)  # deep-copies the params with it
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert twin.max_grad_norm == 0.5 and pickle.loads(pickle.dumps(opt)).max_grad_norm == 0.5
    _steps([(params, opt), (twin_params, twin)], steps=3)
    _close(twin_params, params, torch.float32, "deepcopy")


# ----- torch.compile ---------------------------------------------------------------------------------
def _compiled_run(cls, kw, steps=4, fullgraph=False, backend=None, dtype=torch.float32):
    """(compiled params, eager params, graph-break count, frames compiled) after ``steps`` steps."""
    gc.collect()  # no pruned model of an earlier test may die mid-run (the mask hook's guard would re-trace)
    torch._dynamo.reset()
    counters.clear()
    ours_p, eager_p = _pair(_params(dtype, seed=6, shapes=[(5, 7), (3,), (2, 2, 3)]))
    opt, eager = cls(ours_p, **copy.deepcopy(kw)), cls(eager_p, **copy.deepcopy(kw))
    cc = CompileCounter()
    step = torch.compile(opt.step, backend=backend or cc, fullgraph=fullgraph)
    gen = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's notes on lru_cache / static addresses
        for _ in range(steps):
            for p, q in zip(ours_p, eager_p):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                p.grad, q.grad = g.clone(), g.clone()
            step()
            eager.step()
    return ours_p, eager_p, sum(counters["graph_break"].values()), cc.frame_count


def test_compile_has_no_graph_break_in_our_step():
    # torch.optim.AdamW's own step breaks the graph on purpose (_use_grad_for_differentiable)
    _, _, torch_breaks, _ = _compiled_run(torch.optim.AdamW, dict(lr=0.01))
    assert torch_breaks >= 1
    cases = [(bk.optim.FusedAdamW, dict(lr=0.01, amsgrad=True, max_grad_norm=0.3), 1),
             (bk.optim.FusedSGD, dict(lr=0.01, momentum=0.9, dampening=0.2), 2),  # re-traced after the
             # first step (momentum buffers appear), as torch's SGD is
             (bk.optim.FusedAdam, dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99))), 1)]
    # (counted with fullgraph=False: with fullgraph=True Dynamo may capture what would break instead)
    for cls, kw, frames in cases:
        ours, eager, breaks, n_frames = _compiled_run(cls, kw)
        assert breaks == 0 and n_frames == frames, (cls.__name__, breaks, n_frames)
        _close(ours, eager, torch.float32, f"compiled {cls.__name__}")
    ours, eager, breaks, _ = _compiled_run(bk.optim.FusedAdamW, dict(lr=0.01), dtype=torch.float64)
    assert breaks == 0
    _close(ours, eager, torch.float64, "compiled fp64")


def test_compile_through_aot_autograd_matches_torch():
    """The traced step with its mutating ops through AOTAutograd's functionalization."""
    ours, _, breaks, _ = _compiled_run(bk.optim.FusedAdamW, dict(lr=0.01, max_grad_norm=0.5), steps=3,
                                       fullgraph=True, backend="aot_eager")
    theirs = [torch.nn.Parameter(p) for p in _params(torch.float32, seed=6, shapes=[(5, 7), (3,), (2, 2, 3)])]
    opt = torch.optim.AdamW(theirs, lr=0.01)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p in theirs:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).float()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        opt.step()
    assert breaks == 0
    _close(ours, theirs, torch.float32, "aot_eager FusedAdamW vs torch AdamW + clip_grad_norm_")


def test_compile_follows_new_pruning_masks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    bk.prune_(model, sparsity=0.5, filter_fn=lambda mod, fqn: True)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=0.05)
    cc = CompileCounter()
    step = torch.compile(opt.step, backend=cc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(4):
            model(torch.randn(4, 16)).square().sum().backward()
            step()
            opt.zero_grad()
            if i == 1:
                bk.prune_(model, sparsity=0.75, filter_fn=lambda mod, fqn: True)  # new mask tensors
    for layer in (model[0], model[2]):
        assert abs(1 - layer.weight_mask.float().mean().item() - 0.75) < 0.02
        assert int(((layer.weight != 0) & ~layer.weight_mask).sum()) == 0
    assert cc.frame_count >= 2  # re-traced for the new masks
