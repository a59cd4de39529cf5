"""Llama-shaped models: the dense model vs each compressed variant of it, one process, same inputs.

    python benchmarks/bench_models.py [--quick] [--sparsity 0.5] [--models llama-1024,llama-4096-block]
                                      [--isa avx2|avx512|...] [--threads N] [--device cpu|cuda] [--out FILE.json]

Models: transformers' ``LlamaModel`` built from a config (no download, random weights, fp32 on
the CPU / bf16 on CUDA): ``llama-1024`` (hidden 1024, FFN 2816, 2 decoder layers, 16 heads) and
``llama-4096-block`` (one decoder layer of hidden 4096, FFN 11008, 32 heads). Inputs: batch 1
(a single token, as in decoding) and 16 x 128 tokens (a prefill batch). Variants, each made
from a copy of the dense model with the user's one line: ``quantize_(m, "w8a16")``,
``quantize_(m, "w8a8")``, ``prune_`` + ``sparsify_`` with ``2:4``, ``block`` (64 x 64 blocks) and
``unstructured`` at ``--sparsity`` (default 0.5, prune_'s default). Every variant's linear layers
are compressed; attention, norms and embeddings are the model's own.

Every model's forward is timed in alternating rounds (CPU: ``common.time_cpu_interleaved``; the
machine's state changes between rounds, so a ratio is only meaningful within a round); the
first call of each variant is outside the timing (the compressed layers measure their paths
there, bigkernels.nn._dispatch). ``--quick``: 4 x 128 tokens instead of 16 x 128, shorter timing.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Callable, Dict, List

import torch

import bigkernels as bk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_main, header, metadata, time_providers  # noqa: E402

MODELS = {
    "llama-1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16),
    "llama-4096-block": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32),
}
VARIANTS = ("w8a16", "w8a8", "2:4", "block", "unstructured")


def build(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    shape = MODELS[name]
    cfg = LlamaConfig(vocab_size=512, max_position_embeddings=512, num_key_value_heads=shape["num_attention_heads"],
                      **shape)
    torch.manual_seed(0)
    return LlamaModel(cfg).to(device=device, dtype=dtype).eval()


def compress(model: torch.nn.Module, variant: str, sparsity: float) -> torch.nn.Module:
    """A copy of ``model`` with every linear layer compressed the way a user would do it."""
    m = copy.deepcopy(model)
    if variant in ("w8a16", "w8a8"):
        return bk.quantize_(m, mode=variant)
    kwargs = dict(pattern=variant, block_size=64)
    bk.prune_(m, sparsity=0.5 if variant == "2:4" else sparsity, **kwargs)
    bk.sparse.sparsify_(m, **kwargs)
    return m


def weight_mb(model: torch.nn.Module) -> float:
    """Parameters and buffers of the model's linear-like layers (dense or compressed), in MB."""
    from bigkernels.nn import QuantLinear, SparseLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, QuantLinear, SparseLinear)):
            total += sum(t.numel() * t.element_size() for t in list(mod.parameters(recurse=False))
                         + list(mod.buffers(recurse=False)))
    return total / 2**20


def run(device: str, quick: bool, sparsity: float = 0.5, models: str = ",".join(MODELS)) -> List[dict]:
    meta = metadata(device, "w8a16_mm")
    print(header(meta))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inputs = {"batch 1 (1 token)": (1, 1), f"{4 if quick else 16} x 128 tokens": (4 if quick else 16, 128)}
    rows = []
    for name in models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
        dense = build(name, device, dtype)
        variants: Dict[str, torch.nn.Module] = {"dense": dense}
        for v in VARIANTS:
            variants[v] = compress(dense, v, sparsity)
        mb = {v: weight_mb(m) for v, m in variants.items()}
        for label, (b, t) in inputs.items():
            torch.manual_seed(1)
            ids = torch.randint(0, 512, (b, t), device=device)
            fns: Dict[str, Callable] = {v: (lambda m: lambda: m(ids).last_hidden_state)(m) for v, m in variants.items()}
            big = name == "llama-4096-block" and t > 1
            res = time_providers(fns, device, quick, budget_s=3.0 if quick else 20.0, min_rounds=3 if big else 5)
            base = res["dense"][0]
            for v, (med, lo, hi) in res.items():
                pattern = "" if v in ("dense", "w8a16", "w8a8") else f" {int((0.5 if v == '2:4' else sparsity) * 100)}%"
                rows.append(dict(meta, kernel="model", model=name, input=label, tokens=b * t,
                                 provider=f"{'dense' if v == 'dense' else 'bigkernels'} {v}{pattern}",
                                 shape=f"{b}x{t}", dtype=str(dtype).split(".")[1], ms=med, ms_p20=lo, ms_p80=hi,
                                 speedup=base / med, linear_weight_mb=mb[v]))
            print(f"  timed {name}, {label}", flush=True)
        del variants, dense
    return rows


def print_table(rows: List[dict]) -> None:
    head = f"{'model':<18} {'input':<22} {'variant':<28} {'ms':>10} {'p20-p80':>19} {'vs dense':>9} {'linear MB':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['ms_p20']:.2f}-{r['ms_p80']:.2f}"
        print(f"{r['model']:<18} {r['input']:<22} {r['provider']:<28} {r['ms']:>10.2f} {spread:>19} "
              f"{r['speedup']:>8.2f}x {r['linear_weight_mb']:>10.1f}")


def main(argv=None):
    return bench_main(__doc__.split("\n")[0], run, print_table, argv, options={
        "sparsity": dict(type=float, default=0.5, help="block and unstructured sparsity (2:4 is always 50%%)"),
        "models": dict(default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS)),
    })


if __name__ == "__main__":
    main()
