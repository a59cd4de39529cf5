"""Codebook (weight-sharing) ops: schemas, fake implementations, autograd and the choice of
kernel. Format and semantics: ``bigkernels/reference/codebook.py``.

Kernel ops (CPU C++ / Triton / reference; no autograd):
``codebook_mm(x, indices, centroids, bias, group_size) -> [M, N]``
    lookup-table GEMM/GEMV: ``x [M, K] @ W.T + bias`` with W's entries looked up from the
    codebook inside the kernel (no dense weight in memory), fp32 accumulation, in x's dtype.
``codebook_dequantize(indices, centroids, in_features, group_size) -> W [N, K]``
    the dense weight, in centroids' dtype (``CodebookLinear.weight``, the dense fallback paths and
    the backward).
``codebook_quantize(weight, centroids, group_size) -> indices``
    the encoder: each weight's nearest centroid (centroids ascending per codebook), packed.
``codebook_centroid_grad(grad_w, indices, centroids, group_size) -> [G, C]``
    the sum of ``grad_w [N, K]`` over the weights sharing each centroid (fp32 sums, in centroids'
    dtype): the centroids' gradient from the dense weight's.

Differentiable op used by ``bigkernels.nn.CodebookLinear``:
``codebook_linear(x, indices, centroids, bias, group_size)``, the arguments of ``codebook_mm``;
gradients flow to x, to the centroids (fine-tuning the codebook keeps the sharing: every weight
stays tied to its centroid) and to the bias. The indices are not differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bigkernels.ops import _registry
from bigkernels.reference import codebook as ref

MM_SCHEMA = "(Tensor x, Tensor indices, Tensor centroids, Tensor? bias, int group_size) -> Tensor"
DEQUANTIZE_SCHEMA = "(Tensor indices, Tensor centroids, int in_features, int group_size) -> Tensor"
QUANTIZE_SCHEMA = "(Tensor weight, Tensor centroids, int group_size) -> Tensor"
CENTROID_GRAD_SCHEMA = "(Tensor grad_w, Tensor indices, Tensor centroids, int group_size) -> Tensor"


def _check_format(op: str, indices, centroids, in_features, group_size) -> None:
    torch._check(indices.dim() == 2 and indices.dtype == torch.uint8,
                 lambda: f"{op}: expected indices [N, packed] of dtype torch.uint8, got {indices.dtype} "
                         f"with shape {tuple(indices.shape)}")
    torch._check(centroids.dim() == 2 and centroids.shape[1] in (4, 8, 16, 256),
                 lambda: f"{op}: expected centroids [groups, 2**bits] with bits in {ref.BITS}, got shape "
                         f"{tuple(centroids.shape)}")
    torch._check(group_size > 0, lambda: f"{op}: group_size must be positive, got {group_size}")
    bits = {4: 2, 8: 3, 16: 4, 256: 8}.get(int(centroids.shape[1]), 4)
    torch._check(indices.shape[1] == ref.packed_cols(in_features, bits),
                 lambda: f"{op}: indices of {in_features} {bits}-bit entries per row need "
                         f"{ref.packed_cols(in_features, bits)} bytes per row, got shape {tuple(indices.shape)}")
    torch._check(centroids.shape[0] == ref.num_groups(indices.shape[0], group_size),
                 lambda: f"{op}: {indices.shape[0]} output rows in groups of {group_size} need "
                         f"{ref.num_groups(indices.shape[0], group_size)} codebooks, got centroids of shape "
                         f"{tuple(centroids.shape)}")


def _mm_fake(x, indices, centroids, bias, group_size):
    torch._check(x.dim() == 2, lambda: f"codebook_mm: expected a 2-D x, got {x.dim()}-D")
    _check_format("codebook_mm", indices, centroids, x.shape[1], group_size)
    return x.new_empty((x.shape[0], indices.shape[0]))


def _dequantize_fake(indices, centroids, in_features, group_size):
    _check_format("codebook_dequantize", indices, centroids, in_features, group_size)
    return centroids.new_empty((indices.shape[0], in_features))


def _quantize_fake(weight, centroids, group_size):
    torch._check(weight.dim() == 2, lambda: f"codebook_quantize: expected a 2-D weight, got {weight.dim()}-D")
    torch._check(centroids.dim() == 2 and centroids.shape[1] in (4, 8, 16, 256),
                 lambda: f"codebook_quantize: expected centroids [groups, 2**bits], got {tuple(centroids.shape)}")
    bits = {4: 2, 8: 3, 16: 4, 256: 8}[int(centroids.shape[1])]
    out = weight.new_empty((weight.shape[0], ref.packed_cols(weight.shape[1], bits)), dtype=torch.uint8)
    _check_format("codebook_quantize", out, centroids, weight.shape[1], group_size)
    return out


def _centroid_grad_fake(grad_w, indices, centroids, group_size):
    torch._check(grad_w.dim() == 2 and grad_w.shape[0] == indices.shape[0],
                 lambda: f"codebook_centroid_grad: expected grad_w [N, K] with N = {indices.shape[0]}, got "
                         f"{tuple(grad_w.shape)}")
    _check_format("codebook_centroid_grad", indices, centroids, grad_w.shape[1], group_size)
    return centroids.new_empty(centroids.shape)


_PREFERENCE = {"cpu": ("cpu-c++", "reference"), "cuda": ("triton", "reference")}
_KERNEL_DEFS = [
    ("codebook_mm", MM_SCHEMA, ref.codebook_mm, _mm_fake, "codebook_mm_triton"),
    ("codebook_dequantize", DEQUANTIZE_SCHEMA, ref.codebook_dequantize, _dequantize_fake, "codebook_dequantize_triton"),
    ("codebook_quantize", QUANTIZE_SCHEMA, ref.codebook_quantize, _quantize_fake, None),
    ("codebook_centroid_grad", CENTROID_GRAD_SCHEMA, ref.centroid_grad, _centroid_grad_fake, None),
]
for _name, _schema, _reference, _fake, _triton in _KERNEL_DEFS:
    _qual = f"{_registry.NAMESPACE}::{_name}"
    torch.library.define(_qual, _schema)
    torch.library.register_fake(_qual)(_fake)
    torch.library.impl(_qual, "CompositeExplicitAutograd")(_reference)
    _registry.register(_registry.OpInfo(_name, _schema, _reference, triton_name=_triton,
                                        preference=dict(_PREFERENCE)))


def codebook_mm(x: Tensor, indices: Tensor, centroids: Tensor, bias, group_size: int) -> Tensor:
    return _registry.call("codebook_mm", x.device, x, indices, centroids, bias, group_size)


def dequantize(indices: Tensor, centroids: Tensor, in_features: int, group_size: int) -> Tensor:
    """The dense weight [N, in_features] in centroids' dtype, on the fastest backend."""
    return _registry.call("codebook_dequantize", indices.device, indices, centroids, in_features, group_size)


