"""The fused optimizers on 2 CPU ranks (gloo): FSDP2 (``fully_shard``), DDP and tensor-parallel
DTensor params stepped on their local shards, global-norm clipping equal to ``clip_grad_norm_``,
and torch.distributed.checkpoint round trips (2 -> 1 rank, into torch.optim.AdamW and back).

The bodies run in the session's two worker ranks (``dist_workers``, tests/_dist.py) and assert
there; what they return is for the messages."""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bigkernels as bk

STEPS = 10
LR = 3e-3
CLIP = 0.05  # below the model's grad norms: clipping acts on every step


# ----- shared helpers (run on the ranks) -------------------------------------------------------------
class _Model(nn.Module):
    """A small GPT with an odd vocabulary (uneven shards) and a 1-element parameter (an empty
    shard on rank 1): the demo's TinyGPT, or Hugging Face's GPT-2 (Conv1D layers, tied head)
    built from a tiny config."""

    def __init__(self, kind: str = "tinygpt"):
        super().__init__()
        if kind == "hf-gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0)
            self.gpt = GPT2LMHeadModel(cfg)
            self.blocks = self.gpt.transformer.h
        else:
            from bigkernels.demo.model import TinyGPT

            self.gpt = TinyGPT(vocab=97, d=32, layers=2, heads=4, seq=16)
            self.blocks = self.gpt.blocks
        self.hf = kind == "hf-gpt2"
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, idx):
        out = self.gpt(idx)
        return (out.logits if self.hf else out) * self.temperature


def _model(seed: int = 0, kind: str = "tinygpt") -> _Model:
    torch.manual_seed(seed)
    return _Model(kind)


def _fsdp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _batch(step: int) -> torch.Tensor:
    """This rank's batch for ``step`` (the ranks see different data)."""
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(0, 97, (3, 17), generator=g)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    w = _batch(step)
    logits = model(w[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _full_params(model: nn.Module) -> dict:
    return {n.replace("module.", ""): _full(p) for n, p in model.named_parameters()}


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-3)).item() for k in a)


def _train(model: nn.Module, opt, steps: int, clip_by_torch: bool, first: int = 0) -> list:
    norms = []
    for s in range(first, first + steps):
        _loss(model, s).backward()
        if clip_by_torch:
            norms.append(float(_full(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))))
        opt.step()
        if not clip_by_torch and getattr(opt, "max_grad_norm", None) is not None:
            norms.append(float(opt.last_grad_norm))
        opt.zero_grad(set_to_none=True)
    return norms


def _mesh(n: int = 2):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (n,))


# ----- FSDP2 and DDP training ------------------------------------------------------------------------
def _training_body(kind: str):
    mesh = _mesh()
    _model_ = functools.partial(_model, kind=kind)
    # reference: torch.optim.AdamW on FSDP2, clip_grad_norm_ before each step
    ref = _fsdp(_model_(), mesh)
    ref_norms = _train(ref, torch.optim.AdamW(ref.parameters(), lr=LR, foreach=True), STEPS, clip_by_torch=True)
    expected = _full_params(ref)
    # DESIGN.md: inside a training loop, as close to torch's loop as torch's own fused kernel is
    torch_fused = _fsdp(_model_(), mesh)
    _train(torch_fused, torch.optim.AdamW(torch_fused.parameters(), lr=LR, fused=True), STEPS, clip_by_torch=True)
    bound = 2 * _max_rel_diff(_full_params(torch_fused), expected) + 1e-6

    ours = _fsdp(_model_(), mesh)
    opt = bk.optim.FusedAdamW(ours.parameters(), lr=LR, max_grad_norm=CLIP)
    norms = _train(ours, opt, STEPS, clip_by_torch=False)
    p = next(ours.parameters())
    st = opt.state[p]
    from torch.distributed.tensor import DTensor

    assert len({opt.state[q]["exp_avg"]._local_tensor.untyped_storage().data_ptr() for q in ours.parameters()}) == 1

    assert isinstance(p, DTensor) and isinstance(st["exp_avg"], DTensor), "params/state should be DTensors"
    assert st["exp_avg"].placements == p.placements and st["exp_avg"].device_mesh == p.device_mesh
    assert not isinstance(st["step"], DTensor) and float(st["step"]) == STEPS
    fsdp_diff = _max_rel_diff(_full_params(ours), expected)

    ddp_model = nn.parallel.DistributedDataParallel(_model_())
    ddp_opt = bk.optim.FusedAdamW(ddp_model.parameters(), lr=LR, max_grad_norm=CLIP)
    ddp_norms = _train(ddp_model, ddp_opt, STEPS, clip_by_torch=False)
    ddp_diff = _max_rel_diff(_full_params(ddp_model), expected)

    for what, got in (("FSDP2", norms), ("DDP", ddp_norms)):
        for s, (a, b) in enumerate(zip(got, ref_norms)):
            assert abs(a - b) <= 2e-6 * b, f"{what} step {s}: global norm {a!r} vs clip_grad_norm_'s {b!r}"
    assert fsdp_diff <= bound and ddp_diff <= bound, (fsdp_diff, ddp_diff, bound)
    return fsdp_diff, ddp_diff, bound, norms[0], ref_norms[0]


