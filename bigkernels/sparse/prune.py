"""prune_(), GradualPruner and sparsify_(): zero a model's linear weights, keep them zero while
training, and store the pruned layers compressed."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from bigkernels.nn import _layers
from bigkernels.nn._checks import KERNEL_DTYPES
from bigkernels.sparse import masks as M
from bigkernels.sparse import mask_registry

FilterFn = Callable[[nn.Module, str], bool]
# What prune_ records on each layer it pruned: (pattern, block_size), for sparsify_ and saving.
_RECORD = "_bk_prune"


def pruned_pattern(module: nn.Module) -> Optional[Tuple[str, int]]:
    """(pattern, block_size) that prune_ last applied to ``module``, or None."""
    return getattr(module, _RECORD, None)


def input_norms(model: nn.Module, linears: Dict[str, nn.Module], calibration_data: Iterable,
                call: str = "prune_") -> Dict[str, Tensor]:
    """Per-input-feature L2 norm over all calibration tokens, for each linear-like layer (Wanda's
    ||X_j||); layers the data never reaches have no entry."""
    from bigkernels.quant.quantize import run_calibration

    sq: Dict[str, Tensor] = {}

    def record(fqn, x):
        s = x.square().sum(dim=0)
        sq[fqn] = s if fqn not in sq else sq[fqn] + s

    run_calibration(call, model, linears, calibration_data, record)
    return {k: v.sqrt() for k, v in sq.items()}


def apply_mask_(linear: nn.Module, mask: Tensor) -> None:
    """Zero the pruned weights in place and keep the mask as the ``weight_mask`` buffer. ``mask``
    is shaped like ``linear.weight`` itself ([in, out] for a Hugging Face Conv1D)."""
    mask = mask.to(device=linear.weight.device, dtype=torch.bool).contiguous()
    prev = getattr(linear, "weight_mask", None)
    if prev is not None:
        mask = mask & prev  # pruned weights never come back
    with torch.no_grad():
        linear.weight.mul_(mask)
    linear.register_buffer("weight_mask", mask)
    mask_registry.register(linear)


def compute_masks(model: nn.Module, linears: Dict[str, nn.Module], sparsity: float, pattern: str, block_size: int,
                  method: str, calibration_data: Optional[Iterable], scope: str) -> Dict[str, Tensor]:
    """Masks [out, in] (``nn.Linear``'s layout) for every target layer, validated for all before
    any weight is touched."""
    check_arguments(sparsity, pattern, block_size, method, calibration_data, scope)
    norms = input_norms(model, linears, calibration_data) if method == "wanda" else {}
    missed = [fqn for fqn in linears if method == "wanda" and fqn not in norms]
    if missed:
        raise ValueError(f"prune_: method='wanda': calibration_data never reached {_layers.names(missed)}; "
                         f"leave them out with filter_fn or use method='magnitude'")
    scores = {fqn: M.score(_layers.linear_weight(m), method, norms.get(fqn)) for fqn, m in linears.items()}
    if scope == "global":
        return M.global_unstructured_masks(scores, sparsity)
    masks = {}
    for fqn, s in scores.items():
        try:
            masks[fqn] = M.make_mask(s, pattern, sparsity, block_size)
        except ValueError as e:
            raise ValueError(f"prune_: layer {fqn!r}: {e}") from e
    return masks


def check_arguments(sparsity, pattern, block_size, method, calibration_data, scope) -> None:
    M.check_pattern(pattern)
    M.check_sparsity(sparsity)
    if pattern == "block":
        M.check_block_size(block_size)
    if method not in M.METHODS:
        raise ValueError(f"method must be one of {M.METHODS}, got {method!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global" and pattern != "unstructured":
        raise ValueError(f"scope='global' applies to pattern='unstructured', got {pattern!r}")
    if method == "wanda" and calibration_data is None:
        raise ValueError("method='wanda' needs calibration_data (an iterable of model inputs)")


def _plan(call: str, model: nn.Module, pattern: str, block_size: int, filter_fn) -> Tuple[_layers.Selection, Dict[str, str]]:
    """The layers to prune and the chosen ones whose shape does not fit ``pattern`` (fqn -> why).
    Raises when layers were chosen and none fits."""
    sel = _layers.select(model, filter_fn, call=call, skip_heads=True, replace=False)
    misfits = {}
    for fqn, m in list(sel.targets.items()):
        why = M.misfit(pattern, block_size, *reversed(_layers.features(m)))
        if why is not None:
            misfits[fqn or "<model>"] = why
            del sel.targets[fqn]
    if misfits and not sel.targets:
        raise ValueError(f"{call}: no chosen layer can be pruned with pattern={pattern!r}: "
                         + "; ".join(f"{fqn}: {why}" for fqn, why in misfits.items()))
    return sel, misfits


def _prune(model: nn.Module, sparsity: float, pattern: str, block_size: int, method: str, filter_fn,
           calibration_data, scope: str, *, call: str = "prune_", log: bool = True) -> nn.Module:
    check_arguments(sparsity, pattern, block_size, method, calibration_data, scope)
    sel, misfits = _plan(call, model, pattern, block_size, filter_fn)
    masks = compute_masks(model, sel.targets, sparsity, pattern, block_size, method, calibration_data, scope)
    for fqn, mask in masks.items():
        layer = sel.targets[fqn]
        apply_mask_(layer, _layers.to_weight_layout(layer, mask))
        setattr(layer, _RECORD, (pattern, block_size))
    if misfits:
        warnings.warn(f"{call}: left unpruned, their shape does not fit pattern={pattern!r}: "
                      + "; ".join(f"{fqn} ({why})" for fqn, why in misfits.items()), stacklevel=3)
    already = {fqn or "<model>": f"already {type(m).__name__}" for fqn, m in sel.converted.items()}
    already.update({fqn: "shape does not fit the pattern" for fqn in misfits})
    amount = "" if M.parse_nm(pattern) else f" {sparsity:.0%}"
    if log:
        _layers.report(call, f"pruned ({pattern}{amount}, {method})", list(masks), sel, extra_skipped=already,
                       model=model)
    elif masks:
        from bigkernels import integrations

        integrations.model_changed(model)
    return model


def prune_(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured", block_size: int = 64,
           method: str = "magnitude", filter_fn: Optional[FilterFn] = None, calibration_data: Optional[Iterable] = None,
           scope: str = "layer") -> nn.Module:
    """Prune, in place, the linear layers of ``model`` — ``nn.Linear`` and its subclasses, and
    Hugging Face ``Conv1D`` — and return ``model``.

    Which layers: those ``filter_fn(module, fqn)`` accepts; by default all but the output head
    (the layer producing the logits, tied to the embeddings or not: Wanda and SparseGPT keep it
    dense too) and tied layers (pruning one would prune the embedding it shares its weight with).
    Embeddings are never pruned. A chosen layer whose shape does not fit the pattern (e.g. a
    688-wide layer with ``block_size=64``) is left unpruned with a warning naming it (an error
    if no chosen layer fits). One INFO line on the ``bigkernels`` logger says what was pruned.

    pattern: ``"unstructured"`` (exact fraction ``sparsity`` of each layer, or of all layers with
    ``scope="global"``), ``"N:M"`` such as ``"2:4"`` (N of every M inputs kept; ``sparsity`` is
    implied) or ``"block"`` (exact fraction of ``block_size`` x ``block_size`` blocks).
    method: ``"magnitude"`` (|W|) or ``"wanda"`` (|W| * ||X_j||, needs ``calibration_data``).
    Each pruned layer keeps a ``weight_mask`` buffer (shaped like its ``weight``) and the pattern
    (``sparse.sparsify_`` stores each layer in it), and training never revives a pruned weight:
    bigkernels' fused optimizers apply the mask inside their step, any other torch optimizer gets
    it re-applied by a post-step hook (see :mod:`bigkernels.sparse.mask_registry`). Invalid
    arguments raise before anything changes.
    """
    return _prune(model, sparsity, pattern, block_size, method, filter_fn, calibration_data, scope)


class GradualPruner:
    """Gradual magnitude pruning (Zhu & Gupta, 2017): call ``step()`` once per training iteration.

    Between ``start_step`` and ``end_step``, every ``every`` steps, each target layer is pruned to
    s_t = s_f + (s_0 - s_f) * (1 - (t - start_step) / (end_step - start_step))^3 (cubic schedule);
    masks only grow, and are re-applied after every optimizer step like prune_'s. Layers are
    chosen as by prune_ (the first pruning step logs them).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, every: int = 100,
                 pattern: str = "unstructured", initial_sparsity: float = 0.0, block_size: int = 64,
                 method: str = "magnitude", filter_fn: Optional[FilterFn] = None):
        M.check_sparsity(final_sparsity)
        M.check_sparsity(initial_sparsity)
        M.check_pattern(pattern)
        if M.parse_nm(pattern) is not None:
            raise ValueError("GradualPruner: N:M patterns have a fixed sparsity; use prune_ with pattern='2:4'")
        if not (0 <= start_step < end_step) or every <= 0:
            raise ValueError(f"GradualPruner: need 0 <= start_step < end_step and every > 0, got "
                             f"start_step={start_step}, end_step={end_step}, every={every}")
        if method != "magnitude":
            raise ValueError(f"GradualPruner: method must be 'magnitude' (it has no calibration data), got {method!r}")
        if pattern == "block":
            M.check_block_size(block_size)
        _plan("GradualPruner", model, pattern, block_size, filter_fn)  # raises now if no layer fits
        self.model, self.final, self.initial = model, float(final_sparsity), float(initial_sparsity)
        self.start, self.end, self.every = start_step, end_step, every
        self.pattern, self.block_size, self.method, self.filter_fn = pattern, block_size, method, filter_fn
        self.step_count = 0
        self.current_sparsity = 0.0
        self._logged = False

    def sparsity_at(self, t: int) -> float:
        if t < self.start:
            return 0.0
        frac = min(1.0, (t - self.start) / (self.end - self.start))
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def step(self) -> None:
        t = self.step_count
        if self.start <= t <= self.end and ((t - self.start) % self.every == 0 or t == self.end):
            target = self.sparsity_at(t)
            if target > 0:
                _prune(self.model, target, self.pattern, self.block_size, self.method, self.filter_fn, None, "layer",
                       call="GradualPruner", log=not self._logged)
                self._logged = True
                self.current_sparsity = target
        self.step_count += 1


