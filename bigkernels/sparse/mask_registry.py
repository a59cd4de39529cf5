"""Which weights are pruned, and how their zeros survive optimizer steps.

``prune_`` / ``GradualPruner`` register each pruned module here (it carries a ``weight_mask``
bool buffer shaped like its ``weight``). Two mechanisms then keep pruned weights exactly zero:

* bigkernels' fused optimizers (FusedAdam, FusedAdamW, FusedSGD) look the masks up for their
  params (:func:`masked_modules`, rebuilt when :data:`version` changes) and pass them to the fused
  kernel, which stores zero for pruned elements in the same pass as the update;
* for every other optimizer, a global ``torch.optim`` post-step hook zeroes the pruned weights
  that optimizer updates (one pass: the ``apply_masks_`` op, one call per device and dtype). It
  skips the modules the optimizer has already masked in its step (``optimizer._masks_in_step``:
  ids of those modules), so a fused optimizer pays nothing extra. A pre-step hook prepares and
  checks every mask first (for sharded weights: their local shards, see
  :mod:`bigkernels.distributed`), so a mask that cannot be applied raises before the optimizer
  writes anything, rather than after its update un-zeroed pruned weights.
"""
from __future__ import annotations

import weakref
from typing import Dict

import torch
import torch.optim.optimizer as torch_optimizer
from torch import nn

from bigkernels.ops import optim as optim_ops

_PRUNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_HOOK = None
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> (key, masked in step, modules to mask)
_READY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> (local weights, masks) this step
_PRE_HOOK = None
version = 0  # bumped whenever a mask is registered or replaced


def register(module: nn.Module) -> None:
    """Record that ``module.weight_mask`` must hold after every optimizer step."""
    global version
    _PRUNED.add(module)
    version += 1
    _ensure_hook()


def optimizer_key(optimizer) -> tuple:
    """Changes when the registered masks or the optimizer's param groups do: what a fused
    optimizer's buckets and this hook's per-optimizer plan depend on."""
    return (version,) + tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def masked_modules() -> Dict[int, nn.Module]:
    """``id(weight) -> module`` for every live module with a mask."""
    return {id(m.weight): m for m in list(_PRUNED) if getattr(m, "weight_mask", None) is not None}


def _prepare_masks(optimizer, args, kwargs) -> None:
    """Pre-step hook of every torch optimizer: which pruned weights this optimizer updates, except
    those its own fused step masks (worked out once per change of its param groups or of the
    registered masks), and their masks as local tensors, all checked, before the step writes."""
    _READY.pop(optimizer, None)
    if not _PRUNED:
        return
    key = optimizer_key(optimizer)
    # a fused optimizer says which masks its step applies once it has made its buckets (in its
    # first step: until then, this hook re-applies them too)
    done = getattr(optimizer, "_masks_in_step", ())
    plan = _PLANS.get(optimizer)
    if plan is None or plan[0] != key or plan[1] is not done:
        mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
        plan = (key, done, [m for m in masked_modules().values() if id(m.weight) in mine and id(m) not in done])
        _PLANS[optimizer] = plan
    if plan[2]:
        from bigkernels import distributed

        _READY[optimizer] = (list(map(distributed.local, (m.weight for m in plan[2]))),
                             distributed.local_masks(plan[2]))


def _reapply_masks(optimizer, args, kwargs) -> None:
    """Post-step hook of every torch optimizer: the pruned weights the pre-step hook prepared back
    to zero (nothing left to check)."""
    ready = _READY.pop(optimizer, None)
    if ready is not None:
        with torch.no_grad():
            _apply(*ready)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _apply(weights, masks) -> None:
    """weight = where(mask, weight, 0) for plain (local) tensors: bigkernels' ``apply_masks_`` op,
    one call per (device, dtype), for contiguous float weights; ``_foreach_mul_`` for the rest."""
    groups: Dict[tuple, tuple] = {}
    for w, k in zip(weights, masks):
        fits = w.dtype in _KERNEL_DTYPES and w.is_contiguous() and k.is_contiguous() and k.dtype == torch.bool
        ws, ks = groups.setdefault((w.device, w.dtype, fits), ([], []))
        ws.append(w)
        ks.append(k)
    for (_, _, fits), (ws, ks) in groups.items():
        if fits:
            optim_ops.apply_masks_(ws, ks)
        else:
            torch._foreach_mul_(ws, ks)


def _ensure_hook() -> None:
    global _HOOK, _PRE_HOOK
    if _PRE_HOOK is None:
        _PRE_HOOK = torch_optimizer.register_optimizer_step_pre_hook(_prepare_masks)
    if _HOOK is None:
        _HOOK = torch_optimizer.register_optimizer_step_post_hook(_reapply_masks)
