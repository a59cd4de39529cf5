"""CodebookLinear: a weight-shared drop-in for nn.Linear (each weight an index into a small codebook)."""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor, nn

from bigkernels.nn import _dispatch, _layers
from bigkernels.nn._checks import check_linear_input
from bigkernels.ops import _registry
from bigkernels.ops import codebook as ops
from bigkernels.reference import codebook as ref


def cpu_engine() -> bool:
    """Whether ``codebook_mm`` on CPU tensors runs the C++ kernels with the AVX2 panel engine
    (csrc/codebook/codebook_cpu_panels.h): lookup-table tiles for a few rows of x, then the packed
    panel GEMM (index panels decoded in L1 for a 6 x 16 FMA micro-kernel that runs at ~80% of the
    FMA peak, above MKL's sgemm on these CPUs). Then the kernel is the layer's fast path at every
    batch size and a dense fallback that is not cached (decode the whole weight, then F.linear)
    cannot win. Re-read with the environment (``BIGKERNELS_CPU_ISA`` caps the kernels)."""
    return _cpu_engine(os.environ.get("BIGKERNELS_CPU_ISA"), os.environ.get("BIGKERNELS_IMPL"))


@functools.lru_cache(maxsize=None)
def _cpu_engine(_isa_cap, _impl) -> bool:
    from bigkernels._info import cpu_kernel_isa

    return (_registry.choose("codebook_mm", "cpu") == "cpu-c++" and cpu_kernel_isa().startswith("avx")
            and _registry.has_kernel(f"{_registry.NAMESPACE}::codebook_mm", "CPU"))


def _check_config(in_features, out_features, bits, group_size) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"CodebookLinear: {name} must be a non-negative integer, got {v!r}")
    if isinstance(bits, bool) or bits not in ref.BITS:
        raise ValueError(f"CodebookLinear: bits must be one of {ref.BITS}, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"CodebookLinear: group_size must be None (one codebook per layer) or a positive number "
                         f"of output rows, got {group_size!r}")


