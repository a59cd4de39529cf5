"""Saving and loading Hugging Face models compressed by bigkernels (``save_pretrained`` /
``from_pretrained``), through transformers' quantizer API (``register_quantization_config`` /
``register_quantizer``).

Saving: every model-level call (``quantize_``, ``prune_``, ``sparsify_``, ...) that changes a
``PreTrainedModel`` calls :func:`record`, which sets ``model.config.quantization_config`` to a
:class:`BigkernelsConfig` listing each compressed layer — ``{fqn: {"type": name, **spec}}``, one
entry per layer, ``type`` being a registered :class:`bigkernels.nn._layers.CompressedType`
(QuantLinear, SparseLinear, a pruned linear layer with its mask, ...) and ``spec`` what that type's
``describe`` returns. ``save_pretrained`` writes that config into config.json and the compressed
layers' tensors (``weight_int8``, ``weight_scale``, ``smooth_scale``, CSR/BSR/2:4 tensors,
``weight_mask``) into the safetensors file, as their ``state_dict`` names them.

Loading: ``from_pretrained`` reads quant_method ``"bigkernels"`` and builds a
:class:`BigkernelsHfQuantizer`; before the weights are read, it replaces each listed layer of the
freshly built (meta-device) model with ``CompressedType.build(layer, spec, dtype)`` — an empty
layer whose tensors have exactly the saved shapes — so the checkpoint's tensors load into it as
they are; afterwards each type's ``loaded`` hook runs (a pruned layer's mask is registered again).
Tied weights are never converted by bigkernels, so transformers ties them as usual.

A new compressed layer type needs no change here: register it with
``bigkernels.nn._layers.register_compressed`` where the layer is defined, and let its model-level
call report through ``bigkernels.nn._layers.report(..., model=model)``.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict

import torch
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bigkernels.nn import _layers

QUANT_METHOD = "bigkernels"
FORMAT_VERSION = 1


class BigkernelsConfig(QuantizationConfigMixin):
    """``quantization_config`` of a Hugging Face model compressed by bigkernels.

    layers: ``{fqn: {"type": <compressed layer type>, **spec}}`` for every compressed layer
    (made by bigkernels' model-level calls; not meant to be written by hand).
    format_version: the layout of ``layers``; a checkpoint from a newer layout is refused.
    """

    def __init__(self, layers: Dict[str, Dict[str, Any]] = None, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.layers = {fqn: dict(spec) for fqn, spec in (layers or {}).items()}
        self.format_version = int(format_version)

    def check(self) -> None:
        """ValueError for a config this version of bigkernels cannot load."""
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"bigkernels: this checkpoint was saved in format {self.format_version} by a newer "
                             f"bigkernels (this one reads up to {FORMAT_VERSION}); upgrade bigkernels")
        unknown = sorted({str(spec.get("type")) for spec in self.layers.values()} - set(_layers.COMPRESSED))
        if unknown:
            raise ValueError(f"bigkernels: this checkpoint has compressed layers of type {', '.join(unknown)}, "
                             f"unknown to this bigkernels (known: {', '.join(_layers.COMPRESSED)}); upgrade "
                             f"bigkernels or import the package that defines them")


class BigkernelsHfQuantizer(HfQuantizer):
    """Loads a model saved by ``save_pretrained`` after bigkernels compressed it (see the module
    docstring). Compressing a float model while loading is not supported: load it, then call
    ``bigkernels.quantize_`` / ``prune_`` / ``sparse.sparsify_``."""

    requires_calibration = False
    quantization_config: BigkernelsConfig

    def __init__(self, quantization_config: BigkernelsConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._dtype = None

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("BigkernelsConfig describes a model bigkernels already compressed; to compress a "
                             "float model, load it and call bigkernels.quantize_ / prune_ / sparse.sparsify_")
        self.quantization_config.check()

    def update_dtype(self, dtype):
        self._dtype = dtype
        return dtype

    def preprocess_model(self, model, dtype=None, **kwargs):
        if dtype is not None:
            self._dtype = dtype
        super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        dtype = self._dtype if isinstance(self._dtype, torch.dtype) else torch.get_default_dtype()
        for fqn, spec in self.quantization_config.layers.items():
            name = _resolve(model, fqn)
            layer = model.get_submodule(name)
            entry = _layers.COMPRESSED[spec["type"]]
            if not _layers.is_linear_like(layer):
                raise ValueError(f"bigkernels: the checkpoint compressed layer {fqn!r} ({spec['type']}), but this "
                                 f"model has a {type(layer).__name__} there, not a linear layer")
            try:
                new = entry.build(layer, spec, dtype)
            except Exception as e:
                raise type(e)(f"bigkernels: layer {fqn!r} ({spec['type']}): {e}") from e
            if new is not layer:
                _layers.set_submodule(model, name, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for fqn, spec in self.quantization_config.layers.items():
            entry = _layers.COMPRESSED[spec["type"]]
            if entry.loaded is not None:
                entry.loaded(model.get_submodule(_resolve(model, fqn)))
        # Not "quantized" in transformers' sense: these layers follow .to(dtype) / .half() and
        # (SparseLinear, pruned layers) train; transformers would refuse both for is_quantized.
        model.is_quantized = False
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _resolve(model: nn.Module, fqn: str) -> str:
    """``fqn`` in ``model``, allowing for a checkpoint saved from the base model (or with it)."""
    names = dict(model.named_modules())
    if fqn in names:
        return fqn
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in ((fqn[len(prefix) + 1:] if prefix and fqn.startswith(prefix + ".") else None),
                      (f"{prefix}.{fqn}" if prefix else None)):
        if candidate in names:
            return candidate
    raise ValueError(f"bigkernels: the checkpoint compressed layer {fqn!r}, which this model "
                     f"({type(model).__name__}) does not have")


def _is_ours(config) -> bool:
    if isinstance(config, BigkernelsConfig):
        return True
    return isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD


def record(model: nn.Module) -> None:
    """Bring ``model.config.quantization_config`` up to date with the model's compressed layers
    (removed when it has none left), so ``save_pretrained`` saves what ``from_pretrained`` needs."""
    config = model.config
    existing = getattr(config, "quantization_config", None)
    if existing is not None and not _is_ours(existing):
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        warnings.warn(f"bigkernels: this model is already quantised by {getattr(method, 'value', method)!r}; "
                      f"bigkernels cannot record its own layers next to that, so save_pretrained / from_pretrained "
                      f"will not restore them", stacklevel=4)
        return
    layers = {fqn: {"type": entry.name, **entry.describe(m)} for fqn, (entry, m) in _layers.compressed_layers(model).items()}
    if not layers:
        if existing is not None:
            del config.quantization_config
            for attr in ("hf_quantizer", "quantization_method"):
                if hasattr(model, attr):
                    delattr(model, attr)
        return
    qconfig = BigkernelsConfig(layers=layers)
    config.quantization_config = qconfig
    model.hf_quantizer = BigkernelsHfQuantizer(qconfig, pre_quantized=True)
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Make quant_method "bigkernels" known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BigkernelsConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BigkernelsHfQuantizer)
