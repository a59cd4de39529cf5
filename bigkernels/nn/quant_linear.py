"""QuantLinear: an int8-weight drop-in for nn.Linear at inference (and for adapters on a frozen base)."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from bigkernels.nn import _dispatch, _layers
from bigkernels.ops.quant import _w8a8_linear_impl, _w8a16_linear_impl, quant_linear, quantize_per_token
from bigkernels.ops.quant import w8a8_quantizes_activations
from bigkernels.nn._checks import check_linear_input, check_weight_dtype
from bigkernels.ops._dtensor import is_dtensor
from bigkernels.reference import quant as ref

MODES = ("w8a8", "w8a16")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"QuantLinear: mode must be one of {MODES}, got {mode!r}")
    return mode


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with W stored as int8 (symmetric per-output-channel absmax scales).

    mode ``"w8a16"``: activations stay in their float dtype; the int8 weight is dequantised inside
    the GEMM/GEMV. mode ``"w8a8"``: activations are quantised per token (dynamic, symmetric), the
    GEMM is int8 x int8 -> int32, and the scales and bias are applied in its epilogue.

    Buffers: ``weight_int8`` [out, in] int8, ``weight_scale`` [out] fp32 (stays fp32 under
    ``.to(dtype)``), optional ``smooth_scale`` [in] (SmoothQuant's per-input-channel divisor);
    ``bias`` is a parameter in the compute dtype. ``weight`` reads back the dequantised weight, so
    code that inspects ``layer.weight`` keeps working. Gradients flow to the input (and the bias);
    the int8 weight is frozen. Inputs of any leading shape, fp32/bf16/fp16; output in x's dtype.

    Each shape and batch size runs the fastest of the int8 kernels and the dense product with the
    weight dequantised (per call, or once and kept for layers of at most 1 MiB dense), measured
    on first use (``bigkernels.nn._dispatch``), so the layer is not slower than the ``nn.Linear``
    it replaced. The dense paths reproduce the kernels' numbers (w8a8 quantises the activations
    there too), up to float rounding. Training and ``torch.compile`` run the int8 op.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, _check_mode(mode)
        factory = dict(device=device, dtype=dtype)
        init = nn.Linear(in_features, out_features, bias=bias, **factory)  # torch's init, then quantised
        check_weight_dtype("QuantLinear", init.weight.dtype)
        self._set_weight(init.weight.detach(), None)
        self.bias = nn.Parameter(init.bias.detach().clone()) if bias else None
        # The float dtype the layer computes in and ``weight`` reads back in (the bias's, when
        # there is one); a plain attribute, so that a layer built on the meta device and then
        # loaded with load_state_dict(assign=True) has nothing left on meta.
        self.compute_dtype = init.weight.dtype
        self._dense = _dispatch.DenseCache()
        self._routes = _dispatch.Routes()

    def _set_weight(self, w: Tensor, smooth_scale: Optional[Tensor]) -> None:
        if smooth_scale is not None:
            smooth_scale = smooth_scale.detach().float().to(w.device).clone()
            w = w.float() * smooth_scale
        w_int8, w_scale = ref.quantize_weight(w)
        self.register_buffer("weight_int8", w_int8)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("smooth_scale", smooth_scale)

    @classmethod
    def from_linear(cls, linear: nn.Module, mode: str = "w8a8",
                    smooth_scale: Optional[Tensor] = None) -> "QuantLinear":
        """Quantise ``linear``'s weight: an ``nn.Linear`` (or subclass) or a Hugging Face
        ``Conv1D`` (GPT-2's transposed linear). ``smooth_scale`` s (SmoothQuant) quantises
        ``W * s`` and divides the input by s at run time, so the product is unchanged."""
        if not _layers.is_linear_like(linear):
            raise TypeError(f"QuantLinear.from_linear: expected an nn.Linear or a transformers Conv1D, "
                            f"got {type(linear).__name__}")
        w = _layers.linear_weight(linear).detach()
        if w.dim() != 2:
            raise ValueError(f"QuantLinear.from_linear: expected a 2-D weight, got shape {tuple(w.shape)}")
        check_weight_dtype("QuantLinear.from_linear", w.dtype)
        in_f, out_f = _layers.features(linear)
        if smooth_scale is not None and tuple(smooth_scale.shape) != (in_f,):
            raise ValueError(f"QuantLinear.from_linear: smooth_scale must have shape ({in_f},) (in_features), "
                             f"got {tuple(smooth_scale.shape)}")
        q = cls(in_f, out_f, bias=linear.bias is not None, mode=mode, device="meta", dtype=w.dtype)
        q._set_weight(w, smooth_scale)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q

    def __setstate__(self, state):
        # layers pickled before compute_dtype existed kept it in a ``_dtype_probe`` buffer
        super().__setstate__(state)
        if "compute_dtype" not in self.__dict__:
            probe = self._buffers.pop("_dtype_probe", None)
            self.compute_dtype = probe.dtype if probe is not None else self.weight_scale.dtype

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8", *,
              smoothquant: bool = False, device=None, dtype=None) -> "QuantLinear":
        """A layer with uninitialised tensors of the right shapes (``smoothquant``: with a
        ``smooth_scale`` buffer), to load a checkpoint into; ``device="meta"`` allocates nothing."""
        device = torch.get_default_device() if device is None else torch.device(device)
        q = cls(in_features, out_features, bias=bias, mode=mode, device="meta", dtype=dtype)
        q._apply(lambda t: torch.empty_like(t, device=device))
        if smoothquant:
            q.smooth_scale = torch.empty(in_features, dtype=torch.float32, device=q.weight_scale.device)
        return q

    @property
    def weight(self) -> Tensor:
        """The dequantised weight [out, in] in the compute dtype (a new tensor on every read)."""
        w = ref.dequantize_weight(self.weight_int8, self.weight_scale, torch.float32)
        if self.smooth_scale is not None:
            w = w / self.smooth_scale
        return w.to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype) casts floating buffers: the scales must stay fp32 (only their device follows),
        # and the compute dtype follows what fn does to a float tensor of that dtype.
        fp32 = {name: getattr(self, name) for name in ("weight_scale", "smooth_scale") if getattr(self, name) is not None}
        probe = torch.empty(0, dtype=self.compute_dtype)
        super()._apply(fn, recurse)
        for name, t in fp32.items():
            setattr(self, name, t.to(getattr(self, name).device))
        self.compute_dtype = self.bias.dtype if self.bias is not None else fn(probe).dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # SmoothQuant's scale is part of the quantised weight: a checkpoint's weight_int8 comes with
        # its smooth_scale or without one, whichever way this layer was built (a layer quantised
        # without calibration data loads a SmoothQuant checkpoint, and the other way round).
        key = prefix + "smooth_scale"
        if prefix + "weight_int8" in state_dict:
            if key in state_dict and self.smooth_scale is None:
                self.smooth_scale = torch.empty(self.in_features, dtype=torch.float32, device=self.weight_scale.device)
            elif key not in state_dict and self.smooth_scale is not None:
                self.smooth_scale = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype

    def _kernel_forward(self, x2: Tensor) -> Tensor:
        """The differentiable int8 op of the mode (gradients to the input and the bias)."""
        if self.smooth_scale is not None:
            x2 = x2 / self.smooth_scale.to(x2.dtype)
        bias = None if self.bias is None else self.bias.float()
        return quant_linear(x2, self.weight_int8, self.weight_scale, bias, self.mode)

    def _infer_forward(self, x2: Tensor) -> Tensor:
        """The kernel path at inference: the mode's op bodies called directly, without the
        autograd custom-op layer around them (the same kernels and numbers as _kernel_forward;
        10-100 us less per call: up to half of a 1024 x 1024 product at M = 1). A bias that wants
        a gradient (grad mode on, e.g. a model called without torch.no_grad) is added outside
        the kernel by torch's autograd-aware add: for fp32 that is the kernel's own rounding
        (the product scaled, then the bias added, in fp32); other dtypes take _kernel_forward."""
        bias = self.bias
        late_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        if late_bias and x2.dtype != torch.float32:
            return self._kernel_forward(x2)
        if self.smooth_scale is not None:
            x2 = x2 / self.smooth_scale.to(x2.dtype)
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        impl = _w8a8_linear_impl if self.mode == "w8a8" else _w8a16_linear_impl
        if late_bias:
            return impl(x2, self._buffers["weight_int8"], self._buffers["weight_scale"], None) + bias
        return impl(x2, self._buffers["weight_int8"], self._buffers["weight_scale"], bias)

    def _dense_weight(self) -> Tensor:
        """The weight the int8 kernels multiply by (SmoothQuant's scale still folded in)."""
        return ref.dequantize_weight(self.weight_int8, self.weight_scale, torch.float32)

    def _dense_input(self, x2: Tensor) -> Tensor:
        """The input as the int8 kernels see it: divided by the SmoothQuant scale and, for w8a8,
        quantised per token and dequantised (so the dense paths give the kernel's numbers)."""
        smooth = self._buffers.get("smooth_scale")  # (nn.Module.__getattr__ costs ~0.4 us a call)
        if smooth is not None:
            x2 = x2 / smooth.to(x2.dtype)
        if self.mode == "w8a8" and w8a8_quantizes_activations(x2):
            xq, xs = quantize_per_token(x2)
            x2 = (xq.float() * xs.unsqueeze(1)).to(x2.dtype)
        return x2

    def _choose(self, x2: Tensor, stored: Tensor) -> str:
        key = ("QuantLinear", x2.device, x2.dtype, self.mode, self.in_features, self.out_features,
               self.bias is not None, self.smooth_scale is not None)
        return _dispatch.pick(self, x2, key, {"kernel": functools.partial(self._infer_forward, x2)}, stored)

    def forward(self, x: Tensor) -> Tensor:
        stored = self._buffers["weight_int8"]
        if is_dtensor(stored):  # split by bk.distributed.ColwiseParallel / RowwiseParallel
            from bigkernels import distributed

            return distributed.quant_linear_forward(self, x)
        check_linear_input("QuantLinear", x, self.in_features)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if _dispatch.can_dispatch(x2, stored):
            path = self._routes.get(x2) or self._choose(x2, stored)
            out = self._infer_forward(x2) if path == "kernel" else _dispatch.dense_linear(self, path, x2, stored)
        else:
            out = self._kernel_forward(x2)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        smooth = ", smoothquant" if self.smooth_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}, weight=int8[{self.out_features}, {self.in_features}]{smooth}")


def _describe(q: QuantLinear) -> dict:
    return {"mode": q.mode, "in_features": q.in_features, "out_features": q.out_features,
            "bias": q.bias is not None, "smoothquant": q.smooth_scale is not None}


def _build(layer: nn.Module, spec: dict, dtype: torch.dtype) -> QuantLinear:
    device = next(iter(layer.parameters()), torch.empty(0)).device
    return QuantLinear.empty(spec["in_features"], spec["out_features"], bias=spec["bias"], mode=spec["mode"],
                             smoothquant=spec["smoothquant"], device=device, dtype=dtype)


_layers.register_compressed(_layers.CompressedType(
    "QuantLinear", detect=lambda m: isinstance(m, QuantLinear), describe=_describe, build=_build))
