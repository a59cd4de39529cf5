"""Train a small GPT with FSDP2 + FusedAdamW + GradualPruner on several processes, checkpoint it with
torch.distributed.checkpoint (DCP), resume from the checkpoint, and compress the result.

    # one node, N processes (CPU: gloo; one GPU per process: nccl)
    torchrun --nproc_per_node=2 examples/train_fsdp.py
    # several nodes: the same command on every node (NODE_RANK 0..NNODES-1), one of them the rendezvous host
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/train_fsdp.py

What it does: each rank trains on its own batches of Python's standard-library sources; every block
and the whole model are ``fully_shard``-ed (parameters, gradients and optimizer state split over the
ranks); ``bk.optim.FusedAdamW`` steps the local shards and clips by the global gradient norm;
``bk.sparse.GradualPruner`` prunes the linear layers to ``--sparsity`` (scores of the whole weights,
masks sharded like them). A DCP checkpoint (model, optimizer, pruning masks, step) is written every
``--save-every`` steps; the first one is immediately loaded into a freshly built model and optimizer,
which carry on training (what a restart does). ``--resume`` starts from the newest checkpoint in
``--ckpt`` (e.g. after a preemption; ``--stop-after`` simulates one). At the end rank 0 gathers the
whole model, stores its pruned layers as ``SparseLinear`` (``sparsify_``), compares held-out
perplexity before and after, and saves the compressed model to ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import bigkernels as bk
from bigkernels.demo.data import batches, load_corpus
from bigkernels.demo.model import TinyGPT, perplexity


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--d", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sparsity", type=float, default=0.75, help="final sparsity of the pruned linear layers")
    p.add_argument("--pattern", default="block", choices=["block", "unstructured"],
                   help="what is pruned: square blocks (stored BSR) or single weights (stored CSR)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prune-start", type=int, default=10)
    p.add_argument("--prune-end", type=int, default=40)
    p.add_argument("--prune-every", type=int, default=5)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--ckpt", default="fsdp_ckpt", help="folder of the DCP checkpoints (shared by all nodes)")
    p.add_argument("--resume", action="store_true", help="start from the newest checkpoint in --ckpt")
    p.add_argument("--stop-after", type=int, default=None, help="exit after this step (simulates a preemption)")
    p.add_argument("--out", default="fsdp_out", help="where rank 0 saves the compressed model")
    p.add_argument("--corpus", type=int, default=1_000_000, help="bytes of text to read")
    return p.parse_args(argv)


def not_head(module: nn.Module, fqn: str) -> bool:
    return fqn != "head"  # the output projection stays dense


def build(args, mesh):
    """A freshly initialised sharded model, its optimizer and pruner."""
    torch.manual_seed(0)  # the same initial weights on every rank (fully_shard keeps each rank's piece)
    model = TinyGPT(vocab=256, d=args.d, layers=args.layers, heads=4, seq=args.seq).to(mesh.device_type)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=args.lr, weight_decay=0.01, max_grad_norm=1.0)
    pruner = bk.sparse.GradualPruner(model, args.sparsity, start_step=args.prune_start, end_step=args.prune_end,
                                     every=args.prune_every, pattern=args.pattern, block_size=args.block_size,
                                     filter_fn=not_head)
    return model, opt, pruner


def batch_for(stream, args, step: int, device):
    """This rank's batch of ``step``: a function of (rank, step) only, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1_000_003 * step + dist.get_rank())
    x, y = next(batches(stream, args.batch, args.seq, g))
    return x.to(device), y.to(device)


def checkpoint_state(model, opt, step: int) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
            "step": torch.tensor(step)}


def save(model, opt, step: int, args) -> str:
    path = os.path.join(args.ckpt, f"step_{step:06d}")
    dcp.save(checkpoint_state(model, opt, step), checkpoint_id=path)
    return path


def load(path: str, args, mesh):
    """Model, optimizer and pruner rebuilt from the checkpoint at ``path``; returns them and the step."""
    model, opt, pruner = build(args, mesh)
    # The checkpoint may hold pruning masks the new model does not have yet: give it placeholders to load into.
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    bk.distributed.expect_masks_(model, [k.removeprefix("model.") for k in keys if k.startswith("model.")])
    state = checkpoint_state(model, opt, 0)  # (a fresh optimizer's state is made by a step with lr=0)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    step = int(state["step"])
    pruner.step_count = step
    pruner.current_sparsity = pruner.sparsity_at(step - 1)
    return model, opt, pruner, step


