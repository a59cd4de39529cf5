"""The ``bigkernels`` command (also ``python -m bigkernels``): ``info``, ``demo``, ``bench``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _print_info(as_json: bool) -> int:
    import bigkernels

    data = bigkernels.info()
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    ops = data.pop("ops")
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "none"
        print(f"{key:<22} {value}")
    print()
    devices = sorted({d for o in ops.values() for d in o["uses"]})
    header = f"{'op':<18} {'available backends':<40} " + " ".join(f"{d + ' uses':<12}" for d in devices)
    print(header)
    print("-" * len(header))
    for name, o in ops.items():
        print(f"{name:<18} {', '.join(o['available']):<40} " + " ".join(f"{o['uses'][d]:<12}" for d in devices))
    return 0


def _writable_dir(path: str) -> Optional[str]:
    """None if ``path`` can be created and written, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".bigkernels_write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def _device_and_out(command: str, args) -> Optional[str]:
    """The device to run on, or None after saying (on stderr) why --device or --out cannot be used."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"bigkernels {command}: --device cuda, but torch sees no CUDA GPU here "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Run on the CPU with --device cpu.",
              file=sys.stderr)
        return None
    problem = _writable_dir(args.out)
    if problem:
        print(f"bigkernels {command}: cannot write to --out {os.path.abspath(args.out)} ({problem}); "
              "choose a writable folder with --out DIR", file=sys.stderr)
        return None
    return device


def _demo(args) -> int:
    import bigkernels
    from bigkernels.ops._extension import BUILD_HINT

    if args.steps is not None and args.steps <= 0:
        print(f"bigkernels demo: --steps must be positive, got {args.steps}", file=sys.stderr)
        return 2
    device = _device_and_out("demo", args)
    if device is None:
        return 2
    if not bigkernels.info()["extension_loaded"]:
        print(f"bigkernels demo: the compiled kernels are not built, so this runs on the slow reference "
              f"implementations; {BUILD_HINT}.", file=sys.stderr)
    from bigkernels.demo.run import run

    run(device=device, size=args.size, steps=args.steps, out=args.out, seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty())
    return 0


def _bench(args) -> int:
    from bigkernels import bench

    device = _device_and_out("bench", args)
    if device is None:
        return 2
    try:
        bench.benchmarks_dir()
    except FileNotFoundError as exc:
        print(f"bigkernels bench: {exc}", file=sys.stderr)
        return 2
    bench.run(device, args.full, args.out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bigkernels", description="bigkernels: fast kernels for big PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, CPU features, and which kernel each op uses here")
    p_info.add_argument("--json", action="store_true", help="print the info() dict as JSON")
    p_demo = sub.add_parser("demo", help="train a small GPT on Python's sources, compress it, compare variants")
    p_demo.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p_demo.add_argument("--size", choices=["tiny", "small", "base"], default=None,
                        help="model size (default: small on cpu, base on cuda)")
    p_demo.add_argument("--steps", type=int, default=None, help="training steps (default per size)")
    p_demo.add_argument("--out", default="bigkernels_demo", help="folder for demo.json and demo.png")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_bench = sub.add_parser("bench", help="the benchmark families on this device: table, JSON, bar chart")
    p_bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p_bench.add_argument("--full", action="store_true", help="the full grids of benchmarks/ (slow on a CPU)")
    p_bench.add_argument("--out", default="bigkernels_bench", help="folder for bench.json and bench.png")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "info":
        return _print_info(args.json)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
