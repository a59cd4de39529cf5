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


def time_cpu_interleaved(fns: Dict[str, Callable], quick: bool, budget_s: float = 10.0,
                         min_rounds: int = 5) -> Dict[str, tuple]:
    """(median, p20, p80) ms per call for each function, timed in alternating rounds: this VM's
    memory bandwidth switches between ~100 and ~64 GB/s every second or two, so timing one
    provider after another would compare the machine's states, not the kernels. At least
    ``min_rounds`` rounds (3 is the least that gives quantiles), more while ``budget_s`` lasts."""
    for fn in fns.values():
        fn()  # warm-up: first-call work out of the timing
    times: Dict[str, List[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + (1.5 if quick else budget_s)
    rounds = 0
    min_rounds = max(3, min_rounds)
    while rounds < min_rounds or (time.perf_counter() < deadline and rounds < 200):
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


def time_providers(fns: Dict[str, Callable], device: str, quick: bool, budget_s: float = 10.0,
                   min_rounds: int = 5) -> Dict[str, tuple]:
    """(median, p20, p80) ms per call of each function: do_bench one after another on a GPU,
    alternating rounds on the CPU (see time_cpu_interleaved)."""
    if device == "cuda":
        return {name: time_gpu(fn, quick) for name, fn in fns.items()}
    return time_cpu_interleaved(fns, quick, budget_s=budget_s, min_rounds=min_rounds)


def metadata(device: str, backend_op: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    from bigkernels._info import cpu_kernel_isa

    return dict(device=device, device_name=name, cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version, bigkernels=bk.__version__,
                backend=bk.ops._registry.choose(backend_op, device), date=datetime.date.today().isoformat(),
                cpu_isa=cpu_kernel_isa(), cpu_count=os.cpu_count(), load_avg=load_average())


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes) where the OS reports one: above the number
    of CPUs, other processes were competing with the benchmark for them."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def header(meta: dict) -> str:
    return (f"# {meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | bigkernels {meta['bigkernels']}"
            f" | threads {meta['cpu_threads']} | CPU kernels {meta['cpu_isa']} | load {meta['load_avg']}"
            f" on {meta['cpu_count']} CPUs | {meta['date']}")


def write_json(rows: List[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")


ISA_CHOICES = ("native", "avx512_bf16", "avx512", "avx2", "scalar")


def bench_main(description: str, run: Callable[..., List[dict]], print_table: Callable[[List[dict]], None],
               argv: Optional[List[str]] = None, options: Optional[Dict[str, dict]] = None) -> List[dict]:
    """The command line every bench_*.py shares: --device, --quick, --out, --isa (caps the CPU
    kernels' instruction set: BIGKERNELS_CPU_ISA), --threads; runs, prints, writes. ``options``:
    extra flags (name -> argparse keywords), passed to ``run(device, quick, **values)``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes, short timing (CI, README, bigkernels bench)")
    ap.add_argument("--out", default=None, help="JSON file for the rows (default: print only)")
    ap.add_argument("--isa", default="native", choices=ISA_CHOICES,
                    help="cap the CPU kernels' instruction set (sets BIGKERNELS_CPU_ISA; default: the CPU's best)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides (default: torch's)")
    for name, kwargs in (options or {}).items():
        ap.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible to torch; run with --device cpu")
    if args.isa != "native":
        os.environ["BIGKERNELS_CPU_ISA"] = args.isa
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows = run(args.device, args.quick, **{name: getattr(args, name) for name in (options or {})})
    print_table(rows)
    print(f"# load average at the end: {load_average()} on {os.cpu_count()} CPUs")
    if args.out:
        write_json(rows, args.out)
    return rows


SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SWEEP_KN = ((1024, 1024), (4096, 4096))
SWEEP_HELP = ("the 'never slower than dense' sweep: every power-of-two M from 1 to 512 on 1024 x 1024 and "
              "4096 x 4096 layers (instead of the issue's grid)")


def print_worst(rows: List[dict], group_keys=("provider",), floor: float = 0.95) -> None:
    """Per bigkernels provider (and group_keys): the lowest speedup over the rows and where, flagged
    when under ``floor`` (the README's 'never slower than the layer it replaced')."""
    worst: Dict[tuple, dict] = {}
    for r in rows:
        if "speedup" not in r or not r["provider"].startswith("bigkernels"):
            continue
        key = tuple(r.get(k) for k in group_keys)
        if key not in worst or r["speedup"] < worst[key]["speedup"]:
            worst[key] = r
    if not worst:
        return
    print(f"lowest speedup per case (flagged below {floor}x):")
    for key, r in worst.items():
        flag = "  <-- below" if r["speedup"] < floor else ""
        print(f"  {' '.join(str(k) for k in key):<40} {r['speedup']:.2f}x at {r['shape']}{flag}")
