"""SparseLinear: a pruned nn.Linear stored compressed, computing x Wᵀ + b without the zeros."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigkernels.nn import _dispatch, _layers
from bigkernels.ops import _registry, sparse_cuda
from bigkernels.ops import sparse as sparse_ops
from bigkernels.nn._checks import check_linear_input, check_weight_dtype
from bigkernels.reference import sparse as ref

PATTERNS = ("2:4", "block", "unstructured")
# Format tensors per pattern: (trainable non-zeros, index buffers...), in op-argument order.
_FORMAT = {
    "unstructured": ("crow", "col", "values"),
    "block": ("crow", "col", "blocks"),
    "2:4": ("values", "meta"),
}
_VALUES = {"unstructured": "values", "block": "blocks", "2:4": "values"}
_OPS = {"unstructured": "csr_linear", "block": "bsr_linear", "2:4": "sparse24_linear"}
_KERNEL_OPS = {"unstructured": "csr_mm", "block": "bsr_mm", "2:4": "sparse24_mm"}  # the same, no autograd


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` for a pruned weight kept in a compressed format:

    - ``"2:4"``: ``values [out, in/2]`` + ``meta [out, in/4]`` (two 2-bit positions per group of 4);
    - ``"block"``: BSR of ``block_size`` x ``block_size`` blocks (``crow``, ``col``, ``blocks``);
    - ``"unstructured"``: CSR (``crow``, ``col``, ``values``).

    The stored non-zeros are a parameter: fine-tuning updates them and keeps the pattern. ``weight``
    reads back the dense weight. Inputs of any leading shape, fp32/bf16/fp16; output in x's dtype.
    Build with :meth:`from_linear` from a pruned ``nn.Linear`` or Hugging Face ``Conv1D``
    (``bigkernels.sparse.sparsify_`` does it for a whole model). ``SparseLinear(in, out, pattern)``
    itself is an all-zero layer that a ``state_dict`` fills (the number of stored weights is the
    checkpoint's; ``load_state_dict(assign=True)`` onto a meta-device layer works too).

    Inference picks, per shape and batch size, the fastest of the sparse kernels and the dense
    product with the weight decompressed (per call, or once and kept for layers of at most 1 MiB
    dense), measured on first use (``bigkernels.nn._dispatch``), so the layer is not slower than
    the ``nn.Linear`` it replaced. Training (gradients wanted) and ``torch.compile`` always run
    the sparse kernel op.
    """

    def __init__(self, in_features: int, out_features: int, pattern: str, block_size: int = 64, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_format(pattern, block_size, in_features, out_features, "SparseLinear")
        self.in_features, self.out_features, self.pattern, self.block_size = in_features, out_features, pattern, block_size
        factory = dict(device=device, dtype=dtype)
        check_weight_dtype("SparseLinear", dtype or torch.get_default_dtype())
        # An all-zero weight (nothing stored) until from_linear or a state_dict fills it.
        self._empty_format(0, **factory)
        with torch.no_grad():
            if self.pattern == "2:4":
                self.values.zero_()
                self.meta.fill_(4)  # positions (0, 1) in every group of 4
            else:
                self.crow.zero_()
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self._dense = _dispatch.DenseCache()
        self._routes = _dispatch.Routes()

    def _empty_format(self, nnz: int, device=None, dtype=None) -> None:
        """Uninitialised format tensors for ``nnz`` stored weights (a multiple of block_size² for
        block; 2:4 stores half of the weight whatever nnz is)."""
        n, k, b = self.out_features, self.in_features, self.block_size
        f = dict(device=device)
        if self.pattern == "2:4":
            tensors = (torch.empty(n, k // 2, dtype=dtype, **f), torch.empty(n, k // 4, dtype=torch.uint8, **f))
        elif self.pattern == "block":
            nb = nnz // (b * b)
            tensors = (torch.empty(n // b + 1, dtype=torch.int64, **f), torch.empty(nb, dtype=torch.int32, **f),
                       torch.empty(nb, b, b, dtype=dtype, **f))
        else:
            tensors = (torch.empty(n + 1, dtype=torch.int64, **f), torch.empty(nnz, dtype=torch.int32, **f),
                       torch.empty(nnz, dtype=dtype, **f))
        self._store(tensors)

    def _store(self, tensors) -> None:
        for name, t in zip(_FORMAT[self.pattern], tensors):
            if name == _VALUES[self.pattern]:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    @classmethod
    def from_linear(cls, linear: nn.Module, pattern: str = "2:4", block_size: int = 64) -> "SparseLinear":
        """Compress ``linear``'s weight (an ``nn.Linear`` or subclass, or a Hugging Face
        ``Conv1D``), whose zeros must already follow ``pattern`` (use ``bigkernels.prune_``
        first); 2:4 needs at most 2 non-zeros in every group of 4 inputs, block needs
        ``block_size`` to divide both dimensions. A layer on the meta device gives an empty
        meta-device layer, for ``load_state_dict(..., assign=True)``."""
        if not _layers.is_linear_like(linear):
            raise TypeError(f"SparseLinear.from_linear: expected an nn.Linear or a transformers Conv1D, "
                            f"got {type(linear).__name__}")
        w = _layers.linear_weight(linear).detach()
        check_weight_dtype("SparseLinear.from_linear", w.dtype)
        in_f, out_f = _layers.features(linear)
        q = cls(in_f, out_f, pattern, block_size, bias=linear.bias is not None, device="meta", dtype=w.dtype)
        if w.is_meta:  # a skeleton: the checkpoint it is loaded into (assign=True) decides the sizes
            return q
        q._set_weight(w)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q

    @classmethod
    def empty(cls, in_features: int, out_features: int, pattern: str, block_size: int = 64, bias: bool = True, *,
              nnz: int = 0, device=None, dtype=None) -> "SparseLinear":
        """A layer with uninitialised tensors sized for ``nnz`` stored weights (see ``density``:
        ``nnz = density * in_features * out_features``), to load a checkpoint into;
        ``device="meta"`` allocates nothing."""
        device = torch.get_default_device() if device is None else torch.device(device)
        q = cls(in_features, out_features, pattern, block_size, bias=bias, device="meta", dtype=dtype)
        q._empty_format(nnz, device=device, dtype=q.bias.dtype if bias else dtype)
        if bias:
            q.bias = nn.Parameter(torch.empty_like(q.bias, device=device))
        return q

    def _set_weight(self, w: Tensor) -> None:
        if self.pattern == "2:4":
            tensors = ref.to_sparse24(w)
        elif self.pattern == "block":
            tensors = ref.to_bsr(w, self.block_size)
        else:
            tensors = ref.to_csr(w)
        self._store([t.clone() for t in tensors])

    def _format(self):
        # (from the dicts: nn.Module.__getattr__ costs ~0.4 us a name, on every inference call)
        params, buffers = self._parameters, self._buffers
        return [params[n] if n in params else buffers[n] for n in _FORMAT[self.pattern]]

    @property
    def weight(self) -> Tensor:
        """The dense weight [out, in] (a new tensor on every read)."""
        return sparse_ops.to_dense(self.pattern, [t.detach() for t in self._format()], self.in_features)

    @property
    def density(self) -> float:
        return float(getattr(self, _VALUES[self.pattern]).numel()) / (self.in_features * self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of stored non-zeros is data: take the checkpoint's sizes.
        for name in _FORMAT[self.pattern]:
            key = prefix + name
            if key in state_dict and getattr(self, name, None) is not None:
                current = getattr(self, name)
                if tuple(state_dict[key].shape) == tuple(current.shape):
                    continue  # same sizes: loaded in place (FSDP2's sharded params stay what they are)
                empty = torch.empty_like(state_dict[key], dtype=current.dtype, device=current.device)
                if isinstance(current, nn.Parameter):
                    setattr(self, name, nn.Parameter(empty, requires_grad=current.requires_grad))
                else:
                    setattr(self, name, empty)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sparse_tensor_cores_apply(self, x2: Tensor) -> bool:
        """2:4 in fp16/bf16 on an sm_80+ GPU can run on the sparse tensor cores (cuSPARSELt)."""
        return (self.pattern == "2:4" and x2.is_cuda and x2.dtype in sparse_cuda.DTYPES
                and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and _sparse24_supported(x2.device))

    def _cslt_forward(self, x2: Tensor) -> Tensor:
        # Compressed once per (dtype, storage, in-place version) of the stored values; fine-tuning
        # steps bump the version, so the next inference call recompresses.
        key = (x2.dtype, x2.device, self.values.data_ptr(), _dispatch.version(self.values))
        if getattr(self, "_cslt_key", None) != key:
            self._cslt = sparse_cuda.compress(self.weight.to(device=x2.device, dtype=x2.dtype))
            self._cslt_key = key
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        return sparse_cuda.cslt_mm(x2, self._cslt, self.out_features, bias)

    def _op_forward(self, x2: Tensor) -> Tensor:
        """The differentiable kernel op (Triton / C++ / reference by device)."""
        return getattr(torch.ops.bigkernels, _OPS[self.pattern])(x2, *self._format(), self.bias)

    def _kernel_forward(self, x2: Tensor) -> Tensor:
        """The kernel path at inference: the non-differentiable kernel op (same kernels, same
        numbers as _op_forward; the autograd custom-op layer costs ~15 us a call, a sixth of a
        1024 x 1024 product at M = 1), unless the bias still wants a gradient."""
        bias = self._parameters.get("bias")
        if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
            return self._op_forward(x2)
        return _registry.call(_KERNEL_OPS[self.pattern], x2.device, x2, *self._format(), bias)

    def _dense_weight(self) -> Tensor:
        return self.weight

    @staticmethod
    def _dense_input(x2: Tensor) -> Tensor:
        return x2

    def _choose(self, x2: Tensor, stored: Tensor) -> str:
        """Measure (or look up) the fastest inference path for this input's shape."""
        kernels = {"kernel": functools.partial(self._kernel_forward, x2)}
        if self._sparse_tensor_cores_apply(x2):
            kernels = {"cusparselt": functools.partial(self._cslt_forward, x2), **kernels}
        key = ("SparseLinear", x2.device, x2.dtype, self.pattern, self.in_features, self.out_features,
               self.block_size, round(self.density, 2), self.bias is not None)
        return _dispatch.pick(self, x2, key, kernels, stored)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input("SparseLinear", x, self.in_features)
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)
        stored = self._parameters[_VALUES[self.pattern]]  # (nn.Module.__getattr__ costs ~0.4 us)
        if not _dispatch.can_dispatch(x2, stored):
            out = self._op_forward(x2)  # sparse fine-tuning, torch.compile, CUDA-graph capture
        else:
            path = self._routes.get(x2) or self._choose(x2, stored)
            if path == "kernel":
                out = self._kernel_forward(x2)
            elif path == "cusparselt":
                out = self._cslt_forward(x2)
            else:
                out = _dispatch.dense_linear(self, path, x2, stored)
        return out if flat else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.pattern == "block" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={self.pattern!r}{block}, density={self.density:.3f}")


def check_format(pattern: str, block_size: int, in_features: int, out_features: int, owner: str) -> None:
    """ValueError unless a layer of this shape can be stored in ``pattern``'s format."""
    if pattern not in PATTERNS:
        raise ValueError(f"{owner}: pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "2:4" and in_features % 4:
        raise ValueError(f"{owner}: 2:4 needs in_features divisible by 4, got {in_features}")
    if pattern == "block":
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"{owner}: block_size must be a positive integer, got {block_size!r}")
        if in_features % block_size or out_features % block_size:
            raise ValueError(f"{owner}: block_size {block_size} must divide the weight shape "
                             f"({out_features}, {in_features}) (out_features, in_features)")


def _describe(layer: "SparseLinear") -> dict:
    return {"pattern": layer.pattern, "block_size": layer.block_size, "in_features": layer.in_features,
            "out_features": layer.out_features, "bias": layer.bias is not None,
            "nnz": int(getattr(layer, _VALUES[layer.pattern]).numel())}


def _build(layer: nn.Module, spec: dict, dtype: torch.dtype) -> "SparseLinear":
    device = next(iter(layer.parameters()), torch.empty(0)).device
    return SparseLinear.empty(spec["in_features"], spec["out_features"], spec["pattern"], spec["block_size"],
                              bias=spec["bias"], nnz=spec["nnz"], device=device, dtype=dtype)


_layers.register_compressed(_layers.CompressedType(
    "SparseLinear", detect=lambda m: isinstance(m, SparseLinear), describe=_describe, build=_build))


@functools.lru_cache(maxsize=None)
def _sparse24_supported(device: torch.device) -> bool:
    return sparse_cuda.sparse24_supported(device)
