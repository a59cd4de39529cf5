"""Loads the compiled extension ``bigkernels._C``; its absence is tolerated and said once."""
from __future__ import annotations

import os
import warnings
from typing import Optional

_ERROR: Optional[str] = None
_LOADED = False

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
            from bigkernels import _C  # noqa: F401  (static TORCH_LIBRARY_IMPL registrations)

            _LOADED = True
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


def extension_error() -> Optional[str]:
    """Why bigkernels._C is not loaded, or None when it is."""
    return _ERROR