class CodebookLinear(nn.Module):
    """``y = x Wᵀ + b`` with every weight shared: ``W[n, k] = centroids[n // group_size, index(n, k)]``.

    Storage (see ``bigkernels/reference/codebook.py`` for the bit layout):

    - ``indices`` buffer ``[out_features, packed]`` uint8: a ``bits``-bit index per weight
      (bits in {2, 3, 4, 8}; 4 bits: two per byte; 3 bits: eight in three bytes);
    - ``centroids`` parameter ``[groups, 2**bits]``: one codebook per layer (``group_size=None``)
      or per ``group_size`` output rows, in the layer's dtype (fp32 by default);
    - ``bias`` parameter ``[out_features]`` or None.

    The centroids are trainable: fine-tuning updates them and keeps every weight tied to its
    centroid (gradients flow to the input, the centroids and the bias; the indices are fixed).
    ``weight`` reads back the dense weight ``[out, in]`` (differentiable w.r.t. the centroids when
    grad mode is on and they require grad). Inputs of any leading shape, fp32/bf16/fp16; output in
    x's dtype.

    Inference runs a lookup-table GEMV/GEMM (indices -> centroids in registers, no dense weight in
    memory; on AVX2 CPUs from 12 rows of x on (9 for 8-bit indices), index panels decoded into the
    packed-panel GEMM engine). On such a CPU a layer whose dense weight exceeds the dense-cache budget
    (``BIGKERNELS_DENSE_CACHE_BYTES``, 1 MiB) always runs that kernel (see :meth:`_choose`); other
    layers and devices run the fastest of the kernel and the dense product with the weight decoded
    (per call, or once and kept for layers within the budget), measured on first use
    (``bigkernels.nn._dispatch``). Training and ``torch.compile`` run the differentiable kernel op.

    Build from a trained layer with :meth:`from_linear` (1-D k-means, see
    :func:`bigkernels.quant.codebook.kmeans_1d`) or for a whole model with
    :func:`bigkernels.share_weights_`. ``CodebookLinear(in, out, bias, bits, group_size)`` (or
    :meth:`from_config` of :meth:`config`) builds an empty layer of the right shapes for
    ``load_state_dict``; its initial weights follow ``nn.Linear``'s uniform init, shared.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        _check_config(in_features, out_features, bits, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        factory = dict(device=device, dtype=dtype)
        c = 1 << bits
        groups = ref.num_groups(out_features, self._gs)
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        # nn.Linear's init, U(-bound, bound), shared: the 2**bits evenly spaced cell centres of the
        # interval, each weight a uniformly random index (on the meta device: shapes only).
        steps = torch.arange(c, dtype=torch.float32) * 2 + 1
        cent = (steps * (bound / c) - bound).to(**factory).expand(groups, c).clone()
        self.centroids = nn.Parameter(cent)
        idx_device = torch.device(device) if device is not None else None
        if idx_device is not None and idx_device.type == "meta":
            packed = torch.empty((out_features, ref.packed_cols(in_features, bits)), dtype=torch.uint8, device="meta")
        else:
            idx = torch.randint(0, c, (out_features, in_features), device=device)
            packed = ref.pack_indices(idx, bits)
        self.register_buffer("indices", packed)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._dense = _dispatch.DenseCache()
        self._routes = _dispatch.Routes()
        self._indices_seen = None

    @property
    def _gs(self) -> int:
        """The rows per codebook as the ops take it (the whole layer when group_size is None)."""
        return self.group_size if self.group_size is not None else max(self.out_features, 1)

    # ----- construction ------------------------------------------------------------------------
    def config(self) -> dict:
        """The constructor arguments that fix every tensor's shape (what a saved model needs to
        rebuild the layer before loading its state_dict)."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    bits=self.bits, group_size=self.group_size)

    @classmethod
    def from_config(cls, config: dict, device=None, dtype=None) -> "CodebookLinear":
        """An empty layer from :meth:`config`'s dict, ready for ``load_state_dict``."""
        return cls(**config, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: Optional[int] = None, method: str = "kmeans",
                    iters: int = 20, sample_weight: Optional[Tensor] = None) -> "CodebookLinear":
        """Share the weights of a linear-like layer (``nn.Linear`` or a subclass, Hugging Face
        ``Conv1D``): 1-D k-means per codebook (:func:`bigkernels.quant.codebook.kmeans_1d`;
        ``sample_weight`` broadcastable to [out, in] weights each weight's squared error). The
        bias is copied; the centroids take the weight's dtype and device."""
        from bigkernels.quant.codebook import fit_codebook

        if not _layers.is_linear_like(linear):
            raise TypeError(f"CodebookLinear.from_linear: expected an nn.Linear (or subclass) or a transformers Conv1D, "
                            f"got {type(linear).__name__}")
        in_f, out_f = _layers.features(linear)
        _check_config(in_f, out_f, bits, group_size)
        w = _layers.linear_weight(linear).detach()
        if w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"CodebookLinear.from_linear: expected a 2-D floating-point weight, got {w.dtype} "
                             f"with shape {tuple(w.shape)}")
        packed, cent = fit_codebook(w, bits, group_size, iters, sample_weight, method)
        layer = cls(in_f, out_f, bias=linear.bias is not None, bits=bits, group_size=group_size, device="meta",
                    dtype=w.dtype)
        layer.centroids = nn.Parameter(cent.to(device=w.device, dtype=w.dtype),
                                       requires_grad=_layers.linear_weight(linear).requires_grad)
        layer.indices = packed.to(w.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    # ----- views -------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The dense weight [out, in] in the centroids' dtype (a new tensor on every read)."""
        c = self.centroids
        if torch.is_grad_enabled() and c.requires_grad:
            return ref.codebook_dequantize(self.indices, c, self.in_features, self._gs)
        return ops.dequantize(self.indices, c.detach(), self.in_features, self._gs)

    @property
    def num_codebooks(self) -> int:
        return self.centroids.shape[0]

    def _op_forward(self, x2: Tensor) -> Tensor:
        """The differentiable lookup-table op (C++ / Triton / reference by device)."""
        return torch.ops.bigkernels.codebook_linear(x2, self._buffers["indices"], self._parameters["centroids"],
                                                    self._parameters["bias"], self._gs)

    def _kernel_forward(self, x2: Tensor) -> Tensor:
        """The lookup-table kernel for inference: the non-differentiable op (the differentiable
        one's autograd layer costs ~50 us a call), unless the bias still wants a gradient."""
        bias = self._parameters["bias"]
        if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
            return self._op_forward(x2)
        return ops.codebook_mm(x2, self._buffers["indices"], self._parameters["centroids"].detach(), bias, self._gs)

    def _dense_weight(self) -> Tensor:
        return ops.dequantize(self._buffers["indices"], self._parameters["centroids"].detach(), self.in_features,
                              self._gs)

    @staticmethod
    def _dense_input(x2: Tensor) -> Tensor:
        return x2

    def _choose(self, x2: Tensor, stored: Tensor) -> str:
        """The path for this input's batch size. On a CPU with the panel engine (:func:`cpu_engine`),
        a layer whose dense weight exceeds the dense-cache budget runs the kernel without timing
        anything: its only dense fallback there ("decompress") builds the whole weight per call and
        multiplies it with MKL, which the engine outruns at every M (measured:
        benchmarks/bench_codebook.py --sweep), and a first-call timing on a loaded machine can pick
        it wrongly. Other layers (small ones, which may keep a dense copy; other devices) are
        measured by the shared dispatch."""
        dense_bytes = self.in_features * self.out_features * x2.element_size()
        if (x2.device.type == "cpu" and _dispatch.mode() == "measure" and dense_bytes > _dispatch.cache_bytes()
                and cpu_engine()):
            self._routes.put(x2, "kernel")
            self._dense.drop()
            return "kernel"
        key = ("CodebookLinear", x2.device, x2.dtype, self.bits, self.num_codebooks, self.in_features,
               self.out_features, self.bias is not None)
        return _dispatch.pick(self, x2, key, {"kernel": functools.partial(self._kernel_forward, x2)}, stored)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input("CodebookLinear", x, self.in_features)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        stored = self._parameters["centroids"]
        if not _dispatch.can_dispatch(x2, stored):
            out = self._op_forward(x2)  # codebook fine-tuning, torch.compile, CUDA-graph capture
        else:
            # The dense cache follows the centroids' version; indices changed in place drop it too.
            seen = _dispatch.version(self._buffers["indices"])
            if seen != self._indices_seen:
                self._dense.drop()
                self._indices_seen = seen
            path = self._routes.get(x2) or self._choose(x2, stored)
            out = self._kernel_forward(x2) if path == "kernel" else _dispatch.dense_linear(self, path, x2, stored)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        groups = "per layer" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, codebooks={self.num_codebooks} ({groups})")


def _describe(layer: CodebookLinear) -> dict:
    return layer.config()


def _build(layer: nn.Module, spec: dict, dtype: torch.dtype) -> CodebookLinear:
    keys = ("in_features", "out_features", "bias", "bits", "group_size")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise ValueError(f"CodebookLinear: the saved layer spec lacks {', '.join(missing)} (has {sorted(spec)})")
    device = next(iter(layer.parameters()), torch.empty(0)).device
    return CodebookLinear.from_config({k: spec[k] for k in keys}, device=device, dtype=dtype)


_layers.register_compressed(_layers.CompressedType(
    "CodebookLinear", detect=lambda m: isinstance(m, CodebookLinear), describe=_describe, build=_build))
