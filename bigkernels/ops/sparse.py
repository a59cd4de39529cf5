"""Sparse linear ops: schemas, fake implementations, autograd and the choice of kernel. Formats and
semantics: ``bigkernels/reference/sparse.py``.

Kernel ops (CPU C++ / Triton / reference; no autograd), all ``x [M, K] -> [M, N]`` in x's dtype:
``csr_mm(x, crow, col, values, bias)``, ``bsr_mm(x, crow, col, blocks, bias)``,
``sparse24_mm(x, values, meta, bias)``.

Dense weights from the formats (CPU C++ / reference; no autograd): ``sparse24_to_dense(values,
meta) -> [N, K]``, ``csr_to_dense(crow, col, values, in_features) -> [N, K]``, in the stored dtype
(:func:`to_dense` picks by format; BSR uses the reference, ``from_bsr``).

Differentiable ops used by ``bigkernels.nn.SparseLinear`` (same arguments):
``csr_linear``, ``bsr_linear``, ``sparse24_linear``; gradients flow to x, to the stored non-zero
weights (values / blocks: sparse fine-tuning keeps the pattern) and to the bias.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bigkernels.ops import _registry
from bigkernels.reference import sparse as ref

CSR_SCHEMA = "(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias) -> Tensor"
BSR_SCHEMA = "(Tensor x, Tensor crow, Tensor col, Tensor blocks, Tensor? bias) -> Tensor"
SPARSE24_SCHEMA = "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor"


def _check_x(x, n_out):
    torch._check(x.dim() == 2, lambda: f"expected a 2-D x, got {x.dim()}-D")
    return x.new_empty((x.shape[0], n_out))


def _csr_fake(x, crow, col, values, bias):
    return _check_x(x, crow.shape[0] - 1)


def _bsr_fake(x, crow, col, blocks, bias):
    return _check_x(x, (crow.shape[0] - 1) * blocks.shape[-1])


def _sparse24_fake(x, values, meta, bias):
    torch._check(x.shape[-1] == 2 * values.shape[1],
                 lambda: f"sparse24: x has {x.shape[-1]} inputs, values imply {2 * values.shape[1]}")
    return _check_x(x, values.shape[0])


SPARSE24_TO_DENSE_SCHEMA = "(Tensor values, Tensor meta) -> Tensor"
CSR_TO_DENSE_SCHEMA = "(Tensor crow, Tensor col, Tensor values, int in_features) -> Tensor"


def _sparse24_to_dense_fake(values, meta):
    torch._check(values.dim() == 2, lambda: f"sparse24_to_dense: expected 2-D values, got {values.dim()}-D")
    return values.new_empty((values.shape[0], 2 * values.shape[1]))


def _csr_to_dense_fake(crow, col, values, in_features):
    return values.new_empty((crow.shape[0] - 1, in_features))


for _name, _schema, _reference, _fake in (
        ("sparse24_to_dense", SPARSE24_TO_DENSE_SCHEMA, ref.from_sparse24, _sparse24_to_dense_fake),
        ("csr_to_dense", CSR_TO_DENSE_SCHEMA, ref.from_csr, _csr_to_dense_fake)):
    _registry.register(_registry.OpInfo(_name, _schema, _reference,
                                        preference={"cpu": ("cpu-c++", "reference"), "cuda": ("reference",)}))
    _qual = f"{_registry.NAMESPACE}::{_name}"
    torch.library.define(_qual, _schema)
    torch.library.register_fake(_qual)(_fake)
    torch.library.impl(_qual, "CompositeExplicitAutograd")(_reference)


def to_dense(pattern: str, fmt, in_features: int) -> Tensor:
    """The dense weight [N, in_features] of a SparseLinear format (``fmt``: its tensors in op-argument
    order: 2:4 ``(values, meta)``, block ``(crow, col, blocks)``, unstructured ``(crow, col,
    values)``), in the stored dtype, on the fastest backend for its device."""
    if pattern == "2:4":
        return _registry.call("sparse24_to_dense", fmt[0].device, *fmt)
    if pattern == "unstructured":
        return _registry.call("csr_to_dense", fmt[2].device, *fmt, in_features)
    return ref.from_bsr(*fmt, in_features)


# (kernel op, differentiable op, schema, reference, fake, dense weight from the format)
_FAMILIES = [
    ("csr_mm", "csr_linear", CSR_SCHEMA, ref.csr_linear, _csr_fake,
     lambda x, a, b, c: to_dense("unstructured", (a, b, c), x.shape[1])),
    ("bsr_mm", "bsr_linear", BSR_SCHEMA, ref.bsr_linear, _bsr_fake,
     lambda x, a, b, c: ref.from_bsr(a, b, c, x.shape[1])),
    ("sparse24_mm", "sparse24_linear", SPARSE24_SCHEMA, ref.sparse24_linear, _sparse24_fake,
     lambda x, a, b: to_dense("2:4", (a, b), x.shape[1])),
]


def _make_impl(kernel_op):
    def impl(x, *fmt_and_bias):
        return _registry.call(kernel_op, x.device, x, *fmt_and_bias)

    return impl


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, Tensor)])
    ctx.has_bias = inputs[-1] is not None
    ctx.n_fmt = len(inputs) - 2


def _make_backward(dense_of, values_index):
    """grad_x = grad @ W; grad of the stored non-zeros = (gradᵀ x) sampled at their positions."""

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, fmt = saved[0], saved[1:1 + ctx.n_fmt]
        w = dense_of(x, *fmt)
        grad_x = grad @ w.to(grad.dtype)
        grads = [grad_x] + [None] * ctx.n_fmt + [grad.sum(0) if ctx.has_bias else None]
        if ctx.needs_input_grad[1 + values_index]:
            grad_w = (grad.float().T @ x.float())
            grads[1 + values_index] = _sample(grad_w, fmt, values_index).to(fmt[values_index].dtype)
        if ctx.has_bias and grads[-1] is not None:
            grads[-1] = grads[-1].to(saved[-1].dtype)
        return tuple(grads)

    return backward


def _sample(grad_w: Tensor, fmt, values_index: int) -> Tensor:
    """The entries of a dense [N, K] gradient at the stored positions of the format."""
    if len(fmt) == 2:  # 2:4: values, meta
        values, meta = fmt
        idx = torch.stack(((meta & 3).long(), ((meta >> 2) & 3).long()), dim=2)
        n, half = values.shape
        return torch.gather(grad_w.reshape(n, half // 2, 4), 2, idx).reshape(n, half)
    crow, col, values = fmt
    if values.dim() == 1:  # CSR
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow[1:] - crow[:-1])
        return grad_w[rows, col.long()]
    b = values.shape[-1]  # BSR
    nb, kb = crow.numel() - 1, grad_w.shape[1] // b
    tiles = grad_w.reshape(nb, b, kb, b).transpose(1, 2)
    rows = torch.repeat_interleave(torch.arange(nb, device=crow.device), crow[1:] - crow[:-1])
    return tiles[rows, col.long()]


for _kernel, _public, _schema, _reference, _fake, _dense in _FAMILIES:
    _registry.register(_registry.OpInfo(_kernel, _schema, _reference, triton_name=f"{_kernel}_triton",
                                        preference={"cpu": ("cpu-c++", "reference"),
                                                    "cuda": ("triton", "cuda-c++", "reference")}))
    for _name, _impl in ((_kernel, _reference), (_public, _make_impl(_kernel))):
        _qual = f"{_registry.NAMESPACE}::{_name}"
        torch.library.define(_qual, _schema)
        torch.library.register_fake(_qual)(_fake)
        torch.library.impl(_qual, "CompositeExplicitAutograd")(_impl)
    _values_index = 0 if _kernel == "sparse24_mm" else 2
    torch.library.register_autograd(f"{_registry.NAMESPACE}::{_public}", _make_backward(_dense, _values_index),
                                    setup_context=_setup_context)
