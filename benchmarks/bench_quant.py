"""QuantLinear (w8a8, w8a16) vs the float nn.Linear it replaces, one process, same data.

    python benchmarks/bench_quant.py [--quick] [--sweep] [--device cpu|cuda] [--isa avx2|avx512|...]
                                     [--threads N] [--out FILE.json]

Baselines: ``F.linear`` in the float dtype a user runs on that device (bf16 on CUDA via cuBLAS,
fp32 on CPU), ``torch._int_mm`` + a separate dequantisation (CUDA), and torchao / bitsandbytes
when installed. Ours goes through the module (activation quantisation included for w8a8). The
"int8 core" rows time the bare int8 GEMM op (``torch.ops.bigkernels.int8_mm``) for TOPS. On the CPU,
"bigkernels dense_mm" rows (up to 32 rows of x) time the float-weight op the compressed layers'
shape dispatch also tries on their cached dense copies, on the layer's own fp32 weight.
QuantLinear's first call per shape measures its int8 path against the dense product and keeps the
faster (bigkernels.nn._dispatch); that call is the warm-up, outside the timing. ``--sweep`` times
every power-of-two M from 1 to 512 on 1024 x 1024 and 4096 x 4096 layers (the "never slower than
dense" check) and prints the lowest ratio per provider; ``--isa`` caps the CPU kernels'
instruction set (BIGKERNELS_CPU_ISA) to compare AVX2 and AVX-512 on one machine.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bigkernels.nn import QuantLinear, _dispatch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SWEEP_HELP, SWEEP_KN, SWEEP_M, bench_main, header, metadata, print_worst, time_providers  # noqa: E402

KN = [(4096, 4096), (4096, 14336), (14336, 4096)]


def grid(device: str, quick: bool, sweep: bool = False):
    """The issue's shapes, plus (full runs) a small layer: the edge of "never slower than dense",
    where QuantLinear must fall back to the dense product. ``sweep``: SWEEP_M x SWEEP_KN."""
    if sweep:
        return [(m, k, n) for k, n in SWEEP_KN for m in SWEEP_M]
    if device == "cuda":
        ms = [1, 16, 128, 2048] if quick else [1, 16, 128, 2048, 8192]
        cases = [(m, k, n) for m in ms for k, n in (KN[:1] if quick else KN)]
        return cases if quick else cases + [(1, 256, 256), (2048, 256, 256)]
    if quick:
        return [(1, 4096, 4096), (128, 4096, 4096)]
    return [(m, k, n) for m in (1, 16, 128) for k, n in KN] + [(1, 256, 256), (128, 256, 256)]


def providers(x: torch.Tensor, lin: torch.nn.Linear, device: str) -> Dict[str, Callable]:
    q8 = QuantLinear.from_linear(lin, mode="w8a8")
    q16 = QuantLinear.from_linear(lin, mode="w8a16")
    out: Dict[str, Callable] = {
        f"F.linear {str(x.dtype).split('.')[1]}": lambda: F.linear(x, lin.weight, lin.bias),
        "bigkernels w8a8": lambda: q8(x),
        "bigkernels w8a16": lambda: q16(x),
    }
    if device == "cpu" and _dispatch.dense_mm_applies(x):
        w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        out["bigkernels dense_mm"] = lambda: torch.ops.bigkernels.dense_mm(x, w, b)
    if device == "cuda":
        xq = torch.randint(-127, 128, x.shape, dtype=torch.int8, device=device)
        xs = torch.rand(x.shape[0], 1, device=device)
        if x.shape[0] > 16:  # torch._int_mm needs M > 16
            out["torch._int_mm + dequant"] = lambda: (torch._int_mm(xq, q8.weight_int8.t()) * xs
                                                      * q8.weight_scale).to(x.dtype)
        try:
            import copy

            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            ao = copy.deepcopy(torch.nn.Sequential(lin))
            quantize_(ao, Int8WeightOnlyConfig())
            out["torchao int8 weight-only"] = lambda: ao(x)
        except Exception:  # torchao not installed (or its API moved): no row
            pass
        try:
            import bitsandbytes as bnb

            lt = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                     has_fp16_weights=False, threshold=6.0)
            lt.load_state_dict(lin.state_dict())
            lt = lt.to(device)
            out["bitsandbytes Linear8bitLt"] = lambda: lt(x)
        except Exception:  # bitsandbytes not installed: no row
            pass
    return out


def int8_core_rows(device: str, quick: bool, meta: dict) -> List[dict]:
    m, k, n = (8192, 4096, 14336) if device == "cuda" and not quick else (128, 4096, 4096)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    fns = {"bigkernels int8_mm": lambda: torch.ops.bigkernels.int8_mm(a, b)}
    if device == "cuda":
        fns["torch._int_mm"] = lambda: torch._int_mm(a, b.t())
    res = time_providers(fns, device, quick)
    return [dict(meta, kernel="int8_mm", provider=name, shape=f"{m}x{k}x{n}", dtype="int8", ms=t[0], ms_p20=t[1],
                 ms_p80=t[2], tops=2 * m * n * k / t[0] / 1e9) for name, t in res.items()]


def run(device: str, quick: bool, sweep: bool = False) -> List[dict]:
    meta = metadata(device, "int8_scaled_mm")
    print(header(meta))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for m, k, n in grid(device, quick, sweep):
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, device=device, dtype=dtype)
        x = torch.randn(m, k, device=device, dtype=dtype)
        fns = providers(x, lin, device)
        res = time_providers(fns, device, quick, budget_s=4.0)
        base = next(t[0] for name, t in res.items() if name.startswith("F.linear"))
        for name, (med, lo, hi) in res.items():
            rows.append(dict(meta, kernel="quant_linear", provider=name, shape=f"{m}x{k}x{n}",
                             dtype=str(dtype).split(".")[1], ms=med, ms_p20=lo, ms_p80=hi,
                             speedup=base / med, tflops=2 * m * n * k / med / 1e9))
    if not sweep:
        rows += int8_core_rows(device, quick, meta)
    return rows


def print_table(rows: List[dict]) -> None:
    head = f"{'M x K x N':<20} {'provider':<28} {'ms':>9} {'TFLOP/s':>9} {'vs F.linear':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = f"{r['speedup']:.2f}x" if "speedup" in r else f"{r['tops']:.1f} TOPS"
        rate = r.get("tflops", r.get("tops", 0.0))
        print(f"{r['shape']:<20} {r['provider']:<28} {r['ms']:>9.4f} {rate:>9.2f} {extra:>12}")
    print_worst([r for r in rows if r["shape"].split("x", 1)[1] not in ("256x256",)])  # (256 x 256: below the rule's 1024)


def main(argv=None):
    return bench_main(__doc__.split("\n")[0], run, print_table, argv,
                      options={"sweep": dict(action="store_true", help=SWEEP_HELP)})


if __name__ == "__main__":
    main()