@pytest.mark.parametrize("kind", ["tinygpt", pytest.param("hf-gpt2", marks=[pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed")])])
def test_fsdp2_and_ddp_training_match_torch_adamw_on_fsdp2(dist_workers, kind):
    """10 steps of a small GPT (uneven shards, an empty shard): FusedAdamW(max_grad_norm) on FSDP2
    and on DDP vs torch.optim.AdamW + clip_grad_norm_ on FSDP2, as close as torch's fused AdamW is
    to it (rounding compounds through Adam's division); the norms are equal every step."""
    results = dist_workers.run(_training_body, kind)
    assert results[0] == results[1]  # the ranks agree (values replicated)


# ----- any placement: a 2-D mesh, Partial grads, replicated params -------------------------------------
def _placements_body():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, 2))  # dim 0 of size 1 ("dp"), dim 1 split over the 2 ranks ("tp")
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (7, 4), (5,), (3, 3), (2, 6)]
    placements = [(Shard(0), Shard(0)), (Replicate(), Shard(1)), (Shard(0), Replicate()), (Replicate(), Replicate()),
                  (Replicate(), Shard(0))]
    full_p = [torch.randn(s, generator=g) for s in shapes]
    full_g = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    ours = [nn.Parameter(distribute_tensor(p.clone(), mesh, pl)) for p, pl in zip(full_p, placements)]
    theirs = [nn.Parameter(p.clone()) for p in full_p]
    for kind, cls, torch_cls, kw in (
            ("adamw", bk.optim.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
            ("sgd", bk.optim.FusedSGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True))):
        ours = [nn.Parameter(distribute_tensor(p.clone(), mesh, pl)) for p, pl in zip(full_p, placements)]
        theirs = [nn.Parameter(p.clone()) for p in full_p]
        opt, ref = cls(ours, max_grad_norm=0.5, **kw), torch_cls(theirs, **kw)
        for step, grads in enumerate(full_g):
            for i, (p, q, gr) in enumerate(zip(ours, theirs, grads)):
                q.grad = gr.clone()
                if i == 4:  # a Partial grad (as sequence parallelism leaves them): each rank holds half
                    p.grad = DTensor.from_local(gr / 2, mesh, (Replicate(), Partial()), run_check=False)
                else:
                    p.grad = distribute_tensor(gr.clone(), mesh, p.placements)
            norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
            opt.step()
            ref.step()
            assert abs(float(opt.last_grad_norm) - float(norm)) <= 1e-6 * float(norm), (kind, step)
        for i, (p, q) in enumerate(zip(ours, theirs)):
            diff = (_full(p) - q.detach()).abs().max().item()
            assert diff <= 1e-6, f"{kind} param {i} ({placements[i]}): max |diff| {diff}"
            for name, t in opt.state[p].items():
                if t.dim() > 0:
                    assert isinstance(t, DTensor) and t.placements == p.placements, (kind, i, name)
    return True


def test_any_placement_and_partial_grads_match_torch_on_full_tensors(dist_workers):
    """DTensor params sharded/replicated over a 2-D mesh, one with Partial grads: FusedAdamW
    (amsgrad) and FusedSGD (nesterov) with max_grad_norm equal torch's on the full tensors, and the
    norm counts replicated tensors once."""
    dist_workers.run(_placements_body)


# ----- the ops themselves on DTensors --------------------------------------------------------------
def _ops_body():
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = _mesh()
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(s, generator=g) for s in [(9, 4), (5,), (1, 3)]]
    # from the seeded generator: the ranks' global RNG states differ, and each rank compares with its own
    # plain run on the full tensors
    grads = [torch.randn(t.shape, generator=g) for t in full]
    pls = [(Shard(0),), (Replicate(),), (Shard(0),)]
    dt = lambda ts: [distribute_tensor(t.clone(), mesh, pl) for t, pl in zip(ts, pls)]  # noqa: E731
    # sum_of_squares through the dispatcher and through every backend of the Python wrapper
    expected = sum(float(t.double().square().sum()) for t in full)
    for fn in (torch.ops.bigkernels.sum_of_squares,
               lambda ts: bk.ops.optim.sum_of_squares(ts, backend="reference"),
               bk.ops.optim.sum_of_squares):
        out = fn(dt(full))
        assert isinstance(out, DTensor), type(out)
        assert abs(float(out.full_tensor()) - expected) <= 1e-5 * expected, (float(out.full_tensor()), expected)
    # an update op through the dispatcher equals the same op on the full tensors
    params, m, v = dt(full), dt([torch.zeros_like(t) for t in full]), dt([torch.zeros_like(t) for t in full])
    steps = [torch.zeros(()) for _ in full]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    torch.ops.bigkernels.fused_adamw_(params, dt(grads), m, v, [], steps, **kw)
    ref_p = [t.clone() for t in full]
    torch.ops.bigkernels.fused_adamw_(ref_p, [t.clone() for t in grads], [torch.zeros_like(t) for t in full],
                                      [torch.zeros_like(t) for t in full], [], [torch.zeros(()) for _ in full], **kw)
    for a, b in zip(params, ref_p):
        assert torch.equal(a.full_tensor(), b)
    # clear errors, raised before anything changes
    before = [p.full_tensor() for p in params]
    errors = []
    for bad in ([g.full_tensor() for g in dt(grads)],  # plain grads for DTensor params
                [distribute_tensor(t, mesh, (Replicate(),)) for t in grads]):  # other placements
        try:
            torch.ops.bigkernels.fused_adamw_(params, bad, m, v, [], steps, **kw)
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 2 and "grads[0] must be a DTensor with the mesh and placements of params[0]" in errors[0]
    try:
        torch.ops.bigkernels.sum_of_squares([params[0], full[1]])
    except ValueError as e:
        errors.append(str(e))
    assert len(errors) == 3 and "tensors[1] is a Tensor" in errors[2], errors
    assert all(torch.equal(p.full_tensor(), b) for p, b in zip(params, before))
    return errors


