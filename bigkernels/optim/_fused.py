"""Machinery shared by the fused optimizers: buckets of same-device, same-dtype tensors that are
built once and reused while the parameter set is unchanged, GradScaler's protocol, global-norm
clipping inside the step, pruning masks applied inside the step, and validation before anything
is modified.

A step on an unchanged parameter set costs a constant number of Python statements per bucket:
the gradients are gathered with C-level ``map`` calls, and the kernels take whole tensor lists.
"""
from __future__ import annotations

import math
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from bigkernels.ops import optim as optim_ops
from bigkernels.sparse import mask_registry

_GRAD = attrgetter("grad")
_WEIGHT_MASK = attrgetter("weight_mask")
_IS_SPARSE = attrgetter("is_sparse")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Bucket:
    """Params of one group on one device with one dtype, plus their state lists (same order).
    ``mask_owners`` (or None): the pruned module owning each param, whose ``weight_mask`` the
    kernel applies; a bucket's params are either all pruned or none."""

    __slots__ = ("group", "params", "mask_owners", "state", "device", "dtype", "kernel_ok", "ready")

    def __init__(self, group: dict, params: List[Tensor], kernel_ok: bool, mask_owners: Optional[list] = None):
        self.group = group
        self.params = params
        self.mask_owners = mask_owners
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.kernel_ok = kernel_ok  # dense & contiguous: the kernels can take them
        self.state: Dict[str, List[Tensor]] = {}
        self.ready = False  # every param has its state and the lists below hold it


