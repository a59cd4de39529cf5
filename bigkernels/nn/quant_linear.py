"""QuantLinear: an int8-weight drop-in for nn.Linear at inference (and for adapters on a frozen base)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from bigkernels.ops.quant import quant_linear
from bigkernels.nn._checks import check_linear_input
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
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, _check_mode(mode)
        factory = dict(device=device, dtype=dtype)
        init = nn.Linear(in_features, out_features, bias=bias, **factory)  # torch's init, then quantised
        self._set_weight(init.weight.detach(), None)
        self.bias = nn.Parameter(init.bias.detach().clone()) if bias else None
        self.register_buffer("_dtype_probe", torch.empty(0, **factory), persistent=False)

    def _set_weight(self, w: Tensor, smooth_scale: Optional[Tensor]) -> None:
        if smooth_scale is not None:
            smooth_scale = smooth_scale.detach().float().to(w.device).clone()
            w = w.float() * smooth_scale
        w_int8, w_scale = ref.quantize_weight(w)
        self.register_buffer("weight_int8", w_int8)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("smooth_scale", smooth_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8",
                    smooth_scale: Optional[Tensor] = None) -> "QuantLinear":
        """Quantise ``linear``'s weight. ``smooth_scale`` s (SmoothQuant) quantises ``W * s`` and
        divides the input by s at run time, so the product is unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.dim() != 2:
            raise ValueError(f"QuantLinear.from_linear: expected a 2-D weight, got shape {tuple(w.shape)}")
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode, device="meta",
                dtype=w.dtype)
        q._set_weight(w, smooth_scale)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        q._dtype_probe = torch.empty(0, dtype=w.dtype, device=w.device)
        return q

    @property
    def weight(self) -> Tensor:
        """The dequantised weight [out, in] in the compute dtype (a new tensor on every read)."""
        w = ref.dequantize_weight(self.weight_int8, self.weight_scale, torch.float32)
        if self.smooth_scale is not None:
            w = w / self.smooth_scale
        return w.to(self._dtype_probe.dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype) casts floating buffers: the scales must stay fp32 (only their device follows).
        fp32 = {name: getattr(self, name) for name in ("weight_scale", "smooth_scale") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, t in fp32.items():
            setattr(self, name, t.to(getattr(self, name).device))
        return self

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input("QuantLinear", x, self.in_features)
        if self.smooth_scale is not None:
            x = x / self.smooth_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.float()
        return quant_linear(x, self.weight_int8, self.weight_scale, bias, self.mode)

    def extra_repr(self) -> str:
        smooth = ", smoothquant" if self.smooth_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}, weight=int8[{self.out_features}, {self.in_features}]{smooth}")
