"""Smoke test of an installed bigkernels wheel (scripts/wheel_ci.sh runs it in clean venvs, outside
the source tree): imports without a warning, `bigkernels info` runs, and one op of every family runs
on its C++ CPU kernel (the registry says cpu-c++, the dispatcher holds a CPU kernel for it) and
matches the pure-PyTorch reference. Exits non-zero with the reason on the first failure.

    python wheel_smoke.py [--source-tree DIR]   # DIR: fail if bigkernels is imported from there
"""
import argparse
import os
import subprocess
import sys
import warnings


def fail(msg: str) -> None:
    print(f"wheel smoke test FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-tree", default=None)
    args = ap.parse_args()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        import bigkernels
        from bigkernels.ops import _registry
    if caught:
        fail("import warned: " + "; ".join(f"{w.category.__name__}: {w.message}" for w in caught))
    where = os.path.realpath(bigkernels.__file__)
    if args.source_tree and where.startswith(os.path.realpath(args.source_tree) + os.sep):
        fail(f"bigkernels was imported from the source tree ({where}), not from the installed wheel")
    info = bigkernels.info()
    if not info["extension_loaded"]:
        fail(f"bigkernels._C did not load: {info['extension_error']}")
    print(f"torch {torch.__version__}, bigkernels {info['bigkernels']} from {os.path.dirname(where)}")
    print(f"extension: {info.get('extension_build')}")

    cli = subprocess.run([sys.executable, "-m", "bigkernels", "info"], capture_output=True, text=True)
    if cli.returncode != 0 or "cpu-c++" not in cli.stdout:
        fail(f"`bigkernels info` exited {cli.returncode}:\n{cli.stdout}\n{cli.stderr}")
    if cli.stderr.strip():
        fail(f"`bigkernels info` printed to stderr:\n{cli.stderr}")

    from bigkernels.reference import codebook as rcb
    from bigkernels.reference import distill as rkd
    from bigkernels.reference import optim as ropt
    from bigkernels.reference import quant as rq
    from bigkernels.reference import sparse as rsp

    ops = torch.ops.bigkernels
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def check(op, got, want, atol, rtol=1e-5):
        if info["ops"][op]["uses"]["cpu"] != "cpu-c++" or not _registry.has_kernel(f"bigkernels::{op}", "CPU"):
            fail(f"{op} does not run on the C++ CPU kernel here: {info['ops'][op]}")
        got, want = (got if isinstance(got, (tuple, list)) else [got]), (want if isinstance(want, (tuple, list)) else [want])
        for i, (a, b) in enumerate(zip(got, want)):
            if a.shape != b.shape or a.dtype != b.dtype:
                fail(f"{op} output {i}: {a.dtype}{list(a.shape)} vs the reference's {b.dtype}{list(b.shape)}")
            if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
                fail(f"{op} output {i} differs from the reference by {(a.float() - b.float()).abs().max().item()}")
        print(f"  {op}: cpu-c++ matches the reference")

    # quant
    x, w = rand(5, 64), rand(24, 64)
    w_int8, w_scale = rq.quantize_weight(w)
    bias = rand(24)
    check("w8a16_mm", ops.w8a16_mm(x, w_int8, w_scale, bias), rq.w8a16_linear(x, w_int8, w_scale, bias), 1e-4)
    # sparse
    wd = rand(24, 64) * (torch.rand(24, 64, generator=g) < 0.3)
    crow, col, vals = rsp.to_csr(wd)
    check("csr_mm", ops.csr_mm(x, crow, col, vals, bias), rsp.csr_linear(x, crow, col, vals, bias), 1e-4)
    # codebook
    cent = torch.sort(rand(2, 16), dim=1).values  # 2 groups of 12 rows, 4-bit codes
    idx = ops.codebook_quantize(w, cent, 12)
    check("codebook_quantize", idx, rcb.codebook_quantize(w, cent, 12), 0)
    check("codebook_mm", ops.codebook_mm(x, idx, cent, bias, 12), rcb.codebook_mm(x, idx, cent, bias, 12), 1e-4)
    # distill
    s, t, labels = rand(6, 40), rand(6, 40), torch.randint(0, 40, (6,), generator=g)
    kd_args = (s, t, labels, torch.tensor(1.0), 2.0, 0.5, -100, True, False)
    check("kd_loss_fwd", ops.kd_loss_fwd(*kd_args), rkd.kd_loss_fwd(*kd_args), 1e-5, 1e-4)
    # optim (in place): results and the params' autograd versions
    shapes = [(7, 5), (33,), (2, 3, 4)]
    lists = {n: [rand(*sh) for sh in shapes] for n in ("params", "grads", "exp_avgs")}
    lists["exp_avg_sqs"] = [rand(*sh).abs() for sh in shapes]
    lists["max_exp_avg_sqs"] = []
    lists["state_steps"] = [torch.tensor(3.0) for _ in shapes]
    want = {n: [v.clone() for v in vs] for n, vs in lists.items()}
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    versions = [p._version for p in lists["params"]]
    ops.fused_adamw_(*lists.values(), **kw)
    ropt.fused_adam_(*want.values(), **kw, decoupled_weight_decay=True)
    if not all(p._version > v for p, v in zip(lists["params"], versions)):
        fail("fused_adamw_ did not bump the params' autograd versions")
    check("fused_adamw_", lists["params"] + lists["exp_avgs"] + lists["exp_avg_sqs"] + lists["state_steps"],
          want["params"] + want["exp_avgs"] + want["exp_avg_sqs"] + want["state_steps"], 1e-6, 1e-5)
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
