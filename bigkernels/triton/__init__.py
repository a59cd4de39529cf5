"""Triton kernels, one file per kernel family; each registers its ops with torch.library.triton_op.

Importing this package does not import triton: :func:`load` does, once, when a backend choice or
a test first needs the Triton ops. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""
from __future__ import annotations

import functools
import importlib

_MODULES = ("bigkernels.triton.codebook", "bigkernels.triton.optim", "bigkernels.triton.quant",
            "bigkernels.triton.sparse", "bigkernels.triton.distill", "bigkernels.triton.optim_more",
            "bigkernels.triton.optim8bit")


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Import every Triton kernel module (registering its ops). False when triton is missing."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    for name in _MODULES:
        importlib.import_module(name)
    return True
