"""Timing, metadata and output shared by the benchmark scripts (GPU: triton.testing.do_bench;
CPU: medians of wall-clock calls in alternating rounds)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

import bigkernels as bk


def time_gpu(fn: Callable, quick: bool):
    """(median, p20, p80) ms per call: triton.testing.do_bench (CUDA events, L2 flushed)."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=50 if quick else 200, rep=200 if quick else 1000,
                                         quantiles=[0.5, 0.2, 0.8]))


def time_cpu_interleaved(fns: Dict[str, Callable], quick: bool, budget_s: float = 10.0) -> Dict[str, tuple]:
    """(median, p20, p80) ms per call for each function, timed in alternating rounds: this VM's
    memory bandwidth switches between ~100 and ~64 GB/s every second or two, so timing one
    provider after another would compare the machine's states, not the kernels."""
    for fn in fns.values():
        fn()  # warm-up: first-call work out of the timing
    times: Dict[str, List[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + (1.5 if quick else budget_s)
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    out = {}
    for name, ts in times.items():
        qs = statistics.quantiles(ts, n=10)
        out[name] = (statistics.median(ts), qs[1], qs[7])
    return out


def time_providers(fns: Dict[str, Callable], device: str, quick: bool, budget_s: float = 10.0) -> Dict[str, tuple]:
    """(median, p20, p80) ms per call of each function: do_bench one after another on a GPU,
    alternating rounds on the CPU (see time_cpu_interleaved)."""
    if device == "cuda":
        return {name: time_gpu(fn, quick) for name, fn in fns.items()}
    return time_cpu_interleaved(fns, quick, budget_s=budget_s)


def metadata(device: str, backend_op: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return dict(device=device, device_name=name, cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version, bigkernels=bk.__version__,
                backend=bk.ops._registry.choose(backend_op, device), date=datetime.date.today().isoformat())


def header(meta: dict) -> str:
    return (f"# {meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | bigkernels {meta['bigkernels']}"
            f" | threads {meta['cpu_threads']} | {meta['date']}")


def write_json(rows: List[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")


def bench_main(description: str, run: Callable[[str, bool], List[dict]], print_table: Callable[[List[dict]], None],
               argv: Optional[List[str]] = None) -> List[dict]:
    """The command line every bench_*.py shares: --device, --quick, --out; runs, prints, writes."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes, short timing (CI, README, bigkernels bench)")
    ap.add_argument("--out", default=None, help="JSON file for the rows (default: print only)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible to torch; run with --device cpu")
    with torch.no_grad():
        rows = run(args.device, args.quick)
    print_table(rows)
    if args.out:
        write_json(rows, args.out)
    return rows
