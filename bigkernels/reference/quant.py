"""Pure-PyTorch references of the int8 quantisation ops (the semantics every kernel reproduces,
and the fallback where no compiled kernel exists).

Conventions
- Weights: symmetric per-output-channel absmax. ``w_scale[n] = max_k |W[n, k]| / 127`` (fp32) and
  ``w_int8 = round(W / w_scale)`` in [-127, 127]; a zero row has scale 0 and int8 zeros.
- Activations (w8a8): symmetric per-token (per row) absmax, the same rule on each row of x, so an
  all-zero token has scale 0 and contributes exactly the bias; NaN/Inf in a token stay in its row.
- GEMMs take ``a [M, K]`` and ``b [N, K]`` (both K-contiguous: ``a @ b.T``), accumulate int8
  products in int32 exactly, and dequantise in fp32: ``out = acc * a_scale[:, None] * b_scale[None, :]
  + bias``, cast to ``out_dtype`` last.
- w8a16: ``out = x @ (w_int8 * w_scale[:, None]).T + bias`` with fp32 accumulation, in x's dtype.
Rounding is round-half-to-even (torch.round); kernels that multiply by a reciprocal instead of
dividing may differ by one in rare ties (tests allow 1 in 500 elements off by one).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

QMAX = 127.0


def absmax_scale(x: Tensor, dim: int = -1) -> Tensor:
    """fp32 absmax / 127 along ``dim`` (NaN propagates: torch.amax does), correctly rounded on
    every device: the divisor is a device tensor, because ATen's CUDA division by a Python scalar
    multiplies by its reciprocal (1 ulp off for ~4.5% of rows), while the kernels divide."""
    amax = x.float().abs().amax(dim=dim)
    return amax / amax.new_full((), QMAX)


def quantize_rows(x: Tensor, scale: Tensor) -> Tensor:
    """round(x / scale) per row, clamped to [-127, 127]; rows with scale 0 become 0."""
    xf = x.float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    q = torch.round(xf / safe).clamp_(-QMAX, QMAX)
    q = torch.where((scale == 0).unsqueeze(-1), torch.zeros_like(q), q)
    # NaN survives clamp; int8 has no NaN: the row's scale (NaN) carries it to the output.
    return torch.nan_to_num(q, nan=0.0).to(torch.int8)


def quantize_weight(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(w_int8 [N, K], w_scale [N] fp32): symmetric per-output-channel absmax."""
    scale = absmax_scale(weight, dim=1)
    return quantize_rows(weight, scale), scale


def quantize_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(x_int8 [M, K], x_scale [M] fp32) for a 2-D activation."""
    scale = absmax_scale(x, dim=-1)
    return quantize_rows(x, scale), scale


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 ``a @ b.T`` for int8 ``a [M, K]`` and ``b [N, K]`` (int64 maths, no overflow
    for K up to 2^17)."""
    return (a.long() @ b.long().T).to(torch.int32) if a.device.type == "cpu" else _int8_mm_float(a, b)


def _int8_mm_float(a: Tensor, b: Tensor) -> Tensor:
    # GPUs have no int64 matmul: fp64 products of int8 are exact while |sum| < 2^53.
    return (a.double() @ b.double().T).to(torch.int32)


def int8_scaled_mm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, bias: Optional[Tensor],
                   out_dtype: torch.dtype) -> Tensor:
    """Dequantised int8 GEMM: ``int8_mm(a, b) * a_scale[:, None] * b_scale[None, :] + bias``."""
    out = int8_mm(a, b).float() * a_scale.float().unsqueeze(1) * b_scale.float().unsqueeze(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w8a16_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ (w_int8 * w_scale).T + bias`` with fp32 accumulation, returned in x's dtype."""
    w = w_int8.float() * w_scale.float().unsqueeze(1)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def dense_mm(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` with fp32 accumulation, in x's dtype (x, weight
    and bias share one float dtype, as ``F.linear`` wants)."""
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise RuntimeError(f"dense_mm: expected x, weight and bias of one dtype, got {x.dtype}, {weight.dtype}"
                           f" and {None if bias is None else bias.dtype}")
    if x.dtype == torch.float32:
        return torch.nn.functional.linear(x, weight, bias)
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def w8a8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-token dynamic int8 activations times int8 weights, dequantised, in x's dtype."""
    xq, xs = quantize_per_token(x)
    return int8_scaled_mm(xq, xs, w_int8, w_scale, bias, x.dtype)


def dequantize_weight(w_int8: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (w_int8.float() * w_scale.float().unsqueeze(1)).to(dtype)
