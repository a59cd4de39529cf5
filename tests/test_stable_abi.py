"""bigkernels._C (and _C_cuda) are bound through the LibTorch stable ABI and Python's limited API only,
so one wheel loads on every torch >= setup.py's TORCH_MIN and every CPython >= 3.10 (the two-venv
install itself is CI's wheel job, scripts/wheel_ci.sh). The in-place ops bump autograd versions."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import bigkernels
import bigkernels.ops  # noqa: F401  (loads the extension)
from bigkernels.ops._extension import extension_error

PKG = os.path.dirname(bigkernels.__file__)
LIBS = sorted(glob.glob(os.path.join(PKG, "_C*.so")))

pytestmark = pytest.mark.skipif(extension_error() is not None or not LIBS, reason="bigkernels._C not built")


def _undefined(lib: str):
    out = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
@pytest.mark.parametrize("lib", LIBS, ids=os.path.basename)
def test_extension_uses_only_stable_torch_and_limited_python_symbols(lib):
    """No ATen / c10 / torch C++ symbol (their mangled names change between torch releases): torch is
    reached only through the stable C shims (aoti_torch_*, torch_*); Python only through abi3."""
    syms = _undefined(lib)
    cxx_torch = [s for s in syms if re.match(r"_ZN?K?(2at|3c10|5torch|5caffe2)", s) or "at6Tensor" in s]
    assert not cxx_torch, f"{os.path.basename(lib)} needs versioned libtorch C++ symbols: {cxx_torch[:10]}"
    shims = [s for s in syms if s.startswith(("aoti_torch_", "torch_"))]
    assert shims, "no stable-ABI shim is used: is this the stable build?"
    # Python: only the limited API (no private _Py* symbols; PyInit is defined, not needed)
    assert not [s for s in syms if s.startswith("_Py")], syms


def test_build_info_names_the_stable_abi_target():
    line = bigkernels.info()["extension_build"]
    assert "stable ABI" in line and "torch >= 2.10" in line, line


@pytest.mark.parametrize("op", ["fused_adamw_", "fused_sgd_", "apply_masks_", "fused_lion_"])
def test_in_place_ops_bump_versions_of_every_mutated_argument(op):
    """The stable ABI has no version counters: the ADInplaceOrView kernel registered by
    bigkernels/ops/_extension.py bumps every `Tensor(a!)` argument, as torch's in-place ops do."""
    ps = [torch.randn(4, 3), torch.randn(5)]
    gs = [torch.randn_like(p) for p in ps]
    if op == "apply_masks_":
        masks = [torch.rand_like(p) > 0.5 for p in ps]
        mutated, call = [ps], lambda: torch.ops.bigkernels.apply_masks_(ps, masks)
    elif op == "fused_sgd_":
        bufs = [torch.zeros_like(p) for p in ps]
        mutated = [ps, bufs]
        call = lambda: torch.ops.bigkernels.fused_sgd_(  # noqa: E731
            ps, gs, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
            is_first_step=True)
    elif op == "fused_lion_":
        m = [torch.zeros_like(p) for p in ps]
        mutated = [ps, m]
        call = lambda: torch.ops.bigkernels.fused_lion_(  # noqa: E731
            ps, gs, m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
    else:
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        s = [torch.tensor(0.0), torch.tensor(0.0)]
        mutated = [ps, m, v, s]
        call = lambda: torch.ops.bigkernels.fused_adamw_(  # noqa: E731
            ps, gs, m, v, [], s, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False,
            maximize=False)
    before = [[t._version for t in ts] for ts in mutated]
    call()
    after = [[t._version for t in ts] for ts in mutated]
    assert all(a > b for bs, as_ in zip(before, after) for b, a in zip(bs, as_)), (before, after)
    assert all(g._version == 0 for g in gs), "a read-only argument was bumped"


def test_autograd_sees_an_optimizer_step_on_a_saved_tensor():
    """Why the bump matters: autograd refuses a backward through a tensor a fused step modified."""
    w = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3, requires_grad=True)
    y = (x @ w).sum()  # saves w for x's gradient
    with torch.no_grad():
        torch.ops.bigkernels.fused_sgd_([w], [torch.ones_like(w)], [], lr=0.1, momentum=0.0, dampening=0.0,
                                        weight_decay=0.0, nesterov=False, maximize=False, is_first_step=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
