"""Per-call cost of the C++ bindings (what the stable ABI adds: every tensor argument and accessor goes
through a C shim, list arguments are converted tensor by tensor, and the in-place ops bump versions
from a Python ADInplaceOrView kernel). Times ops whose kernels do almost nothing, so the binding is
what is measured:
  fused_adamw_ on T tensors of 16 elements (T = 1, 100, 2000), w8a16_mm / csr_mm at M = 1 on 64 x 64.
Compare two builds by running it under each (different processes; alternate them, the machine is noisy):
    PYTHONPATH=/path/to/build_a python benchmarks/bench_binding.py
    PYTHONPATH=/path/to/build_b python benchmarks/bench_binding.py
"""
import argparse
import json
import os
import time

import torch


def _time(fn, reps: int, rounds: int = 7) -> float:
    """Median over rounds of the mean time per call, in microseconds."""
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(out)[len(out) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import bigkernels

    info = bigkernels.info()
    assert info["extension_loaded"], info["extension_error"]
    torch.set_num_threads(1)
    ops = torch.ops.bigkernels
    rows = {}
    for t in (1, 100, 2000):
        ps = [torch.randn(16) for _ in range(t)]
        gs = [torch.randn(16) for _ in range(t)]
        m = [torch.zeros(16) for _ in range(t)]
        v = [torch.zeros(16) for _ in range(t)]
        s = [torch.tensor(0.0) for _ in range(t)]
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        rows[f"fused_adamw_ T={t} x 16"] = _time(lambda: ops.fused_adamw_(ps, gs, m, v, [], s, **kw),
                                                  max(5, 2000 // t))
    from bigkernels.reference import quant as rq
    from bigkernels.reference import sparse as rsp

    x, w = torch.randn(1, 64), torch.randn(64, 64)
    wi, ws = rq.quantize_weight(w)
    rows["w8a16_mm 1 x 64 x 64"] = _time(lambda: ops.w8a16_mm(x, wi, ws, None), 2000)
    crow, col, vals = rsp.to_csr(w * (torch.rand(64, 64) < 0.1))
    rows["csr_mm 1 x 64 x 64 (10%)"] = _time(lambda: ops.csr_mm(x, crow, col, vals, None), 2000)
    build = info.get("extension_build", "versioned (before the stable ABI)")
    if args.json:
        print(json.dumps({"torch": torch.__version__, "build": build, "us_per_call": rows}))
        return
    print(f"torch {torch.__version__}; bigkernels from {os.path.dirname(bigkernels.__file__)}; {build}")
    for name, us in rows.items():
        print(f"  {name:<28} {us:9.1f} us/call")


if __name__ == "__main__":
    main()