def _has_mask(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight_mask", None), Tensor)


def sparsify_(model: nn.Module, pattern: Optional[str] = None, block_size: Optional[int] = None,
              filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace, in place, the pruned linear layers of ``model`` (those with a ``weight_mask``
    from ``prune_`` / ``GradualPruner``, and accepted by ``filter_fn``) by
    :class:`bigkernels.nn.SparseLinear`; returns ``model``.

    pattern / block_size: the storage format; None (default) stores each layer in the pattern
    ``prune_`` recorded for it ("2:4" for N:M patterns that fit it, "block" with its block_size,
    CSR for unstructured and other N:M). A given pattern applies to every chosen layer. Tied
    layers are never replaced (the pair would be untied and both copies kept). A layer whose
    shape the format does not fit (block_size not dividing it, 2:4 with in_features not a
    multiple of 4) stays a pruned dense layer, with a warning naming it. Raises, naming the
    layers, before changing anything: a weight whose zeros do not follow the requested pattern,
    a layer with no recorded pattern and none given, a float64 weight.
    """
    from bigkernels.nn.sparse_linear import PATTERNS, SparseLinear, check_format

    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"sparsify_: pattern must be None (what prune_ recorded per layer) or one of {PATTERNS}, "
                         f"got {pattern!r}")
    if block_size is not None:
        M.check_block_size(block_size)
    sel = _layers.select(model, filter_fn, call="sparsify_", skip_heads=False, replace=True, accept=_has_mask)
    if not sel.targets and not sel.skipped and not sel.refused:
        warnings.warn("sparsify_: converted no layer; the model has no pruned layer (run prune_ first)", stacklevel=2)
        return model
    plan, misfits, errors = {}, {}, []
    for fqn, layer in sel.targets.items():
        recorded = pruned_pattern(layer)
        if pattern is None and recorded is None:
            errors.append(f"{fqn}: it has a weight_mask but no pattern recorded by prune_ (pass pattern=)")
            continue
        fmt = pattern if pattern is not None else M.sparse_format(recorded[0])
        bs = block_size or (recorded[1] if recorded is not None and recorded[0] == "block" else 64)
        in_f, out_f = _layers.features(layer)
        if layer.weight.dtype not in KERNEL_DTYPES:
            errors.append(f"{fqn}: weight dtype {str(layer.weight.dtype)[6:]} (SparseLinear computes in "
                          f"{', '.join(str(d)[6:] for d in KERNEL_DTYPES)}; cast the model first)")
            continue
        try:
            check_format(fmt, bs, in_f, out_f, "SparseLinear")
        except ValueError as e:
            misfits[fqn] = str(e).removeprefix("SparseLinear: ")
            continue
        if fmt == "2:4" and not layer.weight.is_meta:
            groups = (_layers.linear_weight(layer).detach() != 0).reshape(out_f, in_f // 4, 4).sum(dim=2)
            if groups.numel() and int(groups.max()) > 2:
                how = f"pruned with pattern {recorded[0]!r}" if recorded is not None else "not 2:4"
                errors.append(f"{fqn}: more than 2 non-zeros in a group of 4 inputs ({how}); store it with "
                              f"pattern='unstructured', or prune it with pattern='2:4'")
                continue
        plan[fqn] = (fmt, bs)
    if errors:
        raise ValueError("sparsify_: cannot store " + "; ".join(errors))
    if misfits:
        warnings.warn("sparsify_: left as pruned dense layers, the format does not fit their shape: "
                      + "; ".join(f"{fqn} ({why})" for fqn, why in misfits.items()), stacklevel=2)
    done = _layers.replace_each("sparsify_", model, {fqn: sel.targets[fqn] for fqn in plan},
                                lambda fqn, layer: SparseLinear.from_linear(layer, *plan[fqn]))
    formats = sorted({fmt if fmt != "block" else f"block {bs}" for fmt, bs in plan.values()})
    _layers.report("sparsify_", f"SparseLinear ({', '.join(formats)})", done, sel,
                   extra_skipped={fqn: "format does not fit its shape" for fqn in misfits}, model=model)
    return model


# Pruned linear layers are saved with their mask and pattern, and registered again on loading.
def _describe_pruned(layer: nn.Module) -> dict:
    recorded = pruned_pattern(layer)
    return {"pattern": recorded[0] if recorded else None, "block_size": recorded[1] if recorded else None}


def _build_pruned(layer: nn.Module, spec: dict, dtype: torch.dtype) -> nn.Module:
    layer.register_buffer("weight_mask", torch.empty(layer.weight.shape, dtype=torch.bool, device=layer.weight.device))
    if spec.get("pattern") is not None:
        setattr(layer, _RECORD, (spec["pattern"], spec["block_size"]))
    return layer


_layers.register_compressed(_layers.CompressedType(
    "pruned", detect=lambda m: _layers.is_linear_like(m) and _has_mask(m), describe=_describe_pruned,
    build=_build_pruned, loaded=mask_registry.register))