def test_ops_take_dtensors_or_fail_clearly(dist_workers):
    errors = dist_workers.run(_ops_body)[0]
    assert all("sharding strategy" not in e for e in errors)


# ----- checkpoints (torch.distributed.checkpoint) --------------------------------------------------
def _dcp(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _dcp_load(model, opt, path: str, **kw) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = _dcp(model, opt)  # a fresh optimizer's state: created by a step with zero grads and lr=0
    dcp.load(sd, checkpoint_id=path, **kw)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _full_state(opt) -> dict:
    return {(gi, i, k): _full(v) for gi, g in enumerate(opt.param_groups) for i, p in enumerate(g["params"])
            for k, v in opt.state[p].items()}


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), (what, sorted(a)[:4], sorted(b)[:4])
    for k in a:
        assert torch.equal(a[k].float().reshape(-1), b[k].float().reshape(-1)), (what, k)


def _make(kind: str, params):
    if kind == "adamw":
        return bk.optim.FusedAdamW(params, lr=LR, weight_decay=0.1, max_grad_norm=CLIP)
    if kind == "sgd":
        return bk.optim.FusedSGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


def _assert_items_hold_only_their_elements(path: str) -> None:
    """Each tensor item of a DCP checkpoint (one ``torch.save`` record per shard of a state_dict
    entry) is exactly as large as the record of a compact tensor of its shard's shape and dtype
    (flat state is written piece by piece, never with its buffer's other pieces or padding), and
    the data files hold nothing but the items."""
    import io

    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(path).read_metadata()
    per_file: dict = {}
    tensors = 0
    for idx, info in md.storage_data.items():
        per_file[info.relative_path] = per_file.get(info.relative_path, 0) + info.length
        meta = md.state_dict_metadata[idx.fqn]
        if not hasattr(meta, "chunks"):
            continue  # pickled values (param_groups)
        chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(idx.offset))
        record = io.BytesIO()
        torch.save(torch.empty(tuple(chunk.sizes), dtype=meta.properties.dtype), record)
        assert info.length == record.tell(), (idx.fqn, tuple(chunk.sizes), info.length, record.tell())
        tensors += 1
    assert tensors > 0 and any(".exp_avg" in i.fqn or "momentum_buffer" in i.fqn for i in md.storage_data)
    for name, total in per_file.items():
        assert os.path.getsize(os.path.join(path, name)) == total, name


