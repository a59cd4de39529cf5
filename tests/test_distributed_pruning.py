"""Pruning masks under FSDP2 (2 CPU ranks, gloo): prune_ before or after ``fully_shard``, masks
placed like their sharded weights (cached shards), global scores on sharded weights, training with
FusedAdamW (in-step masks) and torch's AdamW (post-step hook) equal to torch's AdamW on FSDP2,
and no step leaving a pruned weight non-zero, even one that raises.

The bodies run in the session's two worker ranks (``dist_workers``, tests/_dist.py) and assert
there; the model, data and training helpers are tests/test_optim_distributed.py's."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bigkernels as bk
from bigkernels import distributed as bkd
from bigkernels.sparse import mask_registry
from test_optim_distributed import CLIP, LR, STEPS, _fsdp, _full, _full_params, _loss, _max_rel_diff, _mesh, _model

SPARSITY = 0.5


def _linears(model: nn.Module) -> dict:
    return {n.replace("module.", ""): m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _full_masks(model: nn.Module) -> dict:
    return {n: _full(m.weight_mask) for n, m in _linears(model).items() if getattr(m, "weight_mask", None) is not None}


def _assert_pruned_zero(model: nn.Module, what: str) -> None:
    for n, m in _linears(model).items():
        k = getattr(m, "weight_mask", None)
        if k is None:
            continue
        w, mask = bkd.local(m.weight), bkd.local(bkd.mask_like_weight(m))
        bad = int((w[~mask] != 0).sum())
        assert bad == 0, f"{what}: {n}: {bad} pruned weights are non-zero on rank {dist.get_rank()}"


def _run(model: nn.Module, opt, steps: int = STEPS, clip_by_torch: bool = False) -> list:
    norms = []
    for s in range(steps):
        _loss(model, s).backward()
        if clip_by_torch:
            norms.append(float(_full(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))))
        opt.step()
        if not clip_by_torch:
            norms.append(float(opt.last_grad_norm))
        opt.zero_grad(set_to_none=True)
        _assert_pruned_zero(model, f"step {s}")
    return norms


def torch_reference(build, train) -> tuple:
    """The reference of the training tests: ``build()`` (an FSDP2 model) trained by ``train(model,
    optimizer)`` with torch.optim.AdamW (for-each) -> (its full params, its norms, the bound): as
    close to it as torch's own fused AdamW is (DESIGN.md: inside a training loop, rounding
    compounds), twice that plus 1e-6."""
    ref = build()
    norms = train(ref, torch.optim.AdamW(ref.parameters(), lr=LR, foreach=True))
    expected = _full_params(ref)
    torch_fused = build()
    train(torch_fused, torch.optim.AdamW(torch_fused.parameters(), lr=LR, fused=True))
    return expected, norms, 2 * _max_rel_diff(_full_params(torch_fused), expected) + 1e-6


def _pruned(when: str, mesh, ddp: bool = False) -> nn.Module:
    model = _model()
    if when == "before":
        bk.prune_(model, SPARSITY)
    if ddp:
        return nn.parallel.DistributedDataParallel(model)
    model = _fsdp(model, mesh)
    if when == "after":
        bk.prune_(model, SPARSITY)
    return model


# ----- training ---------------------------------------------------------------------------------------
def _training_body():
    mesh = _mesh()
    # reference: torch.optim.AdamW (for-each) on FSDP2 + clip_grad_norm_, masks from prune_ before sharding
    # (re-applied by the post-step hook on the local shards)
    expected, ref_norms, bound = torch_reference(lambda: _pruned("before", mesh),
                                                 lambda m, opt: _run(m, opt, clip_by_torch=True))

    # masks made before and after sharding are the same masks (scores of the whole weight)
    after = _pruned("after", mesh)
    masks_before, masks_after = _full_masks(_pruned("before", mesh)), _full_masks(after)
    assert masks_before.keys() == masks_after.keys() and len(masks_before) == 8, sorted(masks_before)
    for n in masks_before:
        assert torch.equal(masks_before[n], masks_after[n]), n
        assert int((~masks_after[n]).sum()) == round(SPARSITY * masks_after[n].numel()), n
    for m in _linears(after).values():
        if getattr(m, "weight_mask", None) is not None:
            assert bkd.placed_like(m.weight_mask, m.weight), "a mask made after sharding is sharded like its weight"

    diffs = {}
    for what, model in (("FusedAdamW, prune_ after fully_shard", after),
                        ("FusedAdamW, prune_ before fully_shard", _pruned("before", mesh)),
                        ("FusedAdamW, DDP", _pruned("before", mesh, ddp=True))):
        opt = bk.optim.FusedAdamW(model.parameters(), lr=LR, max_grad_norm=CLIP)
        norms = _run(model, opt)
        assert opt._masks_in_step, f"{what}: the fused step should apply the masks itself"
        assert mask_registry._PLANS[opt][2] == [], f"{what}: the post-step hook should leave them to the step"
        for s, (a, b) in enumerate(zip(norms, ref_norms)):
            assert abs(a - b) <= 2e-6 * b, f"{what} step {s}: global norm {a!r} vs clip_grad_norm_'s {b!r}"
        diffs[what] = _max_rel_diff(_full_params(model), expected)
    # torch's AdamW with masks made after sharding: the post-step hook on local shards
    hooked = _pruned("after", mesh)
    _run(hooked, torch.optim.AdamW(hooked.parameters(), lr=LR, foreach=True), clip_by_torch=True)
    diffs["torch AdamW, prune_ after fully_shard"] = _max_rel_diff(_full_params(hooked), expected)
    assert all(d <= bound for d in diffs.values()), (diffs, bound)
    return diffs, bound


def test_fsdp2_pruned_training_matches_torch_adamw_on_fsdp2(dist_workers):
    """10 steps of a small GPT pruned 50% (prune_ before or after fully_shard; DDP too):
    FusedAdamW(max_grad_norm) and torch's AdamW (hook) vs torch's AdamW + clip_grad_norm_ on FSDP2,
    as close as torch's fused AdamW is to it; pruned weights stay zero after every step."""
    results = dist_workers.run(_training_body)
    assert results[0] == results[1]


