"""FusedRMSprop / FusedAdafactor against torch.optim.RMSprop / Adafactor, FusedLion against the
plain-PyTorch Lion of bigkernels.reference.optim: torch's own ``optim_db`` configurations (results,
state_dict layout, error inputs), signatures, flag keywords, state_dict round trips both ways,
LR schedulers, GradScaler, max_grad_norm, prune_ masks, bf16, named parameters and torch.compile."""
from __future__ import annotations

import copy
import gc
import inspect
import io
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
from bigkernels.reference.optim import Lion
from conftest import assert_close
from test_optim_torch_compat import TOL, _close, _pair, _same_state_layout, _steps
from test_optim_torch_compat import _params as _params_base

OURS = {torch.optim.RMSprop: bk.optim.FusedRMSprop, torch.optim.Adafactor: bk.optim.FusedAdafactor}
INFOS = [info for info in optim_db if info.optim_cls in OURS]
# torch's Adafactor divides by a param's size (it cannot step an empty param): no (0, 4) there.
SHAPES = {torch.optim.RMSprop: [(5, 13, 17), (17,), (1,), (0, 4), (3, 7)],
          torch.optim.Adafactor: [(5, 13, 17), (17,), (1,), (3, 7), (2, 3, 4, 5), ()]}


def _params(dtype, shapes, seed=0):
    return _params_base(dtype, seed=seed, shapes=shapes)


# ----- torch's optim_db: every configuration -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.optim_cls.__name__)
def test_optim_db_configs_match_torch(info, dtype):
    torch_cls, ours_cls = info.optim_cls, OURS[info.optim_cls]
    configs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, info)
    configs += [type(c)(params=None, kwargs=dict(c.kwargs, foreach=True), desc=f"{c.desc} & foreach")
                for c in info.optim_inputs_func("cpu") if "capturable" not in c.kwargs]
    ran = 0
    for config in configs:
        kw = config.kwargs
        if kw.get("capturable"):
            continue  # torch's capturable configs are CUDA-only
        ours_p, theirs_p = _pair(_params(dtype, SHAPES[torch_cls]))
        if kw.get("differentiable"):
            with pytest.raises(RuntimeError, match="differentiable"):
                ours_cls(ours_p, **copy.deepcopy(kw))
            continue
        opt_f = ours_cls(ours_p, **copy.deepcopy(kw))
        opt_t = torch_cls(theirs_p, **copy.deepcopy(kw))
        _steps([(theirs_p, opt_t), (ours_p, opt_f)], steps=8, none_every=3)
        _close(ours_p, theirs_p, dtype, f"{torch_cls.__name__} {config.desc}")
        _same_state_layout(opt_f, opt_t, config.desc)
        ran += 1
    assert ran >= 8


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.optim_cls.__name__)
def test_optim_db_error_inputs_raise_like_torch(info):
    torch_cls, ours_cls = info.optim_cls, OURS[info.optim_cls]
    errors = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert len(errors) >= 6
    for err in errors:
        given = err.optimizer_error_input
        for cls in (torch_cls, ours_cls):
            params, kw = copy.deepcopy(given.params), copy.deepcopy(given.kwargs)
            expect = pytest.warns if issubclass(err.error_type, Warning) else pytest.raises
            with expect(err.error_type, match=err.error_regex):
                opt = cls(params, **kw)
                if err.error_on == OptimizerErrorEnum.STEP_ERROR:
                    opt.step()


@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
def test_signature_is_torchs_plus_max_grad_norm(torch_cls):
    theirs = inspect.signature(torch_cls).parameters
    ours = inspect.signature(OURS[torch_cls]).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert [k for k in ours if k not in theirs] == ["max_grad_norm"]
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name