def _check_param(owner: str, p: Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{owner}: params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError(
            f"{owner}: complex parameters are not supported (got {p.dtype}); "
            "use torch.view_as_real on the parameter or torch.optim's optimizer")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{owner}: parameters must be float32, float16 or bfloat16, got {p.dtype}")


class FusedOptimizerMixin:
    """Mixed into a torch.optim optimizer subclass; subclasses define the hooks at the bottom."""

    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes grad_scale/found_inf to step()

    def _init_fused(self, max_grad_norm: Optional[float]) -> None:
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a positive number or None)")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.last_grad_norm: Optional[Tensor] = None
        self._buckets: Optional[List[Bucket]] = None
        self._bucket_key = None
        self._masks_in_step: frozenset = frozenset()  # ids of the pruned modules our kernels mask

    # ----- parameter set & state bookkeeping --------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        params = param_group["params"]
        for p in [params] if isinstance(params, torch.Tensor) else list(params):
            _check_param(type(self).__name__, p)
        super().add_param_group(param_group)
        self._buckets = None

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._buckets = None  # state tensors were replaced

    def _get_buckets(self) -> List[Bucket]:
        key = mask_registry.optimizer_key(self)  # param groups, and masks prune_ registers
        if self._buckets is None or key != self._bucket_key:
            owners = mask_registry.masked_modules()
            buckets = []
            for group in self.param_groups:
                by_kind: Dict[tuple, List[Tensor]] = {}
                for p in group["params"]:
                    dense = p.layout == torch.strided and p.is_contiguous()
                    by_kind.setdefault((p.device, p.dtype, dense, id(p) in owners), []).append(p)
                buckets += [Bucket(group, ps, dense, [owners[id(p)] for p in ps] if masked else None)
                            for (_, _, dense, masked), ps in by_kind.items()]
            self._buckets, self._bucket_key = buckets, key
            self._masks_in_step = frozenset(id(m) for b in buckets for m in (b.mask_owners or ()))
        return self._buckets

    def _refresh_state_lists(self, bucket: Bucket, params: List[Tensor]):
        """State lists for ``params`` and which of them got their state just now (None if none).
        Creates missing state (torch's lazy init) and puts step counters on the param's device
        as fp32 (what the kernels read)."""
        names = self._state_names(bucket.group)
        lists: Dict[str, List[Tensor]] = {n: [] for n in names}
        fresh = []
        if not names:  # e.g. SGD without momentum: torch keeps no state at all
            return lists, None
        for p in params:
            st = self.state[p]
            is_new = any(st.get(n) is None for n in names)
            if is_new:
                self._init_state(p, st, bucket.group)
            if "step" in st and (st["step"].device != p.device or st["step"].dtype != torch.float32):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            for n in names:
                lists[n].append(st[n])
            fresh.append(is_new)
        return lists, (fresh if any(fresh) else None)

    # ----- the step -----------------------------------------------------------------------------
    def _gather(self, bucket: Bucket):
        """(params, grads, state lists, fresh flags or None, pruning masks or None) of the bucket's
        params with a gradient."""
        grads = list(map(_GRAD, bucket.params))
        owners = bucket.mask_owners
        if any(map(is_, grads, repeat(None))):
            has_grad = list(map(is_not, grads, repeat(None)))
            params = list(compress(bucket.params, has_grad))
            grads = list(compress(grads, has_grad))
            masks = None if owners is None else list(map(_WEIGHT_MASK, compress(owners, has_grad)))
            bucket.ready = False
            if not params:
                return params, grads, {}, None, masks
            return (params, grads) + self._refresh_state_lists(bucket, params) + (masks,)
        fresh = None
        if not bucket.ready:
            bucket.state, fresh = self._refresh_state_lists(bucket, bucket.params)
            bucket.ready = True
        masks = None if owners is None else list(map(_WEIGHT_MASK, owners))
        return bucket.params, grads, bucket.state, fresh, masks

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every param with a gradient (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for bucket in self._get_buckets():
            params, grads, state, fresh, masks = self._gather(bucket)
            if params:
                if any(map(_IS_SPARSE, grads)):
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                work.append((bucket, params, grads, state, fresh, masks))
        if not work:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        on_device = _PerDevice()
        grad_norm = self._global_grad_norm(work, grad_scale, found_inf, on_device)
        for bucket, params, grads, state, fresh, masks in work:
            dev = bucket.device
            extra = dict(grad_scale=on_device(grad_scale, dev), found_inf=on_device(found_inf, dev), masks=masks)
            if grad_norm is not None:
                extra.update(grad_norm=on_device(grad_norm, dev), max_grad_norm=self.max_grad_norm)
            self._update(bucket, params, grads, state, fresh, extra)
        return loss

    def _global_grad_norm(self, work, grad_scale, found_inf, on_device) -> Optional[Tensor]:
        """L2 norm over every gradient of the step (still scaled), one reduction pass per bucket."""
        if self.max_grad_norm is None:
            return None
        first = work[0][0].device
        total = None
        for bucket, _, grads, _, _, _ in work:
            sq = optim_ops.sum_of_squares(grads) if bucket.kernel_ok else _ref_sum_of_squares(grads)
            total = sq.to(first) if total is None else total + sq.to(first)
        norm = total.sqrt()
        scale = on_device(grad_scale, first)
        self.last_grad_norm = norm / scale if scale is not None else norm
        return norm

    # ----- hooks for subclasses -----------------------------------------------------------------
    def _state_names(self, group: dict) -> List[str]:
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _update(self, bucket: Bucket, params, grads, state, fresh, extra) -> None:
        """Run the fused op; ``fresh[i]`` is True when params[i]'s state was created this step;
        ``extra`` holds the GradScaler / clipping inputs and ``masks`` (None, or one per param)."""
        raise NotImplementedError


class _PerDevice:
    """Copies of GradScaler's 0-d tensors per device, made at most once per step."""

    def __init__(self):
        self._cache: Dict[tuple, Tensor] = {}

    def __call__(self, t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        if t is None or t.device == device:
            return t
        key = (id(t), device)
        if key not in self._cache:
            self._cache[key] = t.to(device=device, dtype=torch.float32, non_blocking=True)
        return self._cache[key]


def _ref_sum_of_squares(tensors):
    from bigkernels.reference.optim import sum_of_squares

    return sum_of_squares(tensors)


def scalar(value) -> float:
    """A hyperparameter as a Python float (LR schedulers may store tensors)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}")