# ----- masks: global scores, every pattern, Wanda over every rank's data, the shard cache -----------------
def _calibration(rank: int):
    g = torch.Generator().manual_seed(77 + rank)
    return [torch.randint(0, 97, (2, 16), generator=g) for _ in range(2)]


def _masks_body():
    mesh = _mesh()
    rank = dist.get_rank()
    cases = [dict(sparsity=0.6), dict(pattern="2:4"), dict(sparsity=0.5, pattern="block", block_size=8),
             dict(sparsity=0.7, scope="global")]
    for kw in cases:
        plain = bk.prune_(_model(), **kw)
        sharded = bk.prune_(_fsdp(_model(), mesh), **kw)
        want, got = _full_masks(plain), _full_masks(sharded)
        assert want.keys() == got.keys() and want, kw
        for n in want:
            assert torch.equal(want[n], got[n]), (kw, n)
            assert torch.equal(_full(_linears(sharded)[n].weight) != 0, want[n] & (_full(_linears(plain)[n].weight) != 0)), (kw, n)
    # Wanda: each rank calibrates on its own data; the sharded masks are the unsharded layer's on both ranks' data
    plain = bk.prune_(_model(), 0.5, method="wanda", calibration_data=_calibration(0) + _calibration(1))
    sharded = bk.prune_(_fsdp(_model(), mesh), 0.5, method="wanda", calibration_data=_calibration(rank))
    want, got = _full_masks(plain), _full_masks(sharded)
    for n in want:
        assert torch.equal(want[n], got[n]), ("wanda", n)

    # HSDP (a 2-D mesh: replicated over dim 0, sharded over dim 1): masks made before and after sharding
    from torch.distributed.device_mesh import init_device_mesh

    hsdp = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    want = _full_masks(bk.prune_(_model(), 0.5))
    for model in (_fsdp(bk.prune_(_model(), 0.5), hsdp), bk.prune_(_fsdp(_model(), hsdp), 0.5)):
        got = _full_masks(model)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
        for make in (lambda ps: torch.optim.AdamW(ps, lr=LR), lambda ps: bk.optim.FusedAdamW(ps, lr=LR)):
            opt = make(model.parameters())
            _loss(model, 0).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _assert_pruned_zero(model, f"HSDP {type(opt).__name__}")

    # tensor-parallel weights (Shard(0) colwise, Shard(1) rowwise), pruned before or after splitting
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def mlp():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    want = {n: m.weight_mask.clone() for n, m in bk.prune_(mlp(), 0.5, filter_fn=lambda m, n: True).named_children()
            if isinstance(m, nn.Linear)}
    for model in (parallelize_module(bk.prune_(mlp(), 0.5, filter_fn=lambda m, n: True), mesh, plan),
                  bk.prune_(parallelize_module(mlp(), mesh, plan), 0.5, filter_fn=lambda m, n: True)):
        assert all(torch.equal(_full(model.get_submodule(n).weight_mask), k) for n, k in want.items())
        opt = bk.optim.FusedAdamW(model.parameters(), lr=LR)
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        opt.step()
        for n, k in want.items():
            assert not bool((_full(model.get_submodule(n).weight)[~k] != 0).any()), ("TP", n)

    # a mask made before sharding: split once per mask version, then reused
    model = _fsdp(bk.prune_(_model(), 0.5), mesh)
    layer = next(m for m in _linears(model).values() if getattr(m, "weight_mask", None) is not None)
    first = bkd.mask_like_weight(layer)
    assert bkd.placed_like(first, layer.weight) and not bkd.is_dtensor(layer.weight_mask)
    assert bkd.mask_like_weight(layer) is first, "the shard should be cached"
    layer.weight_mask[0, :] = False  # an in-place change: a new version
    second = bkd.mask_like_weight(layer)
    assert second is not first and not bool(second.full_tensor()[0].any())
    bk.prune_(model, 0.75)  # new masks (sharded now), ANDed with the old ones
    assert bkd.placed_like(layer.weight_mask, layer.weight) and bkd.mask_like_weight(layer) is layer.weight_mask
    assert not bool(_full(layer.weight_mask)[0].any())

    # GradualPruner on FSDP2 with FusedAdamW: exact sparsity at the end, zeros kept
    model = _fsdp(_model(), mesh)
    pruner = bk.sparse.GradualPruner(model, 0.8, start_step=0, end_step=4, every=2)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=LR)
    for s in range(6):
        _loss(model, s).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.step()
        _assert_pruned_zero(model, f"GradualPruner step {s}")
    for n, k in _full_masks(model).items():
        assert int((~k).sum()) == round(0.8 * k.numel()), n
    return True