def _dcp_body(path: str, kind: str):
    import torch.distributed.checkpoint as dcp

    mesh = _mesh()
    rank = dist.get_rank()
    model = _fsdp(_model(), mesh)
    opt = _make(kind, model.parameters())
    fresh = _dcp(model, opt)["optim"]  # get_optimizer_state_dict on a fresh optimizer steps it
    assert fresh["state"], "a fresh optimizer's state dict should hold the state made by its zero step"
    _train(model, opt, 3, clip_by_torch=False)
    dcp.save(_dcp(model, opt), checkpoint_id=path)
    saved_state, saved_params = _full_state(opt), _full_params(model)
    if rank == 0:
        _assert_items_hold_only_their_elements(path)

    # same world size: a new model and optimizer
    twin = _fsdp(_model(seed=1), mesh)
    twin_opt = _make(kind, twin.parameters())
    _dcp_load(twin, twin_opt, path)
    _assert_same_state(_full_state(twin_opt), saved_state, f"{kind} 2 -> 2")
    _train(model, opt, 2, clip_by_torch=False, first=3)
    _train(twin, twin_opt, 2, clip_by_torch=False, first=3)
    assert _max_rel_diff(_full_params(twin), _full_params(model)) == 0.0, f"{kind}: resumed run differs"
    if kind == "adamw":  # the loaded state is flat again: one local buffer per state name
        for name in ("exp_avg", "exp_avg_sq"):
            assert len({twin_opt.state[p][name]._local_tensor.untyped_storage().data_ptr()
                        for p in twin.parameters()}) == 1, name

    # 2 -> 1 rank: rank 0 alone, on a one-rank mesh
    from torch.distributed.device_mesh import DeviceMesh

    solo_group = dist.new_group([0])
    if rank == 0:
        solo = _fsdp(_model(seed=2), DeviceMesh.from_group(solo_group, "cpu"))
        solo_opt = _make(kind, solo.parameters())
        _dcp_load(solo, solo_opt, path, process_group=solo_group)
        _assert_same_state(_full_state(solo_opt), saved_state, f"{kind} 2 -> 1")
        assert _max_rel_diff(_full_params(solo), saved_params) == 0.0
    dist.barrier()
    return True


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_dcp_round_trip_under_fsdp2_and_reshard_to_one_rank(dist_workers, tmp_path, kind):
    dist_workers.run(_dcp_body, str(tmp_path / "ckpt"), kind)


def _interop_body(path: str, back_path: str):
    """A FusedAdamW DCP checkpoint (FSDP2, 2 ranks) loads into torch.optim.AdamW on a plain model
    (1 rank) and continues identically; torch's checkpoint loads back into FusedAdamW on FSDP2."""
    import torch.distributed.checkpoint as dcp

    mesh = _mesh()
    rank = dist.get_rank()
    model = _fsdp(_model(), mesh)
    opt = _make("adamw", model.parameters())
    opt.max_grad_norm = None  # torch's AdamW has no clipping: compare unclipped runs
    for s in range(3):
        _loss(model, s).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dcp.save(_dcp(model, opt), checkpoint_id=path)
    saved_state = _full_state(opt)
    solo_group = dist.new_group([0])
    if rank == 0:
        plain = _model(seed=3)
        torch_opt = _make("torch", plain.parameters())
        _dcp_load(plain, torch_opt, path, process_group=solo_group)
        _assert_same_state(_full_state(torch_opt), saved_state, "FusedAdamW (FSDP2) -> torch AdamW")
        dcp.save(_dcp(plain, torch_opt), checkpoint_id=back_path, process_group=solo_group)
    dist.barrier()
    back = _fsdp(_model(seed=4), mesh)
    back_opt = _make("adamw", back.parameters())
    _dcp_load(back, back_opt, back_path)
    _assert_same_state(_full_state(back_opt), saved_state, "torch AdamW -> FusedAdamW (FSDP2)")
    return True


