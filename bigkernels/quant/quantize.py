"""quantize_(): swap a model's nn.Linear layers for QuantLinear, optionally with SmoothQuant."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from bigkernels.nn.quant_linear import MODES, QuantLinear

FilterFn = Callable[[nn.Module, str], bool]


def _targets(model: nn.Module, filter_fn: Optional[FilterFn]) -> Dict[str, nn.Linear]:
    return {fqn: m for fqn, m in model.named_modules()
            if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, fqn))}


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate_input_absmax(model: nn.Module, linears: Dict[str, nn.Linear], calibration_data: Iterable) -> Dict[str, Tensor]:
    """Per-input-channel max |x_j| seen by each linear over ``calibration_data`` (fp32, CPU-free:
    kept on the layer's device)."""
    absmax: Dict[str, Tensor] = {}

    def hook(fqn):
        def record(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float().abs().amax(dim=0)
            absmax[fqn] = x if fqn not in absmax else torch.maximum(absmax[fqn], x)
        return record

    handles = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in linears.items()]
    try:
        batches = 0
        for batch in calibration_data:
            _run(model, batch)
            batches += 1
        if batches == 0:
            raise ValueError("quantize_: calibration_data yielded no batches")
    finally:
        for h in handles:
            h.remove()
    return absmax


def smoothquant_scale(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel scale s_j = max|X_j|^α / max|W_j|^(1-α) (Xiao et al., 2023):
    dividing the activation by s and multiplying the weight by s moves the activation outliers
    into the weight, where per-channel scales absorb them."""
    w_absmax = weight.detach().float().abs().amax(dim=0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_(model: nn.Module, mode: str = "w8a8", filter_fn: Optional[FilterFn] = None,
              calibration_data: Optional[Iterable] = None, smooth_alpha: float = 0.5) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` (those for which
    ``filter_fn(module, fqn)`` is true) by a :class:`bigkernels.nn.QuantLinear`; returns ``model``.

    mode: ``"w8a8"`` (int8 weights and per-token int8 activations) or ``"w8a16"`` (int8 weights).
    calibration_data: an iterable of model inputs (a tensor, a tuple of positional arguments or a
    dict of keyword arguments per batch); with it and mode ``"w8a8"``, SmoothQuant with
    ``smooth_alpha`` is applied before quantising (``smooth_alpha`` in [0, 1]).
    """
    if mode not in MODES:
        raise ValueError(f"quantize_: mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= smooth_alpha <= 1.0:
        raise ValueError(f"quantize_: smooth_alpha must be in [0, 1], got {smooth_alpha}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: expected an nn.Module, got {type(model).__name__}")
    linears = _targets(model, filter_fn)
    absmax = {}
    if calibration_data is not None and mode == "w8a8" and linears:
        absmax = calibrate_input_absmax(model, linears, calibration_data)
    for fqn, linear in linears.items():
        scale = smoothquant_scale(absmax[fqn], linear.weight, smooth_alpha) if fqn in absmax else None
        _set_submodule(model, fqn, QuantLinear.from_linear(linear, mode=mode, smooth_scale=scale))
    return model
