"""2:4 sparse tensor-core ops through cuSPARSELt (CUDA only, sm_80+): schemas, fake implementations
and :func:`sparse24_supported`. Kernels: ``csrc/sparse/sparse24_cuda.cpp``.

``sparse24_compress(w_dense) -> Tensor``
    ``w_dense [N, K]`` fp16/bf16, 2:4 sparse (at most 2 non-zeros in every group of 4 consecutive
    inputs of a row; rejected otherwise), N and K multiples of 16 -> the cuSPARSELt-compressed weight
    as a 1-D uint8 tensor. Its length is the library's choice, so the fake implementation returns a
    data-dependent (unbacked) size. The bytes are opaque and only valid for the dtype they were
    compressed from.
``sparse24_cslt_mm(x, compressed, n, bias) -> Tensor``
    ``x [M, K]`` fp16/bf16 -> ``x @ Wᵀ + bias`` ``[M, n]`` in x's dtype, for the weight ``W [n, K]``
    that ``compressed`` came from (same dtype as x); ``bias [n]`` optional, any float dtype (read in
    x's dtype: it is copied into the cached plan's own buffer, so plans never depend on the
    caller's bias address).
``sparse24_cslt_plans() -> int``
    How many cuSPARSELt matmul plans are cached (per device, dtype, padded M, n, K, bias or not,
    stream); :func:`plan_count` is 0 where the kernels are not built.

No reference and no autograd: these are inference kernels behind the format of
``bigkernels/reference/sparse.py`` (``sparse24_mm`` computes the same product from values + meta).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from bigkernels.ops import _registry

COMPRESS = f"{_registry.NAMESPACE}::sparse24_compress"
CSLT_MM = f"{_registry.NAMESPACE}::sparse24_cslt_mm"
CSLT_PLANS = f"{_registry.NAMESPACE}::sparse24_cslt_plans"
COMPRESS_SCHEMA = "(Tensor w_dense) -> Tensor"
CSLT_MM_SCHEMA = "(Tensor x, Tensor compressed, int n, Tensor? bias) -> Tensor"
DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and newer

torch.library.define(COMPRESS, COMPRESS_SCHEMA)
torch.library.define(CSLT_MM, CSLT_MM_SCHEMA)
torch.library.define(CSLT_PLANS, "() -> int")


@torch.library.register_fake(COMPRESS)
def _compress_fake(w_dense):
    torch._check(w_dense.dim() == 2, lambda: f"sparse24_compress: expected a 2-D w_dense, got {w_dense.dim()}-D")
    torch._check(w_dense.dtype in DTYPES,
                 lambda: f"sparse24_compress: expected float16 or bfloat16, got {w_dense.dtype}")
    size = torch.library.get_ctx().new_dynamic_size(min=2)  # really >= N * K bytes (the kept half, 16-bit)
    return w_dense.new_empty((size,), dtype=torch.uint8)


@torch.library.register_fake(CSLT_MM)
def _cslt_mm_fake(x, compressed, n, bias):
    torch._check(x.dim() == 2, lambda: f"sparse24_cslt_mm: expected a 2-D x, got {x.dim()}-D")
    torch._check(x.dtype in DTYPES, lambda: f"sparse24_cslt_mm: expected float16 or bfloat16 x, got {x.dtype}")
    torch._check(compressed.dim() == 1 and compressed.dtype == torch.uint8,
                 lambda: "sparse24_cslt_mm: expected compressed to be the 1-D uint8 output of sparse24_compress")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n,
                     lambda: f"sparse24_cslt_mm: expected bias of shape [{n}], got {tuple(bias.shape)}")
    return x.new_empty((x.shape[0], n))


def sparse24_supported(device: Union[torch.device, str, int, None] = None) -> bool:
    """Whether the cuSPARSELt ops can run on ``device`` (default: the current CUDA device): a CUDA
    device of compute capability 8.0 or newer, and an extension built with cuSPARSELt."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if dev.type != "cuda" or not _registry.has_kernel(CSLT_MM, "CUDA"):
        return False
    return torch.cuda.get_device_capability(dev) >= MIN_CAPABILITY


def compress(w_dense: torch.Tensor) -> torch.Tensor:
    """``torch.ops.bigkernels.sparse24_compress``."""
    return torch.ops.bigkernels.sparse24_compress(w_dense)


def cslt_mm(x: torch.Tensor, compressed: torch.Tensor, n: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.bigkernels.sparse24_cslt_mm``."""
    return torch.ops.bigkernels.sparse24_cslt_mm(x, compressed, n, bias)


def plan_count() -> int:
    """``torch.ops.bigkernels.sparse24_cslt_plans()``: the cached cuSPARSELt plans (0 without the kernels)."""
    try:
        return int(torch.ops.bigkernels.sparse24_cslt_plans())
    except NotImplementedError:  # no kernel registered: built without CUDA / cuSPARSELt
        return 0
