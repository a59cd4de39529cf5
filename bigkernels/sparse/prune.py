"""prune_() and GradualPruner: zero a model's linear weights and keep them zero while training."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from bigkernels.sparse import masks as M
from bigkernels.sparse import mask_registry

FilterFn = Callable[[nn.Module, str], bool]


def _targets(model: nn.Module, filter_fn: Optional[FilterFn]) -> Dict[str, nn.Linear]:
    return {fqn: m for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, fqn))}


@torch.no_grad()
def input_norms(model: nn.Module, linears: Dict[str, nn.Linear], calibration_data: Iterable) -> Dict[str, Tensor]:
    """Per-input-feature L2 norm over all calibration tokens, for each linear (Wanda's ||X_j||)."""
    from bigkernels.quant.quantize import _run

    sq: Dict[str, Tensor] = {}

    def hook(fqn):
        def record(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            s = x.square().sum(dim=0)
            sq[fqn] = s if fqn not in sq else sq[fqn] + s
        return record

    handles = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in linears.items()]
    try:
        for batch in calibration_data:
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not sq:
        raise ValueError("calibration_data yielded no batches")
    return {k: v.sqrt() for k, v in sq.items()}


def apply_mask_(linear: nn.Linear, mask: Tensor) -> None:
    """Zero the pruned weights in place and keep the mask as the ``weight_mask`` buffer."""
    mask = mask.to(device=linear.weight.device, dtype=torch.bool).contiguous()
    prev = getattr(linear, "weight_mask", None)
    if prev is not None:
        mask = mask & prev  # pruned weights never come back
    with torch.no_grad():
        linear.weight.mul_(mask)
    linear.register_buffer("weight_mask", mask)
    mask_registry.register(linear)


def compute_masks(model: nn.Module, linears: Dict[str, nn.Linear], sparsity: float, pattern: str, block_size: int,
                  method: str, calibration_data: Optional[Iterable], scope: str) -> Dict[str, Tensor]:
    """Masks for every target linear, validated for all before any weight is touched."""
    M.check_pattern(pattern)
    M.check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global" and pattern != "unstructured":
        raise ValueError(f"scope='global' applies to pattern='unstructured', got {pattern!r}")
    if method == "wanda" and calibration_data is None:
        raise ValueError("method='wanda' needs calibration_data (an iterable of model inputs)")
    norms = input_norms(model, linears, calibration_data) if method == "wanda" else {}
    scores = {fqn: M.score(m.weight, method, norms.get(fqn)) for fqn, m in linears.items()}
    if scope == "global":
        return M.global_unstructured_masks(scores, sparsity)
    return {fqn: M.make_mask(s, pattern, sparsity, block_size) for fqn, s in scores.items()}


def prune_(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured", block_size: int = 64,
           method: str = "magnitude", filter_fn: Optional[FilterFn] = None, calibration_data: Optional[Iterable] = None,
           scope: str = "layer") -> nn.Module:
    """Prune, in place, the ``nn.Linear`` weights of ``model`` (those ``filter_fn(module, fqn)``
    accepts) and return ``model``.

    pattern: ``"unstructured"`` (exact fraction ``sparsity`` of each layer, or of all layers with
    ``scope="global"``), ``"N:M"`` such as ``"2:4"`` (N of every M inputs kept; ``sparsity`` is
    implied) or ``"block"`` (exact fraction of ``block_size`` x ``block_size`` blocks).
    method: ``"magnitude"`` (|W|) or ``"wanda"`` (|W| * ||X_j||, needs ``calibration_data``).
    Each pruned layer keeps a ``weight_mask`` buffer, and training never revives a pruned weight:
    bigkernels' fused optimizers apply it inside their step, any other torch optimizer
    gets it re-applied by a post-step hook (see :mod:`bigkernels.sparse.mask_registry`). Invalid arguments raise before anything changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_: expected an nn.Module, got {type(model).__name__}")
    linears = _targets(model, filter_fn)
    masks = compute_masks(model, linears, sparsity, pattern, block_size, method, calibration_data, scope)
    for fqn, mask in masks.items():
        apply_mask_(linears[fqn], mask)
    return model


class GradualPruner:
    """Gradual magnitude pruning (Zhu & Gupta, 2017): call ``step()`` once per training iteration.

    Between ``start_step`` and ``end_step``, every ``every`` steps, each target layer is pruned to
    s_t = s_f + (s_0 - s_f) * (1 - (t - start_step) / (end_step - start_step))^3 (cubic schedule);
    masks only grow, and are re-applied after every optimizer step like prune_'s.
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
        self.model, self.final, self.initial = model, float(final_sparsity), float(initial_sparsity)
        self.start, self.end, self.every = start_step, end_step, every
        self.pattern, self.block_size, self.method, self.filter_fn = pattern, block_size, method, filter_fn
        self.step_count = 0
        self.current_sparsity = 0.0

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
                prune_(self.model, target, self.pattern, self.block_size, self.method, self.filter_fn)
                self.current_sparsity = target
        self.step_count += 1


def sparsify_(model: nn.Module, pattern: str = "2:4", block_size: int = 64,
              filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace, in place, the pruned ``nn.Linear`` layers of ``model`` (those with a
    ``weight_mask``, and accepted by ``filter_fn``) by :class:`bigkernels.nn.SparseLinear` in
    ``pattern``'s compressed format; returns ``model``."""
    from bigkernels.nn.sparse_linear import SparseLinear
    from bigkernels.quant.quantize import _set_submodule

    for fqn, linear in list(_targets(model, filter_fn).items()):
        if getattr(linear, "weight_mask", None) is not None:
            _set_submodule(model, fqn, SparseLinear.from_linear(linear, pattern=pattern, block_size=block_size))
    return model