def quantize(weight: Tensor, centroids: Tensor, group_size: int) -> Tensor:
    """Packed indices of each weight's nearest centroid, on the fastest backend."""
    return _registry.call("codebook_quantize", weight.device, weight, centroids, group_size)


def centroid_grad(grad_w: Tensor, indices: Tensor, centroids: Tensor, group_size: int) -> Tensor:
    return _registry.call("codebook_centroid_grad", grad_w.device, grad_w, indices, centroids, group_size)


# ----- differentiable op -------------------------------------------------------------------------
def _linear_impl(x, indices, centroids, bias, group_size):
    return codebook_mm(x, indices, centroids, bias, group_size)


def _setup_context(ctx, inputs, output):
    x, indices, centroids, bias, group_size = inputs
    ctx.save_for_backward(x, indices, centroids)
    ctx.group_size = group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # y = x Wᵀ + b with W[n, k] = centroids[g(n), idx(n, k)]:
    # dx = grad @ W; dW = gradᵀ x, and each centroid collects dW over the weights tied to it.
    x, indices, centroids = ctx.saved_tensors
    grad_x = grad_c = grad_b = None
    if ctx.needs_input_grad[0]:
        w = dequantize(indices, centroids, x.shape[1], ctx.group_size)
        grad_x = (grad @ w.to(grad.dtype)).to(x.dtype)
    if ctx.needs_input_grad[2]:
        grad_w = grad.float().T @ x.float()
        grad_c = centroid_grad(grad_w, indices, centroids, ctx.group_size)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_b = grad.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_c, grad_b, None


_qual = f"{_registry.NAMESPACE}::codebook_linear"
torch.library.define(_qual, MM_SCHEMA)
torch.library.register_fake(_qual)(_mm_fake)
torch.library.impl(_qual, "CompositeExplicitAutograd")(_linear_impl)
torch.library.register_autograd(_qual, _backward, setup_context=_setup_context)


def codebook_linear(x: Tensor, indices: Tensor, centroids: Tensor, bias, group_size: int) -> Tensor:
    """``x [..., K] -> [..., N]`` through the differentiable op."""
    lead = x.shape[:-1]
    out = torch.ops.bigkernels.codebook_linear(x.reshape(-1, x.shape[-1]), indices, centroids, bias, group_size)
    return out.reshape(*lead, indices.shape[0])