def newest_checkpoint(folder: str):
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step_")) if os.path.isdir(folder) else []
    return os.path.join(folder, steps[-1]) if steps else None


def sparsity_of(model) -> float:
    """Fraction of zeros over the pruned layers (whole tensors: a collective)."""
    zeros = total = 0
    for m in model.modules():
        if getattr(m, "weight_mask", None) is not None:
            w = bk.distributed.full_tensor(m.weight)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(total, 1)


def main(argv=None) -> None:
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    mesh = init_device_mesh(device.type, (world,))
    say = print if rank == 0 else (lambda *a, **k: None)
    if rank != 0:
        logging.getLogger("bigkernels").setLevel(logging.WARNING)  # what was pruned / converted: said once

    train_stream, held = load_corpus(max_bytes=args.corpus)
    model, opt, pruner = build(args, mesh)
    start, resumed = 0, False
    if args.resume and newest_checkpoint(args.ckpt) is not None:
        path = newest_checkpoint(args.ckpt)
        model, opt, pruner, start = load(path, args, mesh)
        resumed = True
        say(f"resumed from {path} at step {start}")
    say(f"{world} ranks ({backend}), {sum(p.numel() for p in model.parameters())} parameters, "
        f"steps {start}..{args.steps}")

    t0 = time.time()
    for step in range(start, args.steps):
        x, y = batch_for(train_stream, args, step, device)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.step()
        done = step + 1
        if done % 10 == 0 or done == args.steps:
            say(f"step {done:5d}  loss {loss.item():.3f}  grad norm {float(opt.last_grad_norm):.3f}  "
                f"sparsity target {pruner.current_sparsity:.2f}  {time.time() - t0:.1f}s")
        if done % args.save_every == 0 or done == args.steps:
            path = save(model, opt, done, args)
            say(f"step {done:5d}  saved {path}")
            if not resumed and done < args.steps:
                # What a restart does: a new model and optimizer from the checkpoint; they carry on.
                loaded, loaded_opt, loaded_pruner, at = load(path, args, mesh)
                for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
                    a, b = bk.distributed.local(a), bk.distributed.local(b)
                    if not torch.equal(a, b):
                        raise RuntimeError(f"checkpoint {path}: {name} did not load back")
                model, opt, pruner, resumed = loaded, loaded_opt, loaded_pruner, True
                say(f"step {done:5d}  loaded {path} into a new model and optimizer (step {at}); continuing with them")
        if args.stop_after is not None and done >= args.stop_after:
            say(f"stopping after step {done} (--stop-after); run again with --resume to continue")
            dist.destroy_process_group()
            return

    sparsity = sparsity_of(model)
    # The whole model on rank 0 (CPU), for compression and evaluation.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = TinyGPT(vocab=256, d=args.d, layers=args.layers, heads=4, seq=args.seq)
        bk.distributed.expect_masks_(plain, full)
        plain.load_state_dict(full)
        ppl = perplexity(plain, held, args.seq, max_windows=64)
        dense_mb = sum(t.numel() * t.element_size() for t in plain.parameters()) / 1e6
        bk.sparse.sparsify_(plain, pattern=args.pattern, block_size=args.block_size, filter_fn=not_head)
        ppl_sparse = perplexity(plain, held, args.seq, max_windows=64)
        stored_mb = sum(t.numel() * t.element_size() for t in list(plain.parameters()) + [
            b for n, b in plain.named_buffers() if not n.endswith("weight_mask")]) / 1e6
        os.makedirs(args.out, exist_ok=True)
        torch.save(plain.state_dict(), os.path.join(args.out, "model_sparse.pt"))
        print(f"pruned layers {sparsity:.1%} zeros; held-out perplexity {ppl:.3f} (dense, masked) -> "
              f"{ppl_sparse:.3f} (SparseLinear); weights {dense_mb:.2f} MB -> {stored_mb:.2f} MB; "
              f"saved {os.path.join(args.out, 'model_sparse.pt')}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
