"""The Python face of every op family: schemas, fake impls and per-device kernel choice.

Importing this package defines every ``torch.ops.bigkernels.*`` op (so they exist even when the
compiled extension is missing) and then loads ``bigkernels._C``, whose static registrations add
the C++ CPU and CUDA kernels.
"""
from bigkernels.ops import _registry, distill, optim, quant, sparse, sparse_cuda  # noqa: F401  (defines the ops)
from bigkernels.ops._extension import extension_error, load_extension

load_extension()

__all__ = ["distill", "extension_error", "load_extension", "optim", "quant", "sparse", "sparse_cuda"]
