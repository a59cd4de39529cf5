"""Distillation loss, forward + backward: bigkernels' fused kernels vs the PyTorch formulation,
speed and peak memory, one process (timing) and one fresh process per provider (CPU memory).

    python benchmarks/bench_distill.py            # CPU: 4,096 tokens x 32K vocabulary, fp32
    python benchmarks/bench_distill.py --quick    # small sizes (CI, bigkernels bench)
    python benchmarks/bench_distill.py --device cuda --out results.json   # 16K tokens x 128K, bf16

Cases (T = 2, batchmean, gradients to the student):
``kd_loss``  logits given. Baseline ``T² · F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T),
    log_target=True, reduction="batchmean")``; ours ``bk.nn.functional.kd_loss(s, t, temperature=T)``.
``fused_linear_kd_loss``  hidden states and head weights given (student H, teacher 2H; the teacher
    frozen). Baseline: both logits by ``h @ W.T`` and the same F.kl_div loss; ours
    ``bk.nn.functional.fused_linear_kd_loss`` (gradients to the student's hidden states and head).
Also ``torch.compile`` of the baseline on a GPU (the other thing a user would reach for).

Peak memory is what one forward + backward adds above its inputs (logits or hidden states and
weights): on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the resident-set high-water mark
(/proc VmHWM, reset through /proc/self/clear_refs) of a fresh process per provider, minus its
resident set just before the call — the process's real peak, whatever allocator holds it.
GPU times are triton.testing.do_bench medians; CPU times are medians of calls in alternating rounds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import bigkernels as bk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_main, header, metadata, time_providers  # noqa: E402

T = 2.0
BASELINE = "torch F.kl_div"


def grid(device: str, quick: bool) -> List[Tuple[str, int, int, int]]:
    """(kernel, tokens, vocabulary, student hidden size; 0 = logits given)."""
    if device == "cuda":
        return ([("kd_loss", 4096, 32000, 0), ("fused_linear_kd_loss", 4096, 32000, 1024)] if quick else
                [("kd_loss", 16384, 128256, 0), ("fused_linear_kd_loss", 16384, 128256, 4096),
                 ("kd_loss", 4096, 32000, 0), ("fused_linear_kd_loss", 4096, 32000, 2048)])
    if quick:
        return [("kd_loss", 512, 32000, 0), ("fused_linear_kd_loss", 256, 8192, 128)]
    return [("kd_loss", 4096, 32000, 0), ("fused_linear_kd_loss", 4096, 32000, 256), ("kd_loss", 1024, 128256, 0)]


def inputs(kernel: str, n: int, v: int, h: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    if kernel == "kd_loss":
        return dict(s=torch.randn(n, v, device=device, generator=g).mul_(3).to(dtype).requires_grad_(),
                    t=torch.randn(n, v, device=device, generator=g).mul_(3).to(dtype))
    return dict(hs=torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_(),
                ws=torch.randn(v, h, device=device, generator=g).div_(h ** 0.5).to(dtype).requires_grad_(),
                ht=torch.randn(n, 2 * h, device=device, generator=g).to(dtype),
                wt=torch.randn(v, 2 * h, device=device, generator=g).div_((2 * h) ** 0.5).mul_(3).to(dtype))


def _kl_div(s, t):
    """The PyTorch formulation: T² · KL(softmax(t/T) ‖ softmax(s/T)), batchmean over the rows."""
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                    reduction="batchmean") * (T * T)


def losses(kernel: str) -> Dict[str, Callable]:
    """provider -> loss(**inputs)."""
    if kernel == "kd_loss":
        return {BASELINE: lambda s, t: _kl_div(s, t),
                "bigkernels kd_loss": lambda s, t: bk.nn.functional.kd_loss(s, t, temperature=T)}
    return {BASELINE: lambda hs, ws, ht, wt: _kl_div(hs @ ws.T, ht @ wt.T),
            "bigkernels fused_linear_kd_loss": lambda hs, ws, ht, wt: bk.nn.functional.fused_linear_kd_loss(
                hs, ws, ht, wt, temperature=T)}


def step(loss_fn: Callable, args: dict) -> Callable:
    """One forward + backward (gradients of the inputs that require them, not accumulated)."""
    wrt = [a for a in args.values() if a.requires_grad]

    def run():
        with torch.enable_grad():
            return torch.autograd.grad(loss_fn(**args), wrt)

    return run


# ----- peak memory ------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_mb(kernel: str, n: int, v: int, h: int, provider: str) -> Optional[float]:
    """Peak resident MB one forward + backward adds above its inputs, in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_distill as b; print('PEAK_MB', b._cpu_peak_child({kernel!r}, {n}, {v}, {h}, {provider!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_MB"):
            value = line.split()[1]
            return None if value == "None" else float(value)
    print(f"  (peak memory of {provider} not measured: {out.stderr.strip()[-300:]})")
    return None


def _cpu_peak_child(kernel: str, n: int, v: int, h: int, provider: str) -> Optional[float]:
    args = inputs(kernel, n, v, h, "cpu", torch.float32)
    run = step(losses(kernel)[provider], args)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        return None
    before = _status_kb("VmRSS")
    grads = run()
    peak = _status_kb("VmHWM")
    del grads
    return (peak - before) / 1024


def cuda_peak_mb(run: Callable) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del grads
    return peak / 2 ** 20


def run(device: str, quick: bool) -> List[dict]:
    meta = metadata(device, "kd_loss_fwd")
    print(header(meta))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for kernel, n, v, h in grid(device, quick):
        args = inputs(kernel, n, v, h, device, dtype)
        fns = {name: step(fn, args) for name, fn in losses(kernel).items()}
        if device == "cuda":
            fns[f"{BASELINE} (torch.compile)"] = step(torch.compile(losses(kernel)[BASELINE]), args)
        # same results first (one call each): the comparison is only meaningful if they agree
        ref_grads = fns[BASELINE]()
        for name, fn in fns.items():
            for g, r in zip(fn(), ref_grads):
                err = (g.float() - r.float()).abs().max().item() / max(r.float().abs().max().item(), 1e-30)
                if err > (2e-2 if dtype != torch.float32 else 1e-4):
                    raise AssertionError(f"{kernel} {name}: gradient differs from {BASELINE} by {err:.3g} (relative)")
        del ref_grads
        if device == "cuda":
            peaks = {name: cuda_peak_mb(fn) for name, fn in fns.items()}
        elif quick:
            peaks = {name: None for name in fns}
        else:
            peaks = {name: cpu_peak_mb(kernel, n, v, h, name) for name in fns}
        res = time_providers(fns, device, quick, budget_s=20.0)
        base_ms, base_mb = res[BASELINE][0], peaks[BASELINE]
        shape = f"{n}x{v}" + (f" H={h}" if h else "")
        for name, (med, lo, hi) in res.items():
            mb = peaks[name]
            rows.append(dict(meta, kernel=kernel, provider=name, shape=shape, dtype=str(dtype).split(".")[1], ms=med,
                             ms_p20=lo, ms_p80=hi, speedup=base_ms / med, peak_mb=mb,
                             peak_vs_baseline=(mb / base_mb) if (mb is not None and base_mb) else None))
        del args, fns
    return rows


def print_table(rows: List[dict]) -> None:
    head = (f"{'kernel':<22} {'shape':<18} {'provider':<36} {'ms':>10} {'speedup':>8} {'peak MB':>9} "
            f"{'vs base':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        ratio = "-" if r["peak_vs_baseline"] is None else f"{r['peak_vs_baseline']:.3f}"
        print(f"{r['kernel']:<22} {r['shape']:<18} {r['provider']:<36} {r['ms']:>10.2f} {r['speedup']:>7.2f}x "
              f"{mb:>9} {ratio:>8}")
    print("(peak MB: memory one forward + backward adds above its inputs; speedup and peak vs the "
          f"{BASELINE} baseline)")


def main(argv=None):
    return bench_main(__doc__.split("\n")[0], run, print_table, argv)


if __name__ == "__main__":
    main()
