"""Masks, prune_(), GradualPruner and SparseLinear: exact patterns, zeros kept through training,
the schedule, bad input, and SparseLinear against the dense masked layer (values, gradients,
serialisation, torch.compile)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bigkernels as bk
from bigkernels.nn import SparseLinear
from bigkernels.sparse import masks as M
from conftest import assert_close


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))


def _zeros(model):
    return [float((m.weight == 0).float().mean()) for m in model if isinstance(m, nn.Linear)]


def test_mask_patterns_are_exact():
    torch.manual_seed(0)
    s = torch.rand(64, 128)
    m24 = M.nm_mask(s, 2, 4)
    assert (m24.reshape(64, 32, 4).sum(-1) == 2).all()
    mu = M.unstructured_mask(s, 0.37)
    assert int((~mu).sum()) == round(0.37 * s.numel())
    mb = M.block_mask(s, 0.75, 16)
    blocks = mb.reshape(4, 16, 8, 16).transpose(1, 2).flatten(2)
    assert ((blocks.all(-1)) | (~blocks).all(-1)).all() and int((~blocks.all(-1)).sum()) == round(0.75 * 32)
    g = M.global_unstructured_masks({"a": torch.rand(10, 10), "b": torch.rand(5, 4) * 0.1}, 0.5)
    assert int(sum((~v).sum() for v in g.values())) == 60 and int((~g["b"]).sum()) > 10


def test_wanda_uses_activation_norms():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    x = torch.tensor([[10.0, 10.0, 10.0, 0.0]])  # feature 3 is never active: its large weight goes first
    bk.prune_(lin, sparsity=0.25, method="wanda", calibration_data=[x])
    assert lin.weight[0, 3] == 0 and (lin.weight[0, :3] != 0).all()


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, bk.optim.FusedAdamW], ids=["torch_adamw", "fused_adamw"])
@pytest.mark.parametrize("pattern,kw", [("unstructured", dict(sparsity=0.9)), ("2:4", {}),
                                        ("block", dict(sparsity=0.5, block_size=16))])
def test_pruned_weights_stay_zero_through_training(opt_cls, pattern, kw):
    model = bk.prune_(_model(1), pattern=pattern, **kw)
    masks = [m.weight_mask.clone() for m in model if isinstance(m, nn.Linear)]
    opt = opt_cls(model.parameters(), lr=1e-2)
    for _ in range(100):
        model(torch.randn(8, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for m, mask in zip([m for m in model if isinstance(m, nn.Linear)], masks):
        assert (m.weight[~mask] == 0).all() and (m.weight[mask] != 0).float().mean() > 0.99


@pytest.fixture
def without_post_step_hook(monkeypatch):
    """No global post-step hook re-applying masks (removed, and prune_ may not add it back), so
    only in-step masking remains."""
    from bigkernels.sparse import mask_registry

    if mask_registry._HOOK is not None:
        mask_registry._HOOK.remove()
        mask_registry._HOOK = None
    monkeypatch.setattr(mask_registry, "_ensure_hook", lambda: None)
    yield
    monkeypatch.undo()
    mask_registry._ensure_hook()


def _train(model, opt, steps, pruner=None, seed=0):
    torch.manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if pruner is not None:
            pruner.step()


@pytest.mark.parametrize("opt_cls", [bk.optim.FusedAdamW, bk.optim.FusedAdam, bk.optim.FusedSGD])
def test_fused_optimizers_mask_inside_the_step(opt_cls, without_post_step_hook):
    """No post-step pass at all: the fused kernels alone keep the zeros, with 2:4 and 90% masks."""
    model = bk.prune_(_model(4), pattern="2:4", filter_fn=lambda m, fqn: fqn == "0")
    bk.prune_(model, sparsity=0.9, filter_fn=lambda m, fqn: fqn == "2")
    masks = [m.weight_mask.clone() for m in model if isinstance(m, nn.Linear)]
    kw = dict(momentum=0.9) if opt_cls is bk.optim.FusedSGD else {}
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    _train(model, opt, 100)
    assert opt._masks_in_step == {id(model[0]), id(model[2])}
    for m, mask in zip([m for m in model if isinstance(m, nn.Linear)], masks):
        assert (m.weight[~mask] == 0).all() and (m.weight[mask] != 0).float().mean() > 0.99
    # The same training with torch's AdamW and no hook revives the zeros: the test can fail.
    model = bk.prune_(_model(4), pattern="2:4")
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 3)
    assert (model[0].weight[~model[0].weight_mask] != 0).any()


def test_gradual_pruning_with_fused_adamw_picks_up_new_masks(without_post_step_hook):
    model = _model(5)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=1e-2)
    gp = bk.sparse.GradualPruner(model, final_sparsity=0.75, start_step=5, end_step=45, every=10)
    _train(model, opt, 60, pruner=gp)
    for m in (model[0], model[2]):
        assert (m.weight[~m.weight_mask] == 0).all()
        assert abs(float((~m.weight_mask).float().mean()) - 0.75) < 1e-3


def test_post_step_hook_follows_new_masks_and_only_its_optimizer():
    """torch.optim with GradualPruner: masks made after the first step are kept too; an optimizer
    step re-masks only the weights that optimizer updates."""
    model, other = _model(7), bk.prune_(_model(8), sparsity=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gp = bk.sparse.GradualPruner(model, final_sparsity=0.5, start_step=3, end_step=23, every=5)
    with torch.no_grad():
        other[0].weight[~other[0].weight_mask] = 1.0  # not opt's: must stay as set
    _train(model, opt, 30, pruner=gp)
    for m in (model[0], model[2]):
        assert (m.weight[~m.weight_mask] == 0).all() and float((~m.weight_mask).float().mean()) == 0.5
    assert (other[0].weight[~other[0].weight_mask] == 1.0).all()


def test_in_step_masks_match_torch_adamw_with_the_hook():
    """FusedAdamW masking inside its kernel == torch.optim.AdamW followed by the post-step hook."""
    ours = bk.prune_(_model(6), sparsity=0.5)
    theirs = bk.prune_(_model(6), sparsity=0.5)
    _train(ours, bk.optim.FusedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1), 20)
    _train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1), 20)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-5, what="param after 20 steps")


def test_gradual_pruner_follows_the_cubic_schedule():
    model = _model(2)
    gp = bk.sparse.GradualPruner(model, final_sparsity=0.8, start_step=10, end_step=50, every=10)
    seen = {}
    for t in range(60):
        gp.step()
        seen[t] = _zeros(model)[0]
    for t, want in ((9, 0.0), (20, 0.8 * (1 - (1 - 10 / 40) ** 3)), (40, 0.8 * (1 - (1 - 30 / 40) ** 3)), (59, 0.8)):
        assert abs(seen[t] - want) < 1e-3, (t, seen[t], want)


def test_bad_input_raises_and_changes_nothing():
    model = _model(3)
    before = copy.deepcopy(model.state_dict())
    for kw, msg in ((dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
                    (dict(pattern="3:2"), "0 < N < M"), (dict(pattern="diagonal"), "pattern"),
                    (dict(pattern="block", block_size=48), "block_size"), (dict(method="wanda"), "calibration_data"),
                    (dict(method="random"), "method")):
        with pytest.raises(ValueError, match=msg):
            bk.prune_(model, **kw)
    with pytest.raises(ValueError, match="divisible by 4"):
        bk.prune_(nn.Linear(6, 4), pattern="2:4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_mask") for m in model)


PATTERNS = [("unstructured", dict(sparsity=0.9)), ("2:4", {}), ("block", dict(sparsity=0.75, block_size=16))]


@pytest.mark.parametrize("pattern,kw", PATTERNS)
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 128), (1, 128), (0, 128)])
def test_sparse_linear_matches_the_masked_dense_layer(pattern, kw, shape):
    lin = bk.prune_(nn.Linear(128, 64), pattern=pattern, **kw)
    sl = SparseLinear.from_linear(lin, pattern=pattern, block_size=kw.get("block_size", 64))
    x = torch.randn(shape)
    assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5, what=f"{pattern} output")
    assert torch.equal(sl.weight, lin.weight.detach())


@pytest.mark.parametrize("pattern,kw", PATTERNS)
def test_sparse_linear_gradients_and_round_trip(pattern, kw):
    lin = bk.prune_(nn.Linear(128, 64), pattern=pattern, **kw)
    sl = SparseLinear.from_linear(lin, pattern=pattern, block_size=kw.get("block_size", 64))
    x = torch.randn(6, 128, requires_grad=True)
    g = torch.randn(6, 64)
    sl(x).backward(g)
    xd = x.detach().clone().requires_grad_()
    w = lin.weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(xd, w, lin.bias.detach()).backward(g)
    assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-5, what="grad x")
    values = {"unstructured": "values", "block": "blocks", "2:4": "values"}[pattern]
    stored = getattr(sl, values).grad
    assert stored is not None and stored.shape == getattr(sl, values).shape
    # the stored non-zeros' gradient is the dense gradient at their positions
    probe = copy.deepcopy(sl)
    with torch.no_grad():
        getattr(probe, values).copy_(stored)
    assert_close(probe.weight * lin.weight_mask, w.grad * lin.weight_mask, rtol=1e-5, atol=1e-5, what="grad W")
    buf = io.BytesIO()
    torch.save(sl.state_dict(), buf)
    buf.seek(0)
    fresh = SparseLinear.from_linear(bk.prune_(nn.Linear(128, 64), pattern=pattern, **kw), pattern=pattern,
                                     block_size=kw.get("block_size", 64))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x.detach()), sl(x.detach()))
    torch._dynamo.reset()
    compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x.detach()), sl(x.detach()), rtol=1e-6, atol=1e-6, what="compiled")


def test_sparse_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="more than 2"):
        SparseLinear.from_linear(nn.Linear(8, 4), pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear.from_linear(nn.Linear(8, 4), pattern="4:8")
    sl = SparseLinear.from_linear(bk.prune_(nn.Linear(8, 4), pattern="2:4"), pattern="2:4")
    with pytest.raises(ValueError, match="in_features=8"):
        sl(torch.randn(2, 6))


@pytest.mark.parametrize("pattern,kw", PATTERNS)
def test_sparse_linear_bf16_and_safetensors(pattern, kw):
    lin = bk.prune_(nn.Linear(128, 64), pattern=pattern, **kw).to(torch.bfloat16)
    sl = SparseLinear.from_linear(lin, pattern=pattern, block_size=kw.get("block_size", 64))
    x = torch.randn(7, 128)
    ref32 = torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float())
    ref16 = lin(x.bfloat16()).float()
    got = sl(x.bfloat16())
    assert got.dtype == torch.bfloat16
    own = (ref16 - ref32).abs().max().item()
    assert (got.float() - ref32).abs().max().item() <= 2 * own + 1e-6
    safetensors = pytest.importorskip("safetensors.torch")
    fresh = SparseLinear.from_linear(bk.prune_(nn.Linear(128, 64), pattern=pattern, **kw).to(torch.bfloat16),
                                     pattern=pattern, block_size=kw.get("block_size", 64))
    fresh.load_state_dict(safetensors.load(safetensors.save(sl.state_dict())))
    assert torch.equal(fresh(x.bfloat16()), got)


# ----- prune_ defaults, sparsify_ per recorded pattern, shapes that do not fit, errors naming layers
class _LM(nn.Module):
    """Embedding -> two numbered blocks -> head projecting back onto the vocabulary (untied)."""

    def __init__(self, d=32, vocab=40, hidden=48, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                    for _ in range(2))
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@pytest.mark.parametrize("tied", [False, True])
def test_prune_leaves_the_output_head_and_embeddings_alone(tied, caplog):
    torch.manual_seed(0)
    model = _LM(tied=tied)
    emb = model.emb.weight.detach().clone()
    with caplog.at_level("INFO", logger="bigkernels"):
        bk.prune_(model, sparsity=0.5)
    why = "output head: tied to an embedding" if tied else "output head: projects onto an embedding's vocabulary"
    assert f"prune_: 4 layers -> pruned (unstructured 50%, magnitude)" in caplog.text and f"head ({why})" in caplog.text
    assert not hasattr(model.head, "weight_mask") and torch.equal(model.emb.weight, emb)
    assert all(hasattr(b[0], "weight_mask") and hasattr(b[2], "weight_mask") for b in model.blocks)
    # filter_fn overrides (a tied head then prunes the embedding it shares its weight with)
    bk.prune_(model, sparsity=0.5, filter_fn=lambda m, fqn: fqn == "head")
    assert hasattr(model.head, "weight_mask") and (model.emb.weight == 0).float().mean() == (0.5 if tied else 0.0)


def test_sparsify_uses_the_pattern_prune_recorded_per_layer():
    torch.manual_seed(1)
    model = _LM(d=32, hidden=64)
    bk.prune_(model, sparsity=0.5)  # unstructured everywhere, then two layers in other patterns
    bk.prune_(model, pattern="2:4", filter_fn=lambda m, fqn: fqn == "blocks.0.0")
    bk.prune_(model, sparsity=0.5, pattern="block", block_size=16, filter_fn=lambda m, fqn: fqn == "blocks.1.2")
    bk.prune_(model, pattern="1:4", filter_fn=lambda m, fqn: fqn == "blocks.1.0")  # fits 2:4 storage
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        ref = model(ids)
        bk.sparse.sparsify_(model)
    got = {fqn: (m.pattern, m.block_size) for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert got == {"blocks.0.0": ("2:4", 64), "blocks.0.2": ("unstructured", 64), "blocks.1.0": ("2:4", 64),
                   "blocks.1.2": ("block", 16)}
    assert type(model.head) is nn.Linear
    with torch.no_grad():
        assert_close(model(ids), ref, rtol=1e-5, atol=1e-5, what="sparsified model")
    assert M.sparse_format("4:8") == "unstructured" and M.sparse_format("2:8") == "2:4"


def test_sparsify_errors_name_the_layer_and_change_nothing():
    model = bk.prune_(_model(1), sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsify_: cannot store 0: more than 2 non-zeros in a group of 4 inputs "
                                         r"\(pruned with pattern 'unstructured'\)"):
        bk.sparse.sparsify_(model, pattern="2:4")
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    lin = nn.Linear(8, 8)
    lin.register_buffer("weight_mask", torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="1: it has a weight_mask but no pattern recorded by prune_"):
        bk.sparse.sparsify_(nn.Sequential(nn.ReLU(), lin))
    model64 = bk.prune_(_model(2).double(), sparsity=0.5)
    with pytest.raises(ValueError, match="0: weight dtype float64"):
        bk.sparse.sparsify_(model64)
    with pytest.raises(ValueError, match="itself a linear layer"):
        bk.sparse.sparsify_(bk.prune_(nn.Linear(8, 8), sparsity=0.5))
    with pytest.raises(ValueError, match="pattern must be None"):
        bk.sparse.sparsify_(model, pattern="4:8")
    with pytest.warns(UserWarning, match=r"no pruned layer \(run prune_ first\)"):
        bk.sparse.sparsify_(_model(3))


def test_block_pattern_that_does_not_divide_a_layer_skips_it_with_a_warning():
    # Llama-like FFN: 88 = 5.5 blocks of 16 (Llama-2's 688 with blocks of 64)
    torch.manual_seed(4)
    model = nn.ModuleDict(dict(attn=nn.Linear(32, 32), up=nn.Linear(32, 88), down=nn.Linear(88, 32)))
    with pytest.warns(UserWarning, match=r"prune_: left unpruned.*up \(block_size 16 does not divide the weight shape "
                                         r"\(88, 32\)\); down \(block_size 16"):
        bk.prune_(model, sparsity=0.5, pattern="block", block_size=16)
    assert hasattr(model["attn"], "weight_mask") and not hasattr(model["up"], "weight_mask")
    with pytest.raises(ValueError, match=r"no chosen layer can be pruned.*up: block_size 16"):
        bk.prune_(model, sparsity=0.5, pattern="block", block_size=16, filter_fn=lambda m, fqn: fqn != "attn")
    bk.prune_(model, sparsity=0.5, filter_fn=lambda m, fqn: fqn == "up")  # unstructured, fits any shape
    with pytest.warns(UserWarning, match=r"sparsify_: left as pruned dense layers.*up \(block_size 16 must divide"):
        bk.sparse.sparsify_(model, pattern="block", block_size=16)
    assert isinstance(model["attn"], SparseLinear) and type(model["up"]) is nn.Linear


def test_sparse_linear_empty_and_meta_skeleton_load():
    safetensors = pytest.importorskip("safetensors.torch")
    for pattern, kw in PATTERNS:
        sl = SparseLinear.from_linear(bk.prune_(nn.Linear(128, 64), pattern=pattern, **kw), pattern=pattern,
                                      block_size=kw.get("block_size", 64))
        blob = safetensors.save(sl.state_dict())
        x = torch.randn(3, 128)
        zero = SparseLinear(128, 64, pattern, block_size=kw.get("block_size", 64))  # an all-zero layer
        assert torch.equal(zero.weight, torch.zeros(64, 128)) and torch.equal(zero(x), torch.zeros(3, 64))
        zero.load_state_dict(safetensors.load(blob))
        assert torch.equal(zero(x), sl(x))
        meta = SparseLinear.empty(128, 64, pattern, block_size=kw.get("block_size", 64), device="meta")
        meta.load_state_dict(safetensors.load(blob), assign=True)
        assert all(t.device.type == "cpu" for t in [*meta.parameters(), *meta.buffers()])
        assert torch.equal(meta(x), sl(x))
    # a whole model: prune_ + sparsify_ on a meta-device skeleton, then the state_dict assigned
    model = bk.sparse.sparsify_(bk.prune_(_model(6), pattern="2:4"))
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    bk.sparse.sparsify_(bk.prune_(skeleton, pattern="2:4"))
    skeleton.load_state_dict(safetensors.load(safetensors.save(model.state_dict())), assign=True)
    x = torch.randn(3, 128)
    assert isinstance(skeleton[0], SparseLinear) and torch.equal(skeleton(x), model(x))


def test_gradual_pruner_logs_once_and_checks_shapes_up_front(caplog):
    model = _model(5)
    with pytest.raises(ValueError, match="no chosen layer can be pruned"):
        bk.sparse.GradualPruner(model, 0.5, 0, 10, every=2, pattern="block", block_size=48)
    gp = bk.sparse.GradualPruner(model, 0.5, 0, 10, every=2)
    with caplog.at_level("INFO", logger="bigkernels"):
        for _ in range(12):
            gp.step()
    assert caplog.text.count("GradualPruner: 2 layers -> pruned") == 1
