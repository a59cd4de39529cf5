"""Shared test helpers: the devices to test on, markers, kernel availability and a comparison
that says where and by how much it failed."""
from __future__ import annotations

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
