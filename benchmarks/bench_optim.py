"""Fused optimizer step time: bigkernels vs torch.optim (fused, foreach, for-loop), one process,
same parameters and gradients for every provider.

    python benchmarks/bench_optim.py            # full grid for this device
    python benchmarks/bench_optim.py --quick    # small sizes (CI, README command)
    python benchmarks/bench_optim.py --device cuda --out results.json

Effective bandwidth counts the bytes a step must move: AdamW reads param, grad, exp_avg,
exp_avg_sq and writes param, exp_avg, exp_avg_sq (7 accesses: 28 bytes/param in fp32); SGD with
momentum reads param, grad, buffer and writes param, buffer (5 accesses). ``adamw_pruned``: AdamW
on linears pruned 50% by bigkernels.prune_ (one more byte per param: the mask); bigkernels masks
inside its kernel, torch's optimizers get prune_'s post-step hook (one more pass). ``apply_masks``:
that hook's pass alone, bigkernels' op vs the ``_foreach_mul_`` it replaced ("vs torch fused" is
vs ``_foreach_mul_`` there; 9 bytes per param). Many small tensors (AdamW, >= 500 tensors) also
time ``FusedAdamW list state``: FusedAdamW keeping one tensor per param and state name (the layout
before flat state buffers: the op then converts five tensor lists per call instead of two). GPU times are
triton.testing.do_bench medians (20th/80th percentiles beside them); CPU times are medians of
wall-clock steps taken in alternating rounds across the providers.
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Callable, Dict, List

import torch

import bigkernels as bk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_main, header, metadata, time_cpu_interleaved, time_gpu, time_providers  # noqa: E402

ACCESSES = {"adamw": 7, "adamw_pruned": 7, "sgd": 5}


class _ListStateAdamW(bk.optim.FusedAdamW):
    """FusedAdamW with one state tensor per param (no flat buffers): the many-small-tensors baseline."""
    _flat_state = False


MANY_TENSORS = 500  # cases with at least this many tensors also time the list-state layout


def providers(kind: str, n: int = 0) -> Dict[str, Callable]:
    """name -> factory(params) for the optimizers compared for ``kind`` over ``n`` tensors."""
    if kind in ("adamw", "adamw_pruned"):
        many = {"bigkernels FusedAdamW list state": lambda ps: _ListStateAdamW(ps, lr=1e-3)} if (
            kind == "adamw" and n >= MANY_TENSORS) else {}
        return {
            "bigkernels FusedAdamW": lambda ps: bk.optim.FusedAdamW(ps, lr=1e-3), **many,
            "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
            "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "torch AdamW for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        }
    return {
        "bigkernels FusedSGD": lambda ps: bk.optim.FusedSGD(ps, lr=1e-3, momentum=0.9),
        "torch SGD fused": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
        "torch SGD foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        "torch SGD for-loop": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=False),
    }


def cases(device: str, quick: bool) -> List[dict]:
    """(kind, number of tensors, elements per tensor, dtype) per case."""
    if device == "cuda":
        if quick:
            return [dict(kind=k, n=256, numel=1 << 18, dtype=torch.float32) for k in ACCESSES] + [
                dict(kind="adamw", n=2000, numel=4096, dtype=torch.float32)]
        big = 1_000_000_000 // 256
        return [
            dict(kind="adamw", n=256, numel=big, dtype=torch.float32),
            dict(kind="adamw_pruned", n=256, numel=big, dtype=torch.float32),
            dict(kind="adamw", n=2000, numel=4096, dtype=torch.float32),
            dict(kind="adamw", n=256, numel=big, dtype=torch.bfloat16),
            dict(kind="sgd", n=256, numel=big, dtype=torch.float32),
            dict(kind="sgd", n=2000, numel=4096, dtype=torch.float32),
        ]
    if quick:
        return [dict(kind="adamw", n=16, numel=1 << 18, dtype=torch.float32),
                dict(kind="adamw_pruned", n=16, numel=1 << 18, dtype=torch.float32),
                dict(kind="adamw", n=500, numel=4096, dtype=torch.float32),
                dict(kind="sgd", n=16, numel=1 << 18, dtype=torch.float32)]
    return [
        dict(kind="adamw", n=64, numel=50_000_000 // 64, dtype=torch.float32),
        dict(kind="adamw_pruned", n=64, numel=50_000_000 // 64, dtype=torch.float32),
        dict(kind="adamw", n=2000, numel=4096, dtype=torch.float32),
        dict(kind="adamw", n=64, numel=50_000_000 // 64, dtype=torch.bfloat16),
        dict(kind="sgd", n=64, numel=50_000_000 // 64, dtype=torch.float32),
    ]


def make_params(case: dict, device: str):
    """(params, keep-alive): flat tensors, or for ``adamw_pruned`` the weights of linears of
    ``numel`` = 1024 x (numel / 1024) elements pruned 50% (unstructured) by bigkernels.prune_."""
    if case["kind"] != "adamw_pruned":
        return [torch.randn(case["numel"], device=device).to(case["dtype"]).requires_grad_()
                for _ in range(case["n"])], None
    rows = case["numel"] // 1024
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, rows, bias=False) for _ in range(case["n"])])
    model = bk.prune_(model.to(device=device, dtype=case["dtype"]), sparsity=0.5)
    return [m.weight for m in model], model


def time_optimizers(factories: Dict[str, Callable], params, device: str, quick: bool, **cpu_kw) -> Dict[str, tuple]:
    """(median, p20, p80) ms per ``step()`` of the optimizer each factory makes over ``params``: on
    a GPU one optimizer (and its state) at a time; on the CPU all at once, timed in alternating rounds
    after a first step (state creation out of the timing; ``cpu_kw`` goes to time_cpu_interleaved)."""
    results: Dict[str, tuple] = {}
    if device == "cuda":  # one optimizer's state at a time (1B params: 8 GB each)
        for name, make in factories.items():
            opt = make(params)
            results[name] = time_gpu(opt.step, quick)
            del opt
            gc.collect()
            torch.cuda.empty_cache()
        return results
    opts = {name: make(params) for name, make in factories.items()}
    for opt in opts.values():
        opt.step()
    results = time_cpu_interleaved({name: opt.step for name, opt in opts.items()}, quick, **cpu_kw)
    del opts
    gc.collect()
    return results


def run_case(case: dict, device: str, quick: bool, meta: dict) -> List[dict]:
    torch.manual_seed(0)
    params, model = make_params(case, device)
    for p in params:
        p.grad = torch.randn_like(p)
    total = sum(p.numel() for p in params)
    bytes_moved = ACCESSES[case["kind"]] * total * params[0].element_size()
    if model is not None:
        bytes_moved += total  # the bool masks
    results = time_optimizers(providers(case["kind"], case["n"]), params, device, quick)
    baseline = next((name for name in results if name.endswith("fused")), None)
    return result_rows(meta, f"optim_{case['kind']}", f"{case['n']}x{params[0].numel()}", case["dtype"], total,
                       bytes_moved, results, baseline)


def result_rows(meta: dict, kernel: str, shape: str, dtype: torch.dtype, total: int, bytes_moved: int,
                results: Dict[str, tuple], baseline) -> List[dict]:
    """One JSON row per provider; ``speedup_vs_torch_fused`` is vs the ``baseline`` provider."""
    base = results[baseline][0] if baseline else None
    return [dict(meta, kernel=kernel, provider=name, shape=shape, params=total, dtype=str(dtype).split(".")[1],
                 ms=med, ms_p20=lo, ms_p80=hi, gparams_per_s=total / med / 1e6,
                 effective_tb_per_s=bytes_moved / med / 1e9, speedup_vs_torch_fused=base / med if base else None)
            for name, (med, lo, hi) in results.items()]


def print_table(rows: List[dict]) -> None:
    rows = [r for r in rows if "kernel" in r]  # the code-error rows print their own table
    if not rows:
        return
    header = f"{'case':<34} {'provider':<26} {'ms/step':>9} {'Gparam/s':>9} {'eff TB/s':>9} {'vs torch fused':>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        case = f"{r['kernel'][6:]} {r['shape']} {r['dtype']}"
        sp = f"{r['speedup_vs_torch_fused']:.2f}x" if r["speedup_vs_torch_fused"] else "-"
        print(f"{case:<34} {r['provider']:<26} {r['ms']:>9.3f} {r['gparams_per_s']:>9.2f} "
              f"{r['effective_tb_per_s']:>9.3f} {sp:>15}")


def run_masks_case(device: str, quick: bool, meta: dict) -> List[dict]:
    """The pass prune_'s hook makes after a torch.optim step: ``apply_masks_`` vs the
    ``_foreach_mul_`` by bool masks it replaced (reads weight + mask, writes weight)."""
    n, numel = (16, 1 << 18) if quick else ((256, 1_000_000_000 // 256) if device == "cuda" else (48, 1 << 20))
    torch.manual_seed(0)
    ws = [torch.randn(numel, device=device) for _ in range(n)]
    ks = [torch.rand(numel, device=device) > 0.5 for _ in range(n)]
    fns = {"bigkernels apply_masks_": lambda: bk.ops.optim.apply_masks_(ws, ks),
           "torch _foreach_mul_ (bool)": lambda: torch._foreach_mul_(ws, ks)}
    res = time_providers(fns, device, quick)
    return result_rows(meta, "optim_apply_masks", f"{n}x{numel}", torch.float32, n * numel, 9 * n * numel, res,
                       "torch _foreach_mul_ (bool)")


def run(device: str, quick: bool) -> List[dict]:
    meta = metadata(device, "fused_adamw_")
    print(header(meta) + f" | backend {meta['backend']}")
    only = os.environ.get("BENCH_OPTIM_ONLY")
    if only == "new":  # RMSprop / Adafactor / Lion only
        return run_new_optimizers(device, quick, meta)
    if only == "8bit":  # AdamW8bit only
        return run_8bit(device, quick, meta)
    if only == "8bit_codes":  # AdamW8bit's codes vs bitsandbytes' dynamic map (quantisation error)
        return code_error_8bit()
    if only == "many":  # the many-small-tensors AdamW case only (flat state vs list state)
        with torch.enable_grad():
            return run_case(next(c for c in cases(device, quick) if c["n"] >= MANY_TENSORS), device, quick, meta)
    rows = []
    for case in cases(device, quick):
        with torch.enable_grad():  # the optimizers' state and steps, as in training
            rows += run_case(case, device, quick, meta)
    return (rows + run_masks_case(device, quick, meta) + run_new_optimizers(device, quick, meta)
            + run_8bit(device, quick, meta))


# ----- RMSprop, Adafactor, Lion (issue 12) -----------------------------------------------------------
# bigkernels vs torch's own implementations (torch has no fused RMSprop / Adafactor and no Lion: its
# foreach and for-loop paths; Lion's baseline is bigkernels.reference.optim.Lion, the authors' plain
# PyTorch formula). "vs torch fused" in these rows is vs the fastest torch provider of the case.
# BENCH_OPTIM_ONLY=new python benchmarks/bench_optim.py   runs only these cases.
# Accesses per param: RMSprop reads p, g, square_avg, writes p, square_avg (5); Lion reads p, g,
# exp_avg, writes p, exp_avg (5); Adafactor (factored) reads g three times and p twice and writes p
# once (6, the states are rows + cols).
NEW_ACCESSES = {"rmsprop": 5, "rmsprop_centered_momentum": 9, "adafactor": 6, "lion": 5}


def new_providers(kind: str) -> Dict[str, Callable]:
    """name -> factory(params) for ``kind`` in NEW_ACCESSES."""
    from bigkernels.reference.optim import Lion

    if kind.startswith("rmsprop"):
        kw = dict(lr=1e-3, centered=True, momentum=0.9) if kind != "rmsprop" else dict(lr=1e-3)
        return {"bigkernels FusedRMSprop": lambda ps: bk.optim.FusedRMSprop(ps, **kw),
                "torch RMSprop foreach": lambda ps: torch.optim.RMSprop(ps, foreach=True, **kw),
                "torch RMSprop for-loop": lambda ps: torch.optim.RMSprop(ps, foreach=False, **kw)}
    if kind == "adafactor":
        return {"bigkernels FusedAdafactor": lambda ps: bk.optim.FusedAdafactor(ps, lr=1e-3),
                "torch Adafactor foreach": lambda ps: torch.optim.Adafactor(ps, lr=1e-3, foreach=True),
                "torch Adafactor for-loop": lambda ps: torch.optim.Adafactor(ps, lr=1e-3, foreach=False)}
    return {"bigkernels FusedLion": lambda ps: bk.optim.FusedLion(ps, lr=1e-4, weight_decay=0.1),
            "plain-torch Lion foreach": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.1, foreach=True),
            "plain-torch Lion for-loop": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.1, foreach=False)}


def new_cases(device: str, quick: bool) -> List[dict]:
    """(kind, n tensors, shape of each, dtype): 50M params as 64 matrices of 1024 x 763 on the
    CPU (1B as 256 x 4096 x 954 on a GPU), and 2,000 matrices of 64 x 64."""
    if quick:
        big = dict(n=16, shape=(512, 512))
    elif device == "cuda":
        big = dict(n=256, shape=(4096, 954))
    else:
        big = dict(n=64, shape=(1024, 763))
    small = dict(n=500 if quick else 2000, shape=(64, 64))
    kinds = ["rmsprop", "adafactor", "lion"]
    out = [dict(kind=k, dtype=torch.float32, **big) for k in kinds]
    if not quick:
        out += [dict(kind="rmsprop_centered_momentum", dtype=torch.float32, **big),
                dict(kind="lion", dtype=torch.bfloat16, **big)]
    return out + [dict(kind=k, dtype=torch.float32, **small) for k in kinds]


def run_new_case(case: dict, device: str, quick: bool, meta: dict) -> List[dict]:
    torch.manual_seed(0)
    params = [torch.randn(case["shape"], device=device).to(case["dtype"]).requires_grad_() for _ in range(case["n"])]
    for p in params:
        p.grad = torch.randn_like(p)
    total = sum(p.numel() for p in params)
    bytes_moved = NEW_ACCESSES[case["kind"]] * total * params[0].element_size()
    results = time_optimizers(new_providers(case["kind"]), params, device, quick)
    best_torch = min((name for name in results if not name.startswith("bigkernels")), key=lambda n: results[n][0])
    shape = f"{case['n']}x{'x'.join(map(str, case['shape']))}"
    return result_rows(meta, f"optim_{case['kind']}", shape, case["dtype"], total, bytes_moved, results, best_torch)


def run_new_optimizers(device: str, quick: bool, meta: dict) -> List[dict]:
    rows = []
    for case in new_cases(device, quick):
        with torch.enable_grad():
            rows += run_new_case(case, device, quick, meta)
    return rows


# ----- AdamW8bit (issue 12) --------------------------------------------------------------------------
# bigkernels AdamW8bit vs our FusedAdamW (the target: <= 1.2x its time at 50M params on the CPU), torch's
# fused AdamW, and bitsandbytes' / torchao's 8-bit AdamW where they import and step on this device (a
# printed reason otherwise). "vs torch fused" in these rows is vs torch AdamW fused. The peers are much
# slower on the CPU, so they are timed in a second alternating group (fewer rounds) with AdamW8bit again,
# whose row there ("bigkernels AdamW8bit (peer group)") gives their ratio to ours from the same rounds.
# BENCH_OPTIM_ONLY=8bit python benchmarks/bench_optim.py   runs only these cases;
# BENCH_OPTIM_PEERS=0 skips bitsandbytes / torchao.
# Bytes per param: AdamW8bit reads p, g and 2 one-byte codes (+ scales), writes p and the codes:
# 4 + 4 + 2 + 4 + 2 = 16 B in fp32 (FusedAdamW: 28).


def providers_8bit() -> Dict[str, Callable]:
    return {"bigkernels AdamW8bit": lambda ps: bk.optim.AdamW8bit(ps, lr=1e-3),
            "bigkernels FusedAdamW": lambda ps: bk.optim.FusedAdamW(ps, lr=1e-3),
            "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}


def peers_8bit() -> Dict[str, Callable]:
    """bitsandbytes' and torchao's 8-bit AdamW factories that import here (reasons printed otherwise)."""
    out: Dict[str, Callable] = {}
    try:
        import bitsandbytes as bnb

        out[f"bitsandbytes AdamW8bit {bnb.__version__}"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        print(f"  skipped bitsandbytes AdamW8bit: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    try:
        import torchao
        from torchao.optim import AdamW8bit as AoAdamW8bit

        out[f"torchao AdamW8bit {torchao.__version__}"] = lambda ps: AoAdamW8bit(ps, lr=1e-3)
    except Exception as e:  # noqa: BLE001
        print(f"  skipped torchao AdamW8bit: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return out


def cases_8bit(device: str, quick: bool) -> List[dict]:
    if quick:
        return [dict(n=16, numel=1 << 18)]
    if device == "cuda":
        return [dict(n=256, numel=1_000_000_000 // 256)]
    return [dict(n=64, numel=50_000_000 // 64)]


def run_8bit(device: str, quick: bool, meta: dict) -> List[dict]:
    rows = []
    for case in cases_8bit(device, quick):
        with torch.enable_grad():
            torch.manual_seed(0)
            params = [torch.randn(case["numel"], device=device).requires_grad_() for _ in range(case["n"])]
            for p in params:
                p.grad = torch.randn_like(p)
            total = sum(p.numel() for p in params)
            shape = f"{case['n']}x{case['numel']}"
            groups = [providers_8bit()]
            if os.environ.get("BENCH_OPTIM_PEERS", "1") != "0":
                peers = {}
                for name, make in peers_8bit().items():
                    try:  # a peer that cannot step on this device is skipped with its reason
                        opt = make(params)
                        opt.step()
                        peers[name] = make
                        del opt
                    except Exception as e:  # noqa: BLE001
                        print(f"  skipped {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    gc.collect()
                if peers:
                    groups.append({"bigkernels AdamW8bit (peer group)": providers_8bit()["bigkernels AdamW8bit"],
                                   **peers})
            results: Dict[str, tuple] = {}
            for gi, group in enumerate(groups):
                results.update(time_optimizers(group, params, device, quick,
                                               **({} if gi == 0 else dict(budget_s=0.0, min_rounds=3))))
            for name, res in results.items():
                moved = (16 if "8bit" in name.lower() else 28) * total
                rows += result_rows(meta, "optim_adamw8bit", shape, torch.float32, total, moved,
                                    {name: res, "torch AdamW fused": results["torch AdamW fused"]},
                                    "torch AdamW fused")[:1]
            ours, fused = results["bigkernels AdamW8bit"][0], results["bigkernels FusedAdamW"][0]
            print(f"  AdamW8bit / FusedAdamW time at {shape}: {ours / fused:.3f}x (target <= 1.2x on the CPU)")
            if len(groups) > 1:
                mine = results["bigkernels AdamW8bit (peer group)"][0]
                for name in groups[1]:
                    if name != "bigkernels AdamW8bit (peer group)":
                        print(f"  {name} / AdamW8bit (same rounds): {results[name][0] / mine:.2f}x")
            del params
            gc.collect()
    return rows


def code_error_8bit(n: int = 1 << 20, block: int = 256, steps: int = 200) -> List[dict]:
    """Quantisation error of AdamW8bit's codes vs bitsandbytes' dynamic maps (``create_dynamic_map``,
    signed for exp_avg, unsigned for exp_avg_sq, applied as a blockwise absmax nearest-code quantiser:
    an emulation of the map, not bitsandbytes' kernel) on Adam moments after ``steps`` EMA steps of
    gradients whose per-element scale is log-normal (sigma 1.5: magnitudes over several decades, as
    across a weight matrix). Reports the relative error of the Adam denominator sqrt(v), the error of
    the update m / (sqrt(v) + eps), and how many non-zero v are stored as 0."""
    from bigkernels.reference import optim as ref

    try:
        import bitsandbytes.functional as bnbf

        maps = {"bitsandbytes dynamic map": (bnbf.create_dynamic_map(signed=True),
                                             bnbf.create_dynamic_map(signed=False))}
    except Exception as e:  # noqa: BLE001
        print(f"  skipped bitsandbytes' dynamic map: {type(e).__name__}: {e}")
        maps = {}
    g = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(n, generator=g) * 1.5)
    m, v = torch.zeros(n), torch.zeros(n)
    for _ in range(steps):
        grad = torch.randn(n, generator=g) * scale
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad * grad

    def nearest(x, qmap):
        xb = x.view(-1, block)
        s = xb.abs().amax(1, keepdim=True)
        y = (xb / s).reshape(-1)
        out = torch.empty_like(y)
        for i in range(0, y.numel(), 1 << 16):
            out[i:i + (1 << 16)] = qmap[(y[i:i + (1 << 16), None] - qmap[None, :]).abs().argmin(1)]
        return (out.view_as(xb) * s).reshape(-1)

    results = {name: (nearest(m, qs), nearest(v, qu)) for name, (qs, qu) in maps.items()}
    codes = ref.quantize_adamw8bit_state(m, v, block)
    results["bigkernels AdamW8bit codes"] = ref.dequantize_adamw8bit_state(*codes, block)
    u = m / (v.sqrt() + 1e-8)
    rows = []
    print(f"{'codes':<30} {'sqrt(v) rel err p50':>20} {'update err p50':>15} {'p99':>10} {'max':>10} {'v>0 stored 0':>13}")
    for name, (mq, vq) in results.items():
        root = vq.clamp(min=0).sqrt()
        err = (mq / (root + 1e-8) - u).abs()
        row = dict(codes=name, denom_rel_err_p50=float(((root - v.sqrt()).abs() / v.sqrt()).median()),
                   update_err_p50=float(err.median()), update_err_p99=float(err.quantile(0.99)),
                   update_err_max=float(err.max()), v_zeroed=int(((vq == 0) & (v > 0)).sum()))
        rows.append(row)
        print(f"{name:<30} {row['denom_rel_err_p50']:>20.4f} {row['update_err_p50']:>15.4f} "
              f"{row['update_err_p99']:>10.3g} {row['update_err_max']:>10.3g} {row['v_zeroed']:>13}")
    print(f"  (median |update| {float(u.abs().median()):.3f}; {n} elements, blocks of {block})")
    return rows


def main(argv=None) -> List[dict]:
    return bench_main(__doc__.split("\n")[0], run, print_table, argv)


if __name__ == "__main__":
    main()