@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
def test_every_flag_keyword(torch_cls):
    """Each bool / None-default keyword of torch's signature, both values: torch's results."""
    base = dict(momentum=0.5, weight_decay=0.1) if torch_cls is torch.optim.RMSprop else dict(weight_decay=0.1)
    flags = [n for n, p in inspect.signature(torch_cls).parameters.items()
             if (p.default is False or p.default is None) and n != "params"]
    assert {"foreach", "maximize"} <= set(flags)
    for name in flags:
        for value in (True, False):
            kw = dict(base, **{name: value})
            ours_p, theirs_p = _pair(_params(torch.float32, SHAPES[torch_cls], seed=3))
            if name == "differentiable" and value:
                with pytest.raises(RuntimeError, match="differentiable=True"):
                    OURS[torch_cls](ours_p, **kw)
                continue
            opt_f = OURS[torch_cls](ours_p, **kw)
            opt_t = torch_cls(theirs_p, **dict(kw, capturable=False) if name == "capturable" else kw)
            _steps([(theirs_p, opt_t), (ours_p, opt_f)], steps=5)
            _close(ours_p, theirs_p, torch.float32, f"{torch_cls.__name__} {name}={value}")
            assert opt_f.param_groups[0][name] == value


# ----- Lion: the formula, against the plain-PyTorch optimizer ---------------------------------------
@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("kw", [dict(), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.5),
                                dict(lr=1e-3, weight_decay=0.1, maximize=True)], ids=["default", "wd", "maximize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lion_matches_the_formula(kw, dtype, foreach):
    ours_p, theirs_p = _pair(_params(dtype, SHAPES[torch.optim.Adafactor], seed=4))
    opt_f, opt_t = bk.optim.FusedLion(ours_p, **kw), Lion(theirs_p, foreach=foreach, **kw)
    _steps([(theirs_p, opt_t), (ours_p, opt_f)], steps=10, none_every=4)
    _close(ours_p, theirs_p, dtype, f"Lion {kw}")
    for p, q in zip(ours_p, theirs_p):
        assert_close(opt_f.state[p]["exp_avg"], opt_t.state[q]["exp_avg"], what="exp_avg", **TOL[dtype])
    assert set(opt_f.state_dict()["state"][0]) == {"exp_avg"}


def test_lion_errors_and_signature():
    p = [torch.nn.Parameter(torch.randn(3))]
    sig = inspect.signature(bk.optim.FusedLion).parameters
    assert [(n, v.default) for n, v in sig.items()][:4] == [("params", inspect.Parameter.empty), ("lr", 1e-4),
                                                            ("betas", (0.9, 0.99)), ("weight_decay", 0.0)]
    assert sig["maximize"].kind is inspect.Parameter.KEYWORD_ONLY and sig["maximize"].default is False
    for kw, msg in ((dict(lr=-1.0), "learning rate"), (dict(betas=(1.5, 0.9)), "beta parameter at index 0"),
                    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"), (dict(weight_decay=-1.0), "weight_decay"),
                    (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"), (dict(max_grad_norm=0.0), "max_grad_norm")):
        with pytest.raises(ValueError, match=msg):
            bk.optim.FusedLion(p, **kw)
    with pytest.raises(ValueError, match="complex"):
        bk.optim.FusedLion([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


# ----- training-loop features ------------------------------------------------------------------------
def _make(kind, params, fused_kw=None, **kw):
    base = {"rmsprop": dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=0.01),
            "adafactor": dict(lr=1e-2, weight_decay=0.01), "lion": dict(lr=1e-3, weight_decay=0.1)}[kind]
    cls = {"rmsprop": (torch.optim.RMSprop, bk.optim.FusedRMSprop), "adafactor": (torch.optim.Adafactor,
           bk.optim.FusedAdafactor), "lion": (Lion, bk.optim.FusedLion)}[kind]
    return cls[0](params[0], **base, **kw), cls[1](params[1], **base, **kw, **(fused_kw or {}))


KINDS = ["rmsprop", "adafactor", "lion"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_round_trip(kind, direction):
    base = _params(torch.float32, SHAPES[torch.optim.Adafactor], seed=5)
    a, b = _pair(base)
    opt_t, opt_f = _make(kind, (a, b))
    first, params = (opt_t, a) if direction == "torch_to_fused" else (opt_f, b)
    _steps([(params, first)], steps=4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only=True: tensors and numbers only
    same, other = _pair(ckpt["params"])
    opt_t2, opt_f2 = _make(kind, (same, other))
    (opt_t2 if first is opt_t else opt_f2).load_state_dict(copy.deepcopy(ckpt["opt"]))
    (opt_f2 if first is opt_t else opt_t2).load_state_dict(copy.deepcopy(ckpt["opt"]))
    _steps([(same, opt_t2), (other, opt_f2)], steps=4, seed=2)
    _close(other, same, torch.float32, f"{kind} {direction}")


@pytest.mark.parametrize("kind", KINDS)
def test_lr_scheduler(kind):
    a, b = _pair(_params(torch.float32, SHAPES[torch.optim.Adafactor], seed=6))
    opt_t, opt_f = _make(kind, (a, b))
    sch = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12, cycle_momentum=kind != "adafactor")
           for o in (opt_t, opt_f)]
    for _ in range(10):
        _steps([(a, opt_t), (b, opt_f)], steps=1, seed=len(sch))
        for s in sch:
            s.step()
    assert opt_f.param_groups[0]["lr"] == opt_t.param_groups[0]["lr"]
    _close(b, a, torch.float32, f"{kind} scheduled")


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_skips_inf_steps_like_torch(kind):
    models = [_model(0), _model(0)]
    opts = _make(kind, [m.parameters() for m in models])
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in models]
    torch.manual_seed(5)
    for step in range(6):
        x = torch.randn(4, 8)
        if step == 3:
            x[0, 0] = float("inf")
        for m, o, s in zip(models, opts, scalers):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            before = [p.detach().clone() for p in m.parameters()]
            s.step(o)
            s.update()
            if step == 3:
                assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)), "inf step changed a param"
    _close(list(models[1].parameters()), list(models[0].parameters()), torch.float32, f"{kind} GradScaler")
    assert scalers[0].get_scale() == scalers[1].get_scale()


@pytest.mark.parametrize("kind", KINDS)
def test_max_grad_norm_matches_clip_grad_norm(kind):
    a, b = _pair(_params(torch.float32, SHAPES[torch.optim.Adafactor], seed=7))
    opt_t, opt_f = _make(kind, (a, b), fused_kw=dict(max_grad_norm=0.5))
    torch.manual_seed(9)
    for _ in range(5):
        for x, y in zip(a, b):
            g = torch.randn_like(x) * 3
            x.grad, y.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(a, 0.5)
        opt_t.step()
        opt_f.step()
        assert_close(opt_f.last_grad_norm, norm, rtol=1e-5, atol=0, what="last_grad_norm")
    _close(b, a, torch.float32, f"{kind} clipped")


@pytest.mark.parametrize("kind", KINDS)
def test_prune_masks_in_the_step(kind):
    """prune_'s masks applied inside our step give what torch's optimizer + prune_'s hook give."""
    models = [_model(1), _model(1)]
    for m in models:
        bk.prune_(m, sparsity=0.5, filter_fn=lambda mod, fqn: True)
    opt_t, opt_f = _make(kind, [m.parameters() for m in models])
    torch.manual_seed(3)
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, o in zip(models, (opt_t, opt_f)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert len(opt_f._masks_in_step) == 2  # our ops mask (prune_'s hook skips fused optimizers)
    for layer in (models[1][0], models[1][2]):
        assert int(((layer.weight != 0) & ~layer.weight_mask).sum()) == 0
    _close(list(models[1].parameters()), list(models[0].parameters()), torch.float32, f"{kind} pruned")


@pytest.mark.parametrize("kind", ["rmsprop", "adafactor"])
def test_bf16_params_at_least_as_close_to_fp32_as_torchs_bf16(kind):
    """bf16 params: ours (fp32 maths, one rounding per stored value) end at least as close to the
    fp32 run of torch's optimizer as torch's own bf16 run does (its maths rounds to bf16 per op).
    (Lion has no torch namesake; its bf16 kernels are held to the reference in test_optim_new_ops.)"""
    base = _params(torch.bfloat16, [(64, 33), (33,), (4, 5, 6)], seed=8)
    a, b = _pair(base)
    truth = [torch.nn.Parameter(p.float()) for p in base]
    opt_t, opt_f = _make(kind, (a, b))
    opt_32, _ = _make(kind, (truth, [torch.nn.Parameter(p.clone()) for p in b]))
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        for x, y, z in zip(a, b, truth):
            g = torch.randn(x.shape, generator=gen).bfloat16()
            x.grad, y.grad, z.grad = g.clone(), g.clone(), g.float()
        for o in (opt_t, opt_f, opt_32):
            o.step()
    for i, (x, y, z) in enumerate(zip(a, b, truth)):
        theirs, ours = (x.float() - z).abs().mean().item(), (y.float() - z).abs().mean().item()
        assert ours <= 1.25 * theirs + 1e-4, f"{kind} param {i}: mean error {ours:.3g} vs torch bf16 {theirs:.3g}"


@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
def test_named_parameters(torch_cls):
    m_t, m_f = _model(2), _model(2)
    opt_t, opt_f = torch_cls(m_t.named_parameters(), lr=0.01), OURS[torch_cls](m_f.named_parameters(), lr=0.01)
    for _ in range(3):
        x = torch.randn(4, 8)
        for m, o in ((m_t, opt_t), (m_f, opt_f)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    _close(list(m_f.parameters()), list(m_t.parameters()), torch.float32, "named")
    assert opt_f.state_dict()["param_groups"][0]["param_names"] == opt_t.state_dict()["param_groups"][0]["param_names"]


def test_adafactor_eps1_none_follows_the_groups_first_param():
    """torch takes eps1 = finfo(dtype).eps of the group's first param with a gradient, for the whole
    group: a bf16 first param makes every param of the group use bf16's epsilon."""
    base = [torch.randn(6, 5).bfloat16(), torch.randn(7, 3)]
    a, b = _pair(base)
    opt_t, opt_f = torch.optim.Adafactor(a, lr=0.05), bk.optim.FusedAdafactor(b, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(x.dtype) * 1e-2
            g[0] = 0.0  # rows of zeros: the eps1 clamp decides their update
            x.grad, y.grad = g.clone(), g.clone()
        opt_t.step()
        opt_f.step()
    assert_close(b[1], a[1], rtol=1e-5, atol=1e-6, what="fp32 param with bf16's eps1")
    assert_close(b[0], a[0], rtol=1e-2, atol=1e-3, what="bf16 param")


def test_adafactor_empty_param_counts_the_step_only():
    p = torch.nn.Parameter(torch.randn(0, 5))
    q = torch.nn.Parameter(torch.randn(3, 5))
    opt = bk.optim.FusedAdafactor([p, q])
    p.grad, q.grad = torch.randn(0, 5), torch.randn(3, 5)
    opt.step()
    assert float(opt.state[p]["step"]) == 1.0 and opt.state[p]["col_var"].shape == (1, 5)
    assert torch.equal(opt.state[p]["col_var"], torch.zeros(1, 5))


# ----- torch.compile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_compile_has_no_graph_break(kind):
    # pruned models of earlier tests dying mid-test would flip the mask hook's "anything pruned?"
    # guard and re-trace the step: collect them first
    gc.collect()
    torch._dynamo.reset()
    counters.clear()
    a, b = _pair(_params(torch.float32, [(5, 7), (3,), (2, 2, 3)], seed=9))
    _, opt = _make(kind, (a, b))
    _, eager = _make(kind, (list(a), [torch.nn.Parameter(p.detach().clone()) for p in b]))
    eager_p = eager.param_groups[0]["params"]
    cc = CompileCounter()
    step = torch.compile(opt.step, backend=cc)
    gen = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            for p, q in zip(b, eager_p):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            step()
            eager.step()
    assert sum(counters["graph_break"].values()) == 0 and cc.frame_count == 1
    _close(b, eager_p, torch.float32, f"compiled {kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_compile_with_tensor_lr_runs_the_reference_maths(kind):
    torch._dynamo.reset()
    base = _params(torch.float32, [(5, 7), (3,)], seed=10)
    a, b = _pair(base)
    opt_t, opt_f = _make(kind, (a, b))
    opt_f.param_groups[0]["lr"] = torch.tensor(opt_f.param_groups[0]["lr"])
    step = torch.compile(opt_f.step, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            for x, y in zip(a, b):
                g = torch.randn(x.shape, generator=gen)
                x.grad, y.grad = g.clone(), g.clone()
            opt_t.step()
            step()
    _close(b, a, torch.float32, f"compiled {kind}, tensor lr")