def test_dcp_fused_adamw_checkpoint_loads_into_torch_adamw_and_back(dist_workers, tmp_path):
    dist_workers.run(_interop_body, str(tmp_path / "fused"), str(tmp_path / "torch"))


# ----- GradScaler --------------------------------------------------------------------------------------
def _scaler_body():
    mesh = _mesh()
    results = {}
    for name, make in (("torch", lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=True)),
                       ("torch fused", lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True)),
                       ("ours", lambda ps: bk.optim.FusedAdamW(ps, lr=LR))):
        model = _fsdp(_model(), mesh)
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for s in range(3):
            scaler.scale(_loss(model, s)).backward()
            if s == 1:  # an overflow on both ranks: the step must change nothing
                next(model.parameters()).grad._local_tensor.view(-1)[:1] = float("inf")
                before = _full_params(model)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if s == 1:
                assert _max_rel_diff(_full_params(model), before) == 0.0, f"{name}: inf step changed params"
        results[name] = _full_params(model)
    diff = _max_rel_diff(results["ours"], results["torch"])
    bound = 2 * _max_rel_diff(results["torch fused"], results["torch"]) + 1e-6
    assert diff <= bound, (diff, bound)
    return diff, bound


def test_grad_scaler_under_fsdp2(dist_workers):
    """GradScaler's grad_scale/found_inf consumed in the step on sharded params: an overflow step
    changes nothing, the others match torch's AdamW under the same scaler."""
    dist_workers.run(_scaler_body)


def _new_optimizers_placements_body(kind: str):
    """As _placements_body, for the optimizers of issue 12 (every optimizer the package has)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from bigkernels.reference.optim import Lion

    mesh = init_device_mesh("cpu", (1, 2))
    g = torch.Generator().manual_seed(5)
    shapes = [(6, 5), (7, 4), (5,), (3, 3), (2, 6), (37,), (5, 3), (1, 3)]  # uneven shards, an empty one
    placements = [(Shard(0), Shard(0)), (Replicate(), Shard(1)), (Shard(0), Replicate()), (Replicate(), Replicate()),
                  (Replicate(), Shard(0)), (Replicate(), Shard(0)), (Replicate(), Shard(0)), (Replicate(), Shard(0))]
    full_p = [torch.randn(s, generator=g) for s in shapes]
    full_g = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    cls, torch_cls, kw = {
        "rmsprop": (bk.optim.FusedRMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True,
                                                                      weight_decay=0.1)),
        "lion": (bk.optim.FusedLion, Lion, dict(lr=0.01, weight_decay=0.1)),
        "adafactor": (bk.optim.FusedAdafactor, torch.optim.Adafactor, dict(lr=0.01, weight_decay=0.1)),
        "adamw8bit": (bk.optim.AdamW8bit, None, dict(lr=0.01)),
    }[kind]
    ours = [nn.Parameter(distribute_tensor(p.clone(), mesh, pl)) for p, pl in zip(full_p, placements)]
    theirs = [nn.Parameter(p.clone()) for p in full_p]
    opt = cls(ours, max_grad_norm=0.5, **kw)
    ref = torch_cls(theirs, **kw) if torch_cls is not None else bk.optim.AdamW8bit(theirs, max_grad_norm=0.5, **kw)
    for step, grads in enumerate(full_g):
        for p, q, gr in zip(ours, theirs, grads):
            q.grad = gr.clone()
            p.grad = distribute_tensor(gr.clone(), mesh, p.placements)
        if torch_cls is not None:
            norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        opt.step()
        ref.step()
        if torch_cls is not None:
            assert abs(float(opt.last_grad_norm) - float(norm)) <= 1e-6 * float(norm), (kind, step)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        diff = (_full(p) - q.detach()).abs().max().item()
        assert diff <= 1e-5, f"{kind} param {i} ({placements[i]}): max |diff| {diff}"
        for name, t in opt.state[p].items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and kind != "adafactor":
                assert isinstance(t, DTensor) and t.placements == p.placements, (kind, i, name)
    return True


@pytest.mark.parametrize("kind", ["rmsprop", "lion", "adafactor", "adamw8bit"])
def test_new_optimizers_on_any_placement_match_the_full_tensors(dist_workers, kind):
    """FusedRMSprop / FusedLion / FusedAdafactor / AdamW8bit on DTensor params of every placement
    (max_grad_norm: one global norm) equal the same optimizer on the full tensors."""
    assert dist_workers.run(_new_optimizers_placements_body, kind) == [True, True]
