"""int8 quantisation ops: schemas, fake implementations, autograd, and the per-device/per-shape
choice of kernel. Semantics: ``bigkernels/reference/quant.py``.

Kernel ops (one CPU C++ / CUDA / Triton implementation each, no autograd):
``quantize_per_token(x) -> (x_int8, x_scale)``
    2-D float activation -> int8 rows and fp32 per-row scales (symmetric absmax).
``int8_mm(a, b) -> int32``
    exact int8 GEMM ``a [M, K] @ b [N, K].T``.
``int8_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)``
    int8 GEMM with the dequantisation (row scale x column scale + bias, cast) in the epilogue.
``w8a16_mm(x, w_int8, w_scale, bias)``
    float activations times int8 weights dequantised inside the kernel, in x's dtype.
``dense_mm(x, weight, bias)``
    ``F.linear`` of 2-D ``x`` and a float weight, fp32 sums: the w8a16 tiles with the weight as it
    is (CPU C++; the reference elsewhere). The compressed layers' shape dispatch times it against
    ``F.linear`` on their cached dense weight: at a few rows MKL's product behind ``F.linear`` ran
    1.9-3.6x slower than these tiles (1-4 rows of 1024 x 1024, 2 threads, an AVX2 Zen 3 VM).

Differentiable ops used by ``bigkernels.nn.QuantLinear`` (gradient w.r.t. the input only; the
weights are frozen): ``w8a8_linear(x, w_int8, w_scale, bias)`` and ``w8a16_linear(...)``, both on
2-D ``x``. Their implementation picks the kernel ops' backends at run time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bigkernels.ops import _registry
from bigkernels.reference import quant as ref

QUANTIZE_PER_TOKEN_SCHEMA = "(Tensor x) -> (Tensor, Tensor)"
INT8_MM_SCHEMA = "(Tensor a, Tensor b) -> Tensor"
INT8_SCALED_MM_SCHEMA = ("(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor? bias, "
                         "ScalarType out_dtype) -> Tensor")
W8_LINEAR_SCHEMA = "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> Tensor"


def _quantize_per_token_fake(x):
    torch._check(x.dim() == 2, lambda: f"quantize_per_token: expected a 2-D x, got {x.dim()}-D")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def _int8_mm_fake(a, b):
    torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
                 lambda: f"int8_mm: expected a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def _int8_scaled_mm_fake(a, a_scale, b, b_scale, bias, out_dtype):
    torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
                 lambda: f"int8_scaled_mm: expected a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _w8_linear_fake(x, w_int8, w_scale, bias):
    torch._check(x.dim() == 2 and w_int8.dim() == 2 and x.shape[1] == w_int8.shape[1],
                 lambda: f"expected x [M, K] and w_int8 [N, K], got {tuple(x.shape)} and {tuple(w_int8.shape)}")
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _dense_mm_fake(x, weight, bias):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"dense_mm: expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    torch._check(x.dtype == weight.dtype, lambda: f"dense_mm: expected x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    return x.new_empty((x.shape[0], weight.shape[0]))


DENSE_MM_SCHEMA = "(Tensor x, Tensor weight, Tensor? bias) -> Tensor"

_KERNEL_DEFS = [
    ("quantize_per_token", QUANTIZE_PER_TOKEN_SCHEMA, ref.quantize_per_token, _quantize_per_token_fake),
    ("int8_mm", INT8_MM_SCHEMA, ref.int8_mm, _int8_mm_fake),
    ("int8_scaled_mm", INT8_SCALED_MM_SCHEMA, ref.int8_scaled_mm, _int8_scaled_mm_fake),
    ("w8a16_mm", W8_LINEAR_SCHEMA, ref.w8a16_linear, _w8_linear_fake),
]
for _name, _schema, _reference, _fake in _KERNEL_DEFS:
    _qual = f"{_registry.NAMESPACE}::{_name}"
    torch.library.define(_qual, _schema)
    torch.library.register_fake(_qual)(_fake)
    torch.library.impl(_qual, "CompositeExplicitAutograd")(_reference)
    _registry.register(_registry.OpInfo(_name, _schema, _reference, triton_name=f"{_name}_triton",
                                        preference={"cpu": ("cpu-c++", "reference"),
                                                    "cuda": ("triton", "cuda-c++", "reference")}))


_registry.register(_registry.OpInfo("dense_mm", DENSE_MM_SCHEMA, ref.dense_mm,
                                    preference={"cpu": ("cpu-c++", "reference"), "cuda": ("reference",)}))
torch.library.define(f"{_registry.NAMESPACE}::dense_mm", DENSE_MM_SCHEMA)
torch.library.register_fake(f"{_registry.NAMESPACE}::dense_mm")(_dense_mm_fake)
torch.library.impl(f"{_registry.NAMESPACE}::dense_mm", "CompositeExplicitAutograd")(ref.dense_mm)


def quantize_per_token(x: Tensor):
    return _registry.call("quantize_per_token", x.device, x)


def int8_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype):
    return _registry.call("int8_scaled_mm", a.device, a, a_scale, b, b_scale, bias, out_dtype)


# Up to this many rows a linear layer is memory-bound on its weight (decode, small batches): the
# CUDA C++ weight-only GEMV reads each int8 weight once, and a Python-launched Triton kernel's
# launch cost would dominate. Above it, the Triton tensor-core GEMMs.
SMALL_M = 16


def _w8a16_backend(x: Tensor) -> str:
    if (x.device.type == "cuda" and x.shape[0] <= SMALL_M and _registry.forced_backend("w8a16_mm") is None
            and _registry.available("w8a16_mm", "cuda-c++")):
        return "cuda-c++"
    return _registry.choose("w8a16_mm", x.device.type)


def w8a16_mm(x, w_int8, w_scale, bias):
    return _registry.call_backend("w8a16_mm", _w8a16_backend(x), x, w_int8, w_scale, bias)


# ----- differentiable linear ops ---------------------------------------------------------------
def w8a8_quantizes_activations(x: Tensor) -> bool:
    """Whether w8a8 quantises ``x`` (2-D): not at small M on CUDA, where the layer is bound by
    reading its int8 weight and the weight-only GEMV is faster than quantising the activations
    and running an int8 GEMM (and more accurate)."""
    return not (_w8a16_backend(x) == "cuda-c++" and _registry.forced_backend("int8_scaled_mm") is None)


def _w8a8_linear_impl(x, w_int8, w_scale, bias):
    if not w8a8_quantizes_activations(x):
        return w8a16_mm(x, w_int8, w_scale, bias)
    xq, xs = quantize_per_token(x)
    return int8_scaled_mm(xq, xs, w_int8, w_scale, bias, x.dtype)


def _w8a16_linear_impl(x, w_int8, w_scale, bias):
    return w8a16_mm(x, w_int8, w_scale, bias)


def _setup_context(ctx, inputs, output):
    _, w_int8, w_scale, bias = inputs
    ctx.save_for_backward(w_int8, w_scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # d(x W^T)/dx = grad @ W with W the dequantised weight (straight-through for the activation
    # rounding of w8a8); the bias gets the column sums. Frozen int8 weights get no gradient.
    w_int8, w_scale = ctx.saved_tensors
    grad_x = grad @ ref.dequantize_weight(w_int8, w_scale, grad.dtype)
    grad_bias = None if ctx.bias_dtype is None else grad.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias


for _name, _impl in (("w8a8_linear", _w8a8_linear_impl), ("w8a16_linear", _w8a16_linear_impl)):
    _qual = f"{_registry.NAMESPACE}::{_name}"
    torch.library.define(_qual, W8_LINEAR_SCHEMA)
    torch.library.register_fake(_qual)(_w8_linear_fake)
    torch.library.impl(_qual, "CompositeExplicitAutograd")(_impl)
    torch.library.register_autograd(_qual, _backward, setup_context=_setup_context)


def quant_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor], mode: str) -> Tensor:
    """``x [..., K] -> [..., N]`` through the differentiable op of ``mode`` ("w8a8" | "w8a16")."""
    op = torch.ops.bigkernels.w8a8_linear if mode == "w8a8" else torch.ops.bigkernels.w8a16_linear
    lead = x.shape[:-1]
    out = op(x.reshape(-1, x.shape[-1]), w_int8, w_scale, bias)
    return out.reshape(*lead, w_int8.shape[0])
