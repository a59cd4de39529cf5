"""Shared test helpers: the devices to test on, markers, kernel availability and a comparison
that says where and by how much it failed."""
from __future__ import annotations

import logging
import os

import pytest
import torch

import bigkernels  # noqa: F401  (defines the ops, loads the extension)
from bigkernels.ops import _registry

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def devices():
    """Devices every op test runs on: cpu always, cuda (marked) when a GPU exists."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Ask the dispatcher whether a compiled kernel is registered for ``bigkernels::op``."""
    return _registry.has_kernel(f"bigkernels::{op}", dispatch_key)


def require_kernel(op: str, device: str) -> None:
    key = "CUDA" if device == "cuda" else "CPU"
    if not has_kernel(op, key):
        pytest.skip(f"no {key} kernel registered for bigkernels::{op} (extension not built with it)")


@pytest.fixture(params=["native", "avx512", "avx2", "scalar"])
def cpu_isa(request, monkeypatch):
    """CPU kernels with the best instruction set and with each narrower one forced through
    BIGKERNELS_CPU_ISA (a level the CPU lacks runs the best one below it); other devices run once."""
    if request.param != "native":
        if request.node.callspec.params.get("device", "cpu") != "cpu":
            pytest.skip("instruction sets are a CPU matter")
        monkeypatch.setenv("BIGKERNELS_CPU_ISA", request.param)
    return request.param


# ----- Triton kernel tests: under the interpreter on CPU tensors, or on a GPU -------------------
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# fp32 / fp16 everywhere; bf16 only on a GPU (the interpreter has no bf16).
TRITON_FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def skip_module_without_triton_runtime() -> None:
    """Call at the top of a Triton test module: skips it unless TRITON_INTERPRET=1 or a GPU."""
    if not (TRITON_INTERPRET or HAS_CUDA):
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
    pytest.importorskip("triton")
    # torch logs that it cannot read interpreted kernels' IR and assumes every argument is written
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="Triton tests need TRITON_INTERPRET=1 (own pytest process) or a GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "triton_interpret" in item.keywords and not (TRITON_INTERPRET or HAS_CUDA):
            item.add_marker(skip_interp)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """torch.testing.assert_close plus where the worst element is and its values."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    if nan_mismatch.any():
        idx = tuple(nan_mismatch.nonzero()[0].tolist())
        raise AssertionError(f"{what}: NaN mismatch at {idx}: {a[idx].item()} vs expected {e[idx].item()}")
    diff = (a - e).abs().nan_to_num(0.0)
    bad = diff > atol + rtol * e.abs().nan_to_num(0.0)
    if bad.any():
        flat = int((diff - rtol * e.abs().nan_to_num(0.0)).flatten().argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements outside rtol={rtol}, atol={atol}; worst at {pos}: "
            f"{a[pos].item()!r} vs expected {e[pos].item()!r} (|diff| {diff[pos].item():.3g}); "
            f"max |diff| {diff.max().item():.3g}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


@pytest.fixture
def force_linear_dispatch(monkeypatch):
    """force(mode): BIGKERNELS_LINEAR_DISPATCH=mode for the compressed linear layers' shape
    dispatch (bigkernels.nn._dispatch); decisions are forgotten before and after the test."""
    from bigkernels.nn import _dispatch

    def force(mode: str) -> None:
        monkeypatch.setenv("BIGKERNELS_LINEAR_DISPATCH", mode)
        _dispatch.clear()

    _dispatch.clear()
    yield force
    monkeypatch.undo()
    _dispatch.clear()


@pytest.fixture(scope="session")
def dist_workers():
    """Two CPU ranks of a gloo process group (``tests/_dist.py``: worker processes started at
    first use and shared by every test of the session); ``dist_workers.run(fn, *args)`` runs a
    module-level ``fn`` on both and returns their results."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    from _dist import DistWorkers

    workers = DistWorkers(world_size=2)
    yield workers
    workers.close()
