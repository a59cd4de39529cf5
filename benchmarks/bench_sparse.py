"""SparseLinear (2:4, block, unstructured) vs the dense nn.Linear it replaces, one process, same data.

    python benchmarks/bench_sparse.py [--quick] [--sweep] [--device cpu|cuda] [--isa avx2|avx512|...]
                                      [--threads N] [--out FILE.json]

Baselines: dense ``F.linear`` (bf16 cuBLAS on CUDA, fp32 on CPU) and PyTorch's own sparse
formats on the same pruned weight: ``to_sparse_semi_structured`` (CUDA, 2:4), ``to_sparse_bsr``
(block) and ``to_sparse_csr`` (unstructured). SparseLinear is timed as used for inference: its
first call per shape measures its kernels against the dense product and keeps the faster
(bigkernels.nn._dispatch); that call is the warm-up, outside the timing. ``--sweep`` times every
power-of-two M from 1 to 512 on 1024 x 1024 and 4096 x 4096 layers for every pattern (plus
unstructured 70%) against dense only (the "never slower than dense" check) and prints the lowest
ratio per case; ``--isa`` caps the CPU kernels' instruction set (BIGKERNELS_CPU_ISA).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import bigkernels as bk
from bigkernels.nn import SparseLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SWEEP_HELP, SWEEP_KN, SWEEP_M, bench_main, header, metadata, print_worst, time_providers  # noqa: E402

KN = [(4096, 4096), (4096, 14336)]
CASES = [("2:4", 0.5), ("block", 0.5), ("block", 0.9), ("unstructured", 0.5), ("unstructured", 0.9)]
SWEEP_CASES = CASES + [("unstructured", 0.7)]


def grid(device: str, quick: bool, sweep: bool = False):
    """The issue's grid, plus (full runs) the edges of "never slower than dense": a small layer
    and low sparsity, where SparseLinear must fall back to the dense product. ``sweep``:
    SWEEP_M x SWEEP_KN x SWEEP_CASES."""
    if sweep:
        return [(m, k, n, pat, sp) for k, n in SWEEP_KN for pat, sp in SWEEP_CASES for m in SWEEP_M]
    ms = ([1, 2048] if quick else [1, 16, 2048, 8192]) if device == "cuda" else ([1] if quick else [1, 16, 128])
    kns = KN[:1] if quick else KN
    cases = [(m, k, n, pat, sp) for m in ms for k, n in kns for pat, sp in CASES]
    if not quick:
        edge_ms = (ms[0], ms[-2])
        cases += [(m, 256, 256, pat, sp) for m in edge_ms for pat, sp in CASES]
        cases += [(m, 4096, 4096, "unstructured", 0.25) for m in edge_ms]
    return cases


def torch_sparse(pattern: str, w: torch.Tensor, device: str):
    """PyTorch's own format for this pattern, as a function of x (or None where it has none)."""
    try:
        if pattern == "2:4" and device == "cuda":
            from torch.sparse import to_sparse_semi_structured

            ws = to_sparse_semi_structured(w)
            return lambda x, b: F.linear(x, ws, b)
        if pattern == "block":
            ws = w.to_sparse_bsr((64, 64))  # torch warns that BSR support is in beta
            return lambda x, b: (ws @ x.T).T + b
        if pattern == "unstructured":
            ws = w.to_sparse_csr()
            return lambda x, b: (ws @ x.T).T + b
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return None


def run(device: str, quick: bool, sweep: bool = False) -> List[dict]:
    meta = metadata(device, "csr_mm")
    print(header(meta))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    layers = {}  # (k, n, pattern, sparsity) -> (pruned linear, SparseLinear): built once per sweep
    for m, k, n, pattern, sparsity in grid(device, quick, sweep):
        if (k, n, pattern, sparsity) not in layers:
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, n, device=device, dtype=dtype)
            bk.prune_(lin, sparsity=sparsity, pattern=pattern, block_size=64)
            layers = {(k, n, pattern, sparsity): (lin, SparseLinear.from_linear(lin, pattern=pattern, block_size=64))}
        lin, sl = layers[(k, n, pattern, sparsity)]
        x = torch.randn(m, k, device=device, dtype=dtype)
        fns: Dict[str, Callable] = {"dense F.linear": lambda: F.linear(x, lin.weight, lin.bias),
                                    f"bigkernels SparseLinear {pattern}": lambda: sl(x)}
        theirs = None if sweep else torch_sparse(pattern, lin.weight.detach(), device)
        if theirs is not None:
            fns[f"torch sparse {pattern}"] = lambda: theirs(x, lin.bias)
        res = time_providers(fns, device, quick, budget_s=3.0)
        base = res["dense F.linear"][0]
        for name, (med, lo, hi) in res.items():
            rows.append(dict(meta, kernel="sparse_linear", provider=name, shape=f"{m}x{k}x{n}", pattern=pattern,
                             sparsity=sparsity, dtype=str(dtype).split(".")[1], ms=med, ms_p20=lo, ms_p80=hi,
                             speedup=base / med))
    return rows


def print_table(rows: List[dict]) -> None:
    head = f"{'M x K x N':<18} {'pattern':<14} {'provider':<36} {'ms':>9} {'vs dense':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        pat = f"{r['pattern']} {int(r['sparsity'] * 100)}%"
        print(f"{r['shape']:<18} {pat:<14} {r['provider']:<36} {r['ms']:>9.4f} {r['speedup']:>8.2f}x")
    big = [dict(r, case=f"{r['pattern']} {int(r['sparsity'] * 100)}% {r['shape'].split('x', 1)[1]}") for r in rows
           if int(r["shape"].split("x")[1]) >= 1024]  # the rule is for layers of 1024 x 1024 and up
    print_worst(big, group_keys=("case",))


def main(argv=None):
    return bench_main(__doc__.split("\n")[0], run, print_table, argv,
                      options={"sweep": dict(action="store_true", help=SWEEP_HELP)})


if __name__ == "__main__":
    main()
