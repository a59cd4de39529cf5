"""quantize_(): swap a model's linear layers for QuantLinear, optionally with SmoothQuant."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
import warnings
from torch import Tensor, nn

from bigkernels.nn import _layers
from bigkernels.nn._checks import KERNEL_DTYPES
from bigkernels.nn.quant_linear import MODES, QuantLinear

FilterFn = Callable[[nn.Module, str], bool]


def _batches(data) -> Iterable:
    """Calibration data as an iterable of batches (a single tensor is one batch)."""
    return [data] if isinstance(data, Tensor) else data


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def run_calibration(call: str, model: nn.Module, layers: Dict[str, nn.Module], data, record) -> int:
    """Run ``model`` over each batch of ``data`` with ``record(fqn, x2d)`` seeing every input of
    ``layers`` (fqn -> linear-like layer) as [tokens, in_features] fp32; returns the number of
    batches. A layer input of the wrong width, or a forward that fails, raises naming the layer or
    the batch."""
    state = {"batch": 0}

    def hook(fqn, in_features):
        def pre(module, args):
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                raise TypeError(f"{call}: calibration batch {state['batch']}: layer {fqn!r} got no tensor input "
                                f"({type(x).__name__})")
            if x.dim() == 0 or x.shape[-1] != in_features:
                raise ValueError(f"{call}: calibration batch {state['batch']}: layer {fqn!r} got an input of shape "
                                 f"{tuple(x.shape)}; it expects the last dimension in_features={in_features}")
            record(fqn, x.detach().reshape(-1, in_features).float())
        return pre

    handles = [m.register_forward_pre_hook(hook(fqn, _layers.features(m)[0])) for fqn, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in _batches(data):
                try:
                    _run(model, batch)
                except Exception as e:
                    shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
                    e.add_note(f"{call}: while running calibration batch {state['batch']} ({shape}) through the model")
                    raise
                state["batch"] += 1
    finally:
        for h in handles:
            h.remove()
    if state["batch"] == 0:
        raise ValueError(f"{call}: calibration_data yielded no batches")
    return state["batch"]


def calibrate_input_absmax(model: nn.Module, linears: Dict[str, nn.Module], calibration_data: Iterable) -> Dict[str, Tensor]:
    """Per-input-channel max |x_j| seen by each linear-like layer over ``calibration_data`` (an
    iterable of model inputs, or one tensor), fp32, on the layer's device. Layers the data never
    reaches have no entry."""
    absmax: Dict[str, Tensor] = {}

    def record(fqn, x):
        a = x.abs().amax(dim=0)
        absmax[fqn] = a if fqn not in absmax else torch.maximum(absmax[fqn], a)

    run_calibration("quantize_", model, linears, calibration_data, record)
    return absmax


def smoothquant_scale(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel scale s_j = max|X_j|^α / max|W_j|^(1-α) (Xiao et al., 2023)
    for ``weight`` [out, in]: dividing the activation by s and multiplying the weight by s moves
    the activation outliers into the weight, where per-channel scales absorb them."""
    w_absmax = weight.detach().float().abs().amax(dim=0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def quantize_(model: nn.Module, mode: str = "w8a8", filter_fn: Optional[FilterFn] = None,
              calibration_data: Optional[Iterable] = None, smooth_alpha: float = 0.5) -> nn.Module:
    """Replace, in place, the linear layers of ``model`` — ``nn.Linear`` and its subclasses, and
    Hugging Face ``Conv1D`` — by :class:`bigkernels.nn.QuantLinear`; returns ``model``.

    Which layers: those ``filter_fn(module, fqn)`` accepts (torchao's convention); by default all
    but tied ones (a layer whose weight is shared, such as a tied ``lm_head``: replacing it
    would untie it and keep both copies — never done, even when ``filter_fn`` picks it) and
    ``nn.MultiheadAttention``'s ``out_proj``. One INFO line on the ``bigkernels`` logger says what
    was converted and what was left alone; a warning says when nothing was.

    mode: ``"w8a8"`` (int8 weights and per-token int8 activations) or ``"w8a16"`` (int8 weights).
    calibration_data: an iterable of model inputs (a tensor, a tuple of positional arguments or a
    dict of keyword arguments per batch; a single tensor is one batch); with it and mode
    ``"w8a8"``, SmoothQuant with ``smooth_alpha`` (in [0, 1]) is applied before quantising.

    Raises before changing anything: a bad argument; a model that is itself a linear layer (use
    ``QuantLinear.from_linear``); chosen layers already quantised in another mode; weights in a
    dtype the int8 kernels do not take (float64); a calibration batch that does not fit the
    layers (the error names the layer).
    """
    if mode not in MODES:
        raise ValueError(f"quantize_: mode must be one of {MODES}, got {mode!r}")
    if isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, (int, float)) or not 0.0 <= smooth_alpha <= 1.0:
        raise ValueError(f"quantize_: smooth_alpha must be in [0, 1], got {smooth_alpha!r}")
    sel = _layers.select(model, filter_fn, call="quantize_", skip_heads=False, replace=True)
    already, conflicts = {}, []
    for fqn, m in sel.converted.items():
        if isinstance(m, QuantLinear) and m.mode != mode:
            conflicts.append(f"{fqn} (mode={m.mode!r})")
        else:
            already[fqn] = f"already {type(m).__name__}" + (f"({m.mode})" if isinstance(m, QuantLinear) else "")
    if conflicts:
        raise ValueError(f"quantize_: {_layers.names(conflicts)} already quantised in another mode than "
                         f"{mode!r}; re-quantising int8 weights would compound their rounding: start from the "
                         f"float model, or leave these layers out with filter_fn")
    bad = {fqn: m.weight.dtype for fqn, m in sel.targets.items() if m.weight.dtype not in KERNEL_DTYPES}
    if bad:
        raise TypeError(f"quantize_: {_layers.names(list(bad))} have {str(next(iter(bad.values())))[6:]} weights; QuantLinear "
                        f"computes in {', '.join(str(d)[6:] for d in KERNEL_DTYPES)}: cast the model first "
                        f"(model.float()) or leave these layers out with filter_fn")
    absmax, smooth = {}, ""
    if calibration_data is not None and mode == "w8a16":
        warnings.warn("quantize_: calibration_data is used by mode='w8a8' (SmoothQuant) only; ignored for w8a16",
                      stacklevel=2)
    elif calibration_data is not None and sel.targets:
        absmax = calibrate_input_absmax(model, sel.targets, calibration_data)
        missed = [fqn for fqn in sel.targets if fqn not in absmax]
        smooth = ", SmoothQuant" + (f" except {_layers.names(missed)} (not reached by calibration_data)" if missed else "")

    def convert(fqn, layer):
        scale = smoothquant_scale(absmax[fqn], _layers.linear_weight(layer), smooth_alpha) if fqn in absmax else None
        return QuantLinear.from_linear(layer, mode=mode, smooth_scale=scale)

    done = _layers.replace_each("quantize_", model, sel.targets, convert)
    _layers.report("quantize_", f"QuantLinear({mode}{smooth})", done, sel, extra_skipped=already, model=model)
    return model
