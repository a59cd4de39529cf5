"""Compressed layers on 2 CPU ranks (gloo): a model with QuantLinear and SparseLinear layers under
FSDP2 (trainable parts sharded and trained, int8 weights and sparse indices kept whole on every
rank) trains like torch's AdamW on FSDP2 and round-trips DCP; QuantLinear under tensor parallelism
(``bk.distributed.ColwiseParallel`` / ``RowwiseParallel`` through ``parallelize_module``) equals
the unsharded layer (w8a16 up to float rounding, w8a8 within its quantisation error), gradients
included.

The bodies run in the session's two worker ranks (``dist_workers``, tests/_dist.py) and assert
there; the model, data and training helpers are tests/test_optim_distributed.py's."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bigkernels as bk
from bigkernels import distributed as bkd
from test_optim_distributed import (CLIP, LR, STEPS, _dcp, _dcp_load, _fsdp, _full, _full_params, _max_rel_diff, _mesh,
                                    _model, _train)
from test_distributed_pruning import torch_reference


# ----- FSDP2 ------------------------------------------------------------------------------------------
def _compressed(seed: int = 0) -> nn.Module:
    """The test GPT with its attention layers int8 (w8a16) and its MLP layers sparse (fc1 2:4,
    fc2 unstructured 50%, stored CSR)."""
    model = _model(seed)
    bk.quantize_(model, mode="w8a16", filter_fn=lambda m, fqn: fqn.endswith(("qkv", "proj")))
    bk.prune_(model, pattern="2:4", filter_fn=lambda m, fqn: fqn.endswith("fc1"))
    bk.prune_(model, 0.5, filter_fn=lambda m, fqn: fqn.endswith("fc2"))
    bk.sparse.sparsify_(model)
    return model


def _fsdp_body():
    from torch.distributed.tensor import DTensor, Shard

    mesh = _mesh()
    expected, ref_norms, bound = torch_reference(lambda: _fsdp(_compressed(), mesh),
                                                 lambda m, opt: _train(m, opt, STEPS, clip_by_torch=True))

    start = _compressed()
    int8_before = {n: b.clone() for n, b in start.named_buffers() if b.dtype == torch.int8}
    ours = _fsdp(start, mesh)
    opt = bk.optim.FusedAdamW(ours.parameters(), lr=LR, max_grad_norm=CLIP)
    norms = _train(ours, opt, STEPS, clip_by_torch=False)
    layers = [m for m in ours.modules() if isinstance(m, (bk.nn.QuantLinear, bk.nn.SparseLinear))]
    assert {type(m).__name__ for m in layers} == {"QuantLinear", "SparseLinear"} and len(layers) == 8
    for m in layers:  # trainable parts sharded; int8 weights, scales and sparse indices whole on every rank
        for n, p in m.named_parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), (type(m).__name__, n)
        for n, b in m.named_buffers():
            assert not isinstance(b, DTensor), (type(m).__name__, n)
    for n, b in ours.named_buffers():
        if b.dtype == torch.int8:
            assert torch.equal(b, int8_before[n]), f"{n}: the frozen int8 weight changed"
    values = [n for n in expected if n.endswith(".values")]
    assert len(values) == 4 and all(_max_rel_diff({n: expected[n]}, {n: _full_params(_compressed())[n]}) > 0
                                    for n in values[:1]), "the sparse non-zeros should train"
    for s, (a, b) in enumerate(zip(norms, ref_norms)):
        assert abs(a - b) <= 2e-6 * b, f"step {s}: global norm {a!r} vs clip_grad_norm_'s {b!r}"
    fsdp_diff = _max_rel_diff(_full_params(ours), expected)
    ddp = nn.parallel.DistributedDataParallel(_compressed())
    _train(ddp, bk.optim.FusedAdamW(ddp.parameters(), lr=LR, max_grad_norm=CLIP), STEPS, clip_by_torch=False)
    ddp_diff = _max_rel_diff(_full_params(ddp), expected)
    assert fsdp_diff <= bound and ddp_diff <= bound, (fsdp_diff, ddp_diff, bound)
    return fsdp_diff, ddp_diff, bound


def test_fsdp2_trains_quant_and_sparse_layers_like_torch_adamw(dist_workers):
    """A GPT with QuantLinear (w8a16) and SparseLinear (2:4, CSR) layers: 10 steps of FusedAdamW
    (max_grad_norm) on FSDP2 and on DDP vs torch's AdamW + clip_grad_norm_ on FSDP2; biases and
    stored non-zeros sharded, int8 weights and indices replicated and unchanged."""
    results = dist_workers.run(_fsdp_body)
    assert results[0] == results[1]


def _fsdp_dcp_body(path: str):
    import torch.distributed.checkpoint as dcp

    mesh = _mesh()
    model = _fsdp(_compressed(), mesh)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=LR)
    _train(model, opt, 2, clip_by_torch=False)
    dcp.save(_dcp(model, opt), checkpoint_id=path)
    twin = _fsdp(_compressed(seed=1), mesh)  # other weights, same sizes (exact sparsity)
    twin_opt = bk.optim.FusedAdamW(twin.parameters(), lr=LR)
    _dcp_load(twin, twin_opt, path)
    assert _max_rel_diff(_full_params(twin), _full_params(model)) == 0.0
    for (n, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), n
    _train(model, opt, 2, clip_by_torch=False, first=2)
    _train(twin, twin_opt, 2, clip_by_torch=False, first=2)
    assert _max_rel_diff(_full_params(twin), _full_params(model)) == 0.0, "the resumed run differs"
    return True


def test_fsdp2_compressed_model_dcp_round_trip(dist_workers, tmp_path):
    dist_workers.run(_fsdp_dcp_body, str(tmp_path / "ckpt"))


# ----- tensor parallelism -------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _tp_case(layer: nn.Module, style, x: torch.Tensor, mesh):
    """(output, x.grad, bias.grad) of ``layer`` split by ``style`` (output gathered), and of the
    unsharded layer, for the loss sum(y * r)."""
    from torch.distributed.tensor.parallel import parallelize_module

    r = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(9))
    out = []
    for m in (copy.deepcopy(layer), parallelize_module(copy.deepcopy(layer), mesh, style)):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * r).sum().backward()
        out.append((y.detach(), xi.grad, _full(m.bias.grad) if m.bias is not None else None, m))
    return out


def _tp_body():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel as TorchColwise
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = _mesh()
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(0)  # the same layers on both ranks
    report = {}
    for mode in ("w8a16", "w8a8"):
        for smooth in (False, True):
            lin = nn.Linear(24, 11)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(11, 24, generator=g))
                lin.bias.copy_(torch.randn(11, generator=g))
            s = torch.rand(24, generator=g) + 0.5 if smooth else None
            q = bk.nn.QuantLinear.from_linear(lin, mode=mode, smooth_scale=s)
            x = torch.randn(3, 5, 24, generator=g)
            dense = F.linear(x, lin.weight, lin.bias)
            for name, style in (("colwise", bk.distributed.ColwiseParallel(output_layouts=Replicate())),
                                ("rowwise", bk.distributed.RowwiseParallel(input_layouts=Replicate()))):
                (y0, gx0, gb0, _), (y1, gx1, gb1, split) = _tp_case(q, style, x, mesh)
                key = f"{mode}{' smoothquant' if smooth else ''} {name}"
                wpl = split.weight_int8.placements
                assert wpl == ((Shard(0),) if name == "colwise" else (Shard(1),)), (key, wpl)
                # not re-quantised: the shards are the unsharded layer's int8 values and scales
                assert torch.equal(split.weight_int8.full_tensor(), q.weight_int8), key
                assert torch.equal(split.weight_scale.full_tensor(), q.weight_scale), key
                assert torch.allclose(_full(split.weight), q.weight, rtol=1e-6, atol=0), key
                exact = mode == "w8a16" or name == "colwise"  # rowwise w8a8 quantises each rank's slice itself
                if exact:
                    tol = 2e-6
                    assert _rel(y1, y0) <= tol, (key, _rel(y1, y0))
                else:  # within the quantisation error of the unsharded layer
                    assert (y1 - dense).abs().max() <= 2 * (y0 - dense).abs().max(), key
                    assert _rel(y1, y0) > 0, f"{key}: expected the per-slice quantisation to change something"
                    tol = 2 * _rel(y0, dense)
                assert _rel(gx1, gx0) <= 2e-6 and _rel(gb1, gb0) <= 2e-6, (key, _rel(gx1, gx0), _rel(gb1, gb0))
                report[key] = _rel(y1, y0)
    # an MLP: colwise up-projection, rowwise down-projection, default layouts (local tensors in and out)
    up = bk.nn.QuantLinear.from_linear(nn.Linear(16, 32), mode="w8a16")
    down = bk.nn.QuantLinear.from_linear(nn.Linear(32, 16), mode="w8a16")
    mlp = nn.Sequential(up, nn.GELU(), down)
    split = parallelize_module(copy.deepcopy(mlp), mesh, {"0": bk.distributed.ColwiseParallel(),
                                                          "2": bk.distributed.RowwiseParallel()})
    x = torch.randn(4, 16, generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = mlp(xa), split(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert _rel(yb, ya) <= 2e-6 and _rel(xb.grad, xa.grad) <= 2e-6, (_rel(yb, ya), _rel(xb.grad, xa.grad))
    assert split[0].weight_int8.to_local().shape == (16, 16) and split[2].weight_int8.to_local().shape == (16, 16)
    # sequence-parallel layouts: each rank holds its rows of the input and gets its rows of the output
    seq = parallelize_module(copy.deepcopy(mlp), mesh, {
        "0": bk.distributed.ColwiseParallel(input_layouts=Shard(0)),
        "2": bk.distributed.RowwiseParallel(output_layouts=Shard(0))})
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    assert _rel(seq(x[rows]), ya[rows].detach()) <= 2e-6
    assert set(split.state_dict()) == set(mlp.state_dict())
    # nn.Linear through our styles is torch's; torch's own styles refuse QuantLinear (hence ours)
    lin = nn.Linear(16, 8)
    a = parallelize_module(copy.deepcopy(lin), mesh, TorchColwise(output_layouts=Replicate()))(x)
    b = parallelize_module(copy.deepcopy(lin), mesh, bk.distributed.ColwiseParallel(output_layouts=Replicate()))(x)
    assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="only support nn.Linear"):
        parallelize_module(copy.deepcopy(up), mesh, TorchColwise())
    with pytest.raises(RuntimeError, match="only be called once"):
        parallelize_module(split[0], mesh, bk.distributed.ColwiseParallel())
    with pytest.raises(TypeError, match="expects a DTensor input"):
        bkd.quant_linear_forward(split[0], x)
    return report


def test_tensor_parallel_quant_linear_equals_unsharded(dist_workers):
    """QuantLinear split colwise / rowwise on 2 ranks (w8a16, w8a8; with and without SmoothQuant;
    uneven shards): outputs, input and bias gradients equal the unsharded layer's (w8a8 rowwise
    within the quantisation error); an MLP through parallelize_module; int8 values never
    re-quantised."""
    report = dist_workers.run(_tp_body)
    assert report[0] == report[1]
