"""FusedSGD: torch.optim.SGD with the whole step in one fused kernel."""
from __future__ import annotations

from typing import List

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar


class FusedSGD(FusedOptimizerMixin, torch.optim.SGD):
    """Drop-in for ``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize):
    same arguments, param groups and state_dict (``momentum_buffer`` per param once momentum is
    used), with the step fused into one kernel per device and dtype.

    Arguments: every argument of the installed torch's ``torch.optim.SGD`` (same defaults and
    errors; params as tensors, dicts or ``named_parameters()``, ``lr`` as a float or a 1-element
    tensor). ``foreach`` and ``fused`` are accepted and stored like torch's but select nothing;
    ``differentiable=True`` raises a RuntimeError. Sparse gradients are refused (RuntimeError).
    ``max_grad_norm``, GradScaler, fp64 and torch.compile as in :class:`bigkernels.optim.FusedAdam`.
    """

    # torch's first step with momentum writes the buffer from the gradient: the buffer is created
    # by the step that uses it (see FusedOptimizerMixin._state_made_by_step).
    _state_made_by_step = True

    def _state_names(self, group: dict, bucket) -> List[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _init_state(self, p, state, group) -> None:
        # Used for DTensor params only (the mixin makes their state before the step, as DTensors
        # placed like the param; fresh flags still give the first step torch's first-step branch).
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _op_name(self, group: dict) -> str:
        return "fused_sgd_"

    def _check_group(self, group: dict) -> None:
        # torch.optim.SGD's constructor checks (and messages), which the kernels repeat.
        lr, momentum, wd = scalar(group["lr"]), scalar(group["momentum"]), scalar(group["weight_decay"])
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if wd < 0.0:
            raise ValueError(f"Invalid weight_decay value: {wd}")
        if group["nesterov"] and (momentum <= 0 or scalar(group["dampening"]) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _update(self, group, backend, params, grads, state, fresh, extra) -> None:
        kw = dict(lr=hyper(group["lr"]), momentum=hyper(group["momentum"]), dampening=hyper(group["dampening"]),
                  weight_decay=hyper(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                  maximize=bool(group["maximize"]), backend=backend, **extra)
        buffers = state.get("momentum_buffer", [])
        if fresh is None:
            optim_ops.fused_sgd_(params, grads, buffers, is_first_step=False, **kw)
            return
        masks = kw.pop("masks")
        for first in (True, False):  # params getting their buffer now take torch's first-step branch
            idx = [i for i, f in enumerate(fresh) if f == first]
            if not idx:
                continue
            ps = [params[i] for i in idx]
            bufs = [buffers[i] for i in idx]
            # Buffers made here (DTensor params get theirs from _init_group, as DTensors); stored in
            # the state only once the op has run, so a step that raises leaves none behind.
            made = [j for j, b in enumerate(bufs) if b is None]
            for j in made:
                bufs[j] = torch.empty_like(ps[j], memory_format=torch.preserve_format)
            optim_ops.fused_sgd_(ps, [grads[i] for i in idx], bufs, is_first_step=first,
                                 masks=None if masks is None else [masks[i] for i in idx], **kw)
            for j in made:
                self.state[ps[j]]["momentum_buffer"] = bufs[j]