def test_masks_follow_sharded_weights(dist_workers):
    """prune_ on sharded weights gives the unsharded masks (unstructured, 2:4, block, global scope;
    Wanda over every rank's calibration data; HSDP's 2-D mesh; tensor-parallel weights), exact sparsity; a mask made before
    sharding is split once per version; GradualPruner under FSDP2."""
    dist_workers.run(_masks_body)


# ----- a step that raises writes nothing ------------------------------------------------------------------
def _raising_body():
    mesh = _mesh()
    messages = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=LR), lambda ps: bk.optim.FusedAdamW(ps, lr=LR)):
        model = _fsdp(bk.prune_(_model(), 0.5), mesh)
        opt = make(model.parameters())
        layer = next(m for m in _linears(model).values() if getattr(m, "weight_mask", None) is not None)
        good = layer.weight_mask
        layer.weight_mask = torch.ones(3, 5, dtype=torch.bool)  # cannot serve its weight
        _loss(model, 0).backward()
        before = _full_params(model)
        try:
            opt.step()
        except ValueError as e:
            messages.append(str(e))
        else:
            raise AssertionError(f"{type(opt).__name__}: a mask of the wrong shape should raise")
        assert _max_rel_diff(_full_params(model), before) == 0.0, f"{type(opt).__name__}: the failed step wrote"
        assert not opt.state, f"{type(opt).__name__}: the failed step left state"
        layer.weight_mask = good
        opt.step()
        _assert_pruned_zero(model, type(opt).__name__)
    assert "weight_mask has shape (3, 5)" in messages[0] and "weight_mask has shape (3, 5)" in messages[1], messages
    return messages


def test_a_step_with_a_bad_mask_raises_before_writing(dist_workers):
    """torch's AdamW (pre-step hook) and FusedAdamW (in-step masks) refuse a mask that cannot
    serve its sharded weight before the update: params and state untouched."""
    dist_workers.run(_raising_body)


# ----- Hugging Face GPT-2 (Conv1D: transposed weights) ------------------------------------------------------
def _hf_body():
    mesh = _mesh()
    plain = bk.prune_(_model(kind="hf-gpt2"), 0.5)
    before = _fsdp(bk.prune_(_model(kind="hf-gpt2"), 0.5), mesh)
    after = bk.prune_(_fsdp(_model(kind="hf-gpt2"), mesh), 0.5)
    masks = {n: _full(m.weight_mask) for n, m in plain.named_modules() if getattr(m, "weight_mask", None) is not None}
    assert len(masks) == 8, sorted(masks)  # c_attn, c_proj, c_fc, mlp.c_proj of 2 blocks; the tied head is left alone
    for model in (before, after):
        got = {n: _full(m.weight_mask) for n, m in model.named_modules() if getattr(m, "weight_mask", None) is not None}
        assert got.keys() == masks.keys() and all(torch.equal(got[n], masks[n]) for n in masks)
        opt = bk.optim.FusedAdamW(model.parameters(), lr=LR, max_grad_norm=CLIP)
        for s in range(3):
            _loss(model, s).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for n, m in model.named_modules():
            if getattr(m, "weight_mask", None) is not None:
                assert not bool((_full(m.weight)[~masks[n]] != 0).any()), n
    return True


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_gpt2_conv1d_pruned_before_or_after_fully_shard(dist_workers):
    """GPT-2's Conv1D layers (weights stored [in, out]) pruned before or after fully_shard get the
    unsharded model's masks, and FusedAdamW keeps their zeros."""
    dist_workers.run(_hf_body)
