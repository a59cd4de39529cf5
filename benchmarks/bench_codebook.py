"""CodebookLinear (weight sharing: k-means codebooks, lookup-table GEMV/GEMM) vs the float nn.Linear
it replaces, one process, same data; plus the time k-means takes per layer.

    python benchmarks/bench_codebook.py [--quick] [--sweep [--bits 2,3,4,8]] [--device cpu|cuda] [--out FILE.json]
    BENCH_CPU_TIME=1 python benchmarks/bench_codebook.py ...   # CPU: one thread, CPU time (see below)

Baseline: ``F.linear`` in the float dtype a user runs on that device (fp32 on the CPU, bf16 via
cuBLAS on CUDA), timed in alternating rounds with ours (CPU) or by do_bench (GPU). Ours: the
module (``bigkernels <b>-bit``: on an AVX2 CPU, layers over the dense-cache budget run the kernel
(lookup tiles, then the panel engine from 12 rows, 9 at 8 bits); elsewhere its shape dispatch picks the kernel
or the dense product with the weight decoded, measured on its first call, which is the warm-up
outside the timing; the "path" column says which) and the bare kernel op (``codebook_mm
<b>-bit``). ``--sweep --bits 2,3,4,8`` sweeps every bit width (one layer per shape and width,
built once). The "kmeans" rows time ``bigkernels.quant.codebook.fit_codebook``
(histogram k-means + one exact Lloyd step + packing) on a Gaussian weight of that shape, with the
relative MSE of the shared weight; full CPU runs add torchao's prototype codebook k-means (the only
peer with weight-shared codebooks; its layer dequantises and calls F.linear) on 512 x 512.

``BENCH_CPU_TIME=1`` (CPU only): one thread, and each call timed by the thread's CPU time
(``time.thread_time``) instead of the wall clock, still in alternating rounds: on a machine shared
with other jobs this excludes the time the OS gave them, so the ratios measure the kernels rather
than the load (it cannot show 2-thread scaling or the memory bandwidth other jobs take).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bigkernels.nn import CodebookLinear
from bigkernels.quant.codebook import fit_codebook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SWEEP_HELP, SWEEP_KN, SWEEP_M, bench_main, header, metadata, print_worst,  # noqa: E402
                    time_cpu_interleaved, time_providers)

KN = [(4096, 4096), (4096, 14336), (14336, 4096)]


def grid(device: str, quick: bool, sweep: bool = False, bits=(4,)):
    """(M, K, N, bit widths): the issue's 4096 x 4096 at M = 1 first; full runs add the Llama-size
    MLP shapes, M = 16 / 128, every bit width at 4096^2 and a small layer (the edge of "never
    slower than dense", where the module must fall back to the dense product). ``sweep``: ``bits``
    (default 4) over SWEEP_M x SWEEP_KN."""
    if sweep:
        return [(m, k, n, tuple(bits)) for k, n in SWEEP_KN for m in SWEEP_M]
    if device == "cuda":
        ms = [1, 16] if quick else [1, 4, 16, 128, 2048]
        return [(m, 4096, 4096, (4,) if quick else (2, 3, 4, 8)) for m in ms] + \
            ([] if quick else [(m, k, n, (4,)) for m in (1, 16) for k, n in KN[1:]])
    if quick:
        return [(1, 4096, 4096, (4,)), (16, 4096, 4096, (4,))]
    cases = [(m, 4096, 4096, (2, 3, 4, 8)) for m in (1, 16, 128)]
    cases += [(m, k, n, (4,)) for m in (1, 16, 128) for k, n in KN[1:]]
    return cases + [(1, 256, 256, (4,)), (128, 256, 256, (4,))]


def providers(x: torch.Tensor, lin: torch.nn.Linear, bits_list, cache=None):
    """(name -> call, name -> the CodebookLinear behind it); ``cache`` (dict) keeps the layers
    built from ``lin`` for the next batch size (k-means on 4096^2 takes seconds)."""
    out: Dict[str, Callable] = {f"F.linear {str(x.dtype).split('.')[1]}": lambda: F.linear(x, lin.weight, lin.bias)}
    layers = {}
    cache = {} if cache is None else cache
    for bits in bits_list:
        layer = cache.get((id(lin), bits))
        if layer is None:
            layer = cache[(id(lin), bits)] = CodebookLinear.from_linear(lin, bits=bits)
        layers[f"bigkernels {bits}-bit"] = layer
        out[f"bigkernels {bits}-bit"] = lambda layer=layer: layer(x)
        out[f"codebook_mm {bits}-bit"] = (lambda layer=layer: torch.ops.bigkernels.codebook_mm(
            x, layer.indices, layer.centroids, layer.bias, layer._gs))
    return out, layers


def _rel_mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((w_hat.float() - w.float()).pow(2).mean() / w.float().pow(2).mean()).item()


def kmeans_rows(device: str, quick: bool, meta: dict) -> List[dict]:
    """fit_codebook's time and relative error per weight shape; full CPU runs also time torchao's
    prototype codebook k-means (AQLM's, with per-row scales) on a 512 x 512 weight, where it
    still finishes in about a minute (a 1024 x 1024 weight took 3 minutes here)."""
    from bigkernels.reference import codebook as ref

    rows = []
    shapes = [(4096, 4096)] if quick else [(512, 512), (4096, 4096), (14336, 4096)]
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        for bits in ((4,) if quick else (4, 8)):
            fit_codebook(w[:64], bits)  # warm-up
            t0 = time.perf_counter()
            packed, cent = fit_codebook(w, bits)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            err = _rel_mse(w, ref.codebook_dequantize(packed, cent, k, n))
            rows.append(dict(meta, kernel="kmeans", provider=f"bigkernels fit_codebook {bits}-bit", shape=f"{n}x{k}",
                             dtype="float32", ms=ms, ms_p20=ms, ms_p80=ms, rel_mse=err))
    if not quick and device == "cpu":
        try:
            from torchao.prototype.quantization.codebook import codebook_weight_only
            from torchao.quantization import quantize_
        except Exception:  # not installed, or its prototype API moved: no row
            return rows
        w = torch.randn(512, 512) * 0.02
        lin = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))
        lin[0].weight.data.copy_(w)
        t0 = time.perf_counter()
        quantize_(lin, codebook_weight_only(dtype=torch.uint4, block_size=(1, 1)))
        ms = (time.perf_counter() - t0) * 1e3
        rows.append(dict(meta, kernel="kmeans", provider="torchao codebook_weight_only uint4", shape="512x512",
                         dtype="float32", ms=ms, ms_p20=ms, ms_p80=ms, rel_mse=_rel_mse(w, lin[0].weight.dequantize())))
    return rows


def run(device: str, quick: bool, sweep: bool = False, bits: str = "4") -> List[dict]:
    cpu_time = device == "cpu" and os.environ.get("BENCH_CPU_TIME") == "1"
    if cpu_time:
        torch.set_num_threads(1)
    meta = metadata(device, "codebook_mm")
    meta["timing"] = "thread CPU time, 1 thread" if cpu_time else "wall clock"
    print(header(meta))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    bits_sweep = tuple(int(b) for b in bits.split(","))
    lins: Dict[tuple, torch.nn.Linear] = {}
    cache: dict = {}
    for m, k, n, bits_list in grid(device, quick, sweep, bits_sweep):
        if (k, n) not in lins:  # one layer per shape (and its codebook layers, in `cache`)
            lins.clear()
            cache.clear()
            torch.manual_seed(0)
            lins[(k, n)] = torch.nn.Linear(k, n, device=device, dtype=dtype)
        lin = lins[(k, n)]
        x = torch.randn(m, k, device=device, dtype=dtype)
        fns, layers = providers(x, lin, bits_list, cache)
        res = (time_cpu_interleaved(fns, quick, 4.0, clock=time.thread_time) if cpu_time
               else time_providers(fns, device, quick, budget_s=4.0))
        base = next(t[0] for name, t in res.items() if name.startswith("F.linear"))
        for name, (med, lo, hi) in res.items():
            path = layers[name]._routes.get(x) if name in layers else None
            rows.append(dict(meta, kernel="codebook_linear", provider=name, shape=f"{m}x{k}x{n}",
                             dtype=str(dtype).split(".")[1], ms=med, ms_p20=lo, ms_p80=hi, speedup=base / med,
                             tflops=2 * m * n * k / med / 1e9, path=path))
    if not sweep:
        rows += kmeans_rows(device, quick, meta)
    return rows


def print_table(rows: List[dict]) -> None:
    head = f"{'M x K x N':<18} {'provider':<36} {'ms':>10} {'TFLOP/s':>8} {'vs F.linear':>12}  note"
    if rows:
        print(f"# timing: {rows[0].get('timing', 'wall clock')}")
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        note = f"path {r['path']}" if r.get("path") else (f"rel. MSE {r['rel_mse']:.2e}" if "rel_mse" in r else "")
        print(f"{r['shape']:<18} {r['provider']:<36} {r['ms']:>10.4f} {r.get('tflops', 0.0):>8.3f} {extra:>12}  {note}")
    # the module (shape dispatch) must never lose to F.linear; the bare kernel op may
    print_worst([r for r in rows if r["provider"].startswith("bigkernels ") and "speedup" in r
                 and r["shape"].split("x", 1)[1] != "256x256"])


def main(argv=None):
    return bench_main(__doc__.split("\n")[0], run, print_table, argv,
                      options={"sweep": dict(action="store_true", help=SWEEP_HELP),
                               "bits": dict(default="4", help="--sweep: comma list of bit widths (default 4)")})


if __name__ == "__main__":
    main()
