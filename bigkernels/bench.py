"""``bigkernels bench``: the benchmark families (optimizers, int8 layers, sparse layers,
distillation losses, weight-shared codebook layers) on this device, one summary table, JSON and a bar chart. The benchmark scripts live in the source
tree's ``benchmarks/`` folder (an editable install, as the README's commands make)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Dict, List

FAMILIES = ("bench_optim", "bench_quant", "bench_sparse", "bench_distill", "bench_codebook")
BASELINES = ("torch AdamW fused", "torch SGD fused", "F.linear", "dense F.linear", "torch F.kl_div")


def benchmarks_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "benchmarks")
    if not os.path.isfile(os.path.join(path, "bench_optim.py")):
        raise FileNotFoundError(
            f"bigkernels bench needs the source tree's benchmarks/ folder (looked in {path}); install bigkernels "
            "from a clone with `pip install --no-build-isolation -e .` and run it there")
    return path


def _load(name: str):
    path = benchmarks_dir()
    if path not in sys.path:
        sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summarize(rows: List[dict]) -> List[dict]:
    """One line per bigkernels row: its case, the baseline's ms, ours, and the speedup."""
    out = []
    for r in rows:
        if not r["provider"].startswith("bigkernels") or r.get("kernel") == "int8_mm":
            continue
        case = {k: r.get(k) for k in ("kernel", "shape", "dtype", "pattern", "sparsity")}
        base = next((b for b in rows if all(b.get(k) == v for k, v in case.items())
                     and any(b["provider"].startswith(p) for p in BASELINES)), None)
        if base is None:
            continue
        label = f"{r['kernel']} {r['shape']}" + (f" {r['pattern']} {int(r['sparsity'] * 100)}%" if r.get("pattern") else "")
        out.append(dict(case=label, dtype=r.get("dtype"), provider=r["provider"], baseline=base["provider"],
                        baseline_ms=base["ms"], ours_ms=r["ms"], speedup=base["ms"] / r["ms"]))
    return out


def format_summary(summary: List[dict]) -> str:
    head = f"{'case':<44} {'ours':<38} {'baseline':<22} {'base ms':>9} {'ours ms':>9} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(f"{s['case']:<44} {s['provider']:<38} {s['baseline']:<22} {s['baseline_ms']:>9.3f} "
                     f"{s['ours_ms']:>9.3f} {s['speedup']:>7.2f}x")
    return "\n".join(lines)


def plot(summary: List[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{s['case']} [{s['provider'].replace('bigkernels ', '')}]" for s in summary]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.5))
    ax.barh(range(len(labels)), [s["speedup"] for s in summary],
            color=["tab:green" if s["speedup"] >= 1 else "tab:red" for s in summary])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs the baseline it replaces (x)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(device: str, full: bool, out: str, log=print) -> Dict:
    rows: List[dict] = []
    for name in FAMILIES:
        log(f"== {name} ({'full' if full else 'quick'}) ==")
        args = ["--device", device] + ([] if full else ["--quick"])
        rows += _load(name).main(args)
    summary = summarize(rows)
    log(format_summary(summary))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(dict(rows=rows, summary=summary), f, indent=1)
    title = f"bigkernels bench on {rows[0]['device_name'] if rows else device}"
    if plot(summary, os.path.join(out, "bench.png"), title):
        log(f"wrote {os.path.join(out, 'bench.json')} and {os.path.join(out, 'bench.png')}")
    return dict(rows=rows, summary=summary)
