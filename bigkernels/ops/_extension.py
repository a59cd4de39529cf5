"""Loads the compiled extension ``bigkernels._C``; its absence is tolerated and said once.

``_C`` is bound through the LibTorch stable ABI (one build for every torch >= 2.10, see setup.py),
which has no access to autograd's version counters. Its in-place kernels therefore get their
mutated arguments' versions bumped here, by an ADInplaceOrView kernel per mutating op -- what
``torch.library.custom_op`` registers for its own mutating ops, and what torch's in-place ops do:
autograd's "modified by an inplace operation" check and version-keyed caches (SparseLinear's dense
copy) see every optimizer step.
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import List, Optional

import torch

_ERROR: Optional[str] = None
_LOADED = False
_LIB: Optional[torch.library.Library] = None  # holds the ADInplaceOrView registrations
_CUDA_STATE = "not built"  # bigkernels._C_cuda: "loaded", "not built", or why it is not loaded

BUILD_HINT = (
    "build it from the source tree with `pip install --no-build-isolation -e .` "
    "(needs a C++ compiler; CUDA kernels also need nvcc and a CUDA build of torch)"
)


def load_extension() -> bool:
    """Import bigkernels._C once. On failure warn once and leave the reference kernels in charge."""
    global _ERROR, _LOADED
    if _LOADED or _ERROR is not None:
        return _LOADED
    if os.environ.get("BIGKERNELS_DISABLE_EXTENSION") == "1":
        _ERROR = "disabled by BIGKERNELS_DISABLE_EXTENSION=1"
    else:
        try:
            from bigkernels import _C  # noqa: F401  (static STABLE_TORCH_LIBRARY_IMPL registrations)

            _LOADED = True
            _load_cuda_kernels()
            _register_version_bumps()
        except (ImportError, OSError) as exc:
            _ERROR = f"{type(exc).__name__}: {exc}"
    if not _LOADED:
        warnings.warn(
            f"bigkernels: compiled extension not loaded ({_ERROR}); running on the pure-PyTorch "
            f"reference kernels, which are correct but slow. To get the fast kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LOADED


def _load_cuda_kernels() -> None:
    """Load bigkernels._C_cuda (the CUDA kernels; a plain op library, no Python module) when it was
    built and this torch has CUDA. It links libtorch_cuda and the CUDA 13 runtime, so on a CPU-only
    torch it is left alone: the same wheel then runs the CPU kernels. A failed load warns (the CUDA
    ops then run on Triton or the reference) and is reported by info()."""
    global _CUDA_STATE
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libs = sorted(glob.glob(os.path.join(here, "_C_cuda.*so")))
    if not libs:
        _CUDA_STATE = "not built (CPU-only build)"
        return
    if torch.version.cuda is None:
        _CUDA_STATE = f"not loaded: this torch ({torch.__version__}) has no CUDA"
        return
    try:
        torch.ops.load_library(libs[0])
        _CUDA_STATE = "loaded"
    except (OSError, RuntimeError) as exc:
        _CUDA_STATE = f"failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"bigkernels: CUDA kernels ({libs[0]}) not loaded: {exc}", RuntimeWarning, stacklevel=4)


def cuda_kernels_state() -> str:
    """Whether the CUDA kernels (bigkernels._C_cuda) are loaded, and if not why."""
    return _CUDA_STATE


def _mutated(schema) -> List[int]:
    return [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _register_version_bumps() -> None:
    """An ADInplaceOrView kernel for every op with mutable arguments: bump their versions (before the
    kernel runs, as torch's in-place ops and custom_op do), then redispatch to the backend kernel."""
    global _LIB
    from torch.autograd.graph import increment_version

    from bigkernels.ops import _registry

    if _LIB is not None:
        return
    _LIB = torch.library.Library(_registry.NAMESPACE, "IMPL")
    after = torch._C._after_ADInplaceOrView_keyset
    for name in sorted(_registry.OPS):
        op = getattr(getattr(torch.ops, _registry.NAMESPACE), name).default
        idxs = _mutated(op._schema)
        if not idxs:
            continue
        names = [op._schema.arguments[i].name for i in idxs]

        def bump_then_run(keyset, *args, _op=op, _idxs=idxs, _names=names, **kwargs):
            for i, n in zip(_idxs, _names):
                t = args[i] if i < len(args) else kwargs.get(n)
                if t is not None:
                    increment_version(t)
            return _op.redispatch(keyset & after, *args, **kwargs)

        _LIB.impl(name, bump_then_run, "ADInplaceOrView", with_keyset=True)


def extension_error() -> Optional[str]:
    """Why bigkernels._C is not loaded, or None when it is."""
    return _ERROR
