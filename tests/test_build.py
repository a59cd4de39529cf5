"""The package around the kernels: import without the extension, info(), the CLI, backend choice."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

import pytest
import torch

import bigkernels as bk
from bigkernels.ops import _registry
from conftest import has_kernel

OPTIM_OPS = ["fused_adam_", "fused_adamw_", "fused_sgd_", "sum_of_squares", "apply_masks_"]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_import_without_extension_warns_once_and_falls_back_to_reference():
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import bigkernels as bk
    import bigkernels.ops._extension as e
    e.load_extension(); e.load_extension()
msgs = [str(x.message) for x in w if "compiled extension not loaded" in str(x.message)]
assert len(msgs) == 1, msgs
assert "pip install --no-build-isolation -e ." in msgs[0]
info = bk.info()
assert not info["extension_loaded"] and "BIGKERNELS_DISABLE_EXTENSION" in info["extension_error"]
assert all(o["uses"]["cpu"] == "reference" for o in info["ops"].values()), info["ops"]
torch.manual_seed(0)
a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
oa, ob = bk.optim.FusedAdamW(a, lr=0.1), torch.optim.AdamW(b, lr=0.1)
for _ in range(3):
    for x, y in zip(a, b):
        x.grad = torch.randn_like(x); y.grad = x.grad.clone()
    oa.step(); ob.step()
assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))
print("ok")
"""
    out = _run(code, BIGKERNELS_DISABLE_EXTENSION="1")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_info_reports_versions_features_and_backends():
    info = bk.info()
    for key in ("bigkernels", "torch", "python", "cpu_features", "cpu_kernel_isa", "extension_loaded", "ops"):
        assert key in info
    assert info["torch"] == torch.__version__
    for op in OPTIM_OPS:
        entry = info["ops"][op]
        assert "reference" in entry["available"]
        assert entry["uses"]["cpu"] in entry["available"]
        assert ("cpu-c++" in entry["available"]) == has_kernel(op, "CPU")
    if info["extension_loaded"]:
        assert info["ops"]["fused_adamw_"]["uses"]["cpu"] == "cpu-c++"


def test_cli_info_prints_table_and_json():
    table = subprocess.run([sys.executable, "-m", "bigkernels", "info"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "fused_adamw_" in table.stdout and "cpu uses" in table.stdout
    js = subprocess.run([sys.executable, "-m", "bigkernels", "info", "--json"], capture_output=True, text=True,
                        timeout=300)
    assert js.returncode == 0 and json.loads(js.stdout)["ops"]["fused_sgd_"]["available"]


def test_impl_override_picks_the_named_backend(monkeypatch):
    monkeypatch.setenv("BIGKERNELS_IMPL", "fused_adamw_=reference")
    _registry.clear_choice_cache()
    try:
        assert _registry.choose("fused_adamw_", "cpu") == "reference"
        assert _registry.choose("fused_sgd_", "cpu") == ("cpu-c++" if has_kernel("fused_sgd_", "CPU") else "reference")
        monkeypatch.setenv("BIGKERNELS_IMPL", "no-such-backend")
        _registry.clear_choice_cache()
        with pytest.raises(ValueError, match="BIGKERNELS_IMPL"):
            _registry.choose("fused_adamw_", "cpu")
    finally:
        monkeypatch.delenv("BIGKERNELS_IMPL")
        _registry.clear_choice_cache()


@pytest.mark.skipif(os.environ.get("BIGKERNELS_EXPECT_CUDA_KERNELS") != "1",
                    reason="only where the build was asked to include the CUDA kernels (CI sets this)")
def test_cuda_kernels_were_built_and_registered():
    missing = [op for op in OPTIM_OPS + ["quantize_per_token", "w8a16_mm"] if not has_kernel(op, "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


@pytest.mark.slow
def test_cmake_build_for_libtorch_users(tmp_path):
    """CMakeLists.txt builds csrc/ against libtorch and the C++ test calls the ops with no Python."""
    import shutil

    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the script's `python` must be this interpreter (with torch), whether or not a venv is active
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run(["bash", os.path.join(root, "scripts", "cmake_build.sh"), str(tmp_path / "build")],
                         capture_output=True, text=True, timeout=1200, cwd=root, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "100% tests passed" in out.stdout


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@pytest.mark.slow
def test_cuda_kernels_do_not_spill_registers():
    """``nvcc -Xptxas -v`` on every CUDA kernel file for sm_80 and sm_90: no kernel spills registers
    or has a stack frame (local memory on the hot path). CI's build enforces the same for sm_90
    (BIGKERNELS_PTXAS_STRICT=1 in .ci/run); this adds sm_80 and needs no torch headers."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True))
    assert sources, "no .cu files found"
    jobs = [(arch, src) for arch in ("sm_80", "sm_90") for src in sources]

    def ptxas_report(job):
        arch, src = job
        cmd = [nvcc, "-cubin", "-O3", "--expt-relaxed-constexpr", f"-I{os.path.join(root, 'csrc')}",
               f"-arch={arch}", "-Xptxas", "-v", "-o", os.devnull, src]
        return arch, src, subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # CI has 2 cores
        reports = list(pool.map(ptxas_report, jobs))
    problems, entries = [], 0
    for arch, src, proc in reports:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"nvcc {arch} {src} failed:\n{out[-3000:]}"
        name = None
        for line in out.splitlines():
            m = _PTXAS_ENTRY.search(line)
            if m:
                name = m.group(1)
                entries += 1
                continue
            m = _PTXAS_FRAME.search(line)
            if m and name is not None:
                frame, stores, loads = map(int, m.groups())
                if frame or stores or loads:
                    problems.append(f"{arch} {os.path.basename(src)} {name}: {frame} B stack frame, "
                                    f"{stores} B spill stores, {loads} B spill loads")
                name = None
    assert entries >= 10, f"found only {entries} kernels in the ptxas report"
    assert not problems, "\n".join(problems)


def test_cslt_plan_count_needs_no_gpu():
    """sparse24_cslt_plans (the cuSPARSELt plan-cache size the GPU tests watch) is callable anywhere:
    0 plans without a GPU, 0 as well where the extension has no cuSPARSELt kernels."""
    from bigkernels.ops import sparse_cuda

    if torch.cuda.is_available():  # other tests in this process may have built plans
        assert sparse_cuda.plan_count() >= 0
        return
    assert sparse_cuda.plan_count() == 0
    if has_kernel("sparse24_cslt_mm", "CUDA"):  # built with cuSPARSELt: the count op is registered too
        assert torch.ops.bigkernels.sparse24_cslt_plans() == 0
