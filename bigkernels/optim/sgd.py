"""FusedSGD: torch.optim.SGD with the whole step in one fused kernel."""
from __future__ import annotations

from typing import List, Optional

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, scalar
from bigkernels.reference import optim as ref


class FusedSGD(FusedOptimizerMixin, torch.optim.SGD):
    """Drop-in for ``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize):
    same arguments, param groups and state_dict (``momentum_buffer`` per param once momentum is
    used), with the step fused into one kernel per device and dtype. ``max_grad_norm`` and
    GradScaler support as in :class:`bigkernels.optim.FusedAdam`.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None):
        self._init_fused(max_grad_norm)
        torch.optim.SGD.__init__(self, params, lr=lr, momentum=momentum, dampening=dampening,
                                 weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)

    def _state_names(self, group: dict) -> List[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _init_state(self, p, state, group) -> None:
        # torch writes the first buffer from the gradient: the kernel's first-step branch fills it.
        state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)

    def _update(self, bucket, params, grads, state, fresh, extra) -> None:
        group = bucket.group
        momentum = scalar(group["momentum"])
        kw = dict(lr=scalar(group["lr"]), momentum=momentum, dampening=scalar(group["dampening"]),
                  weight_decay=scalar(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                  maximize=bool(group["maximize"]), **extra)
        run = optim_ops.fused_sgd_ if bucket.kernel_ok else ref.fused_sgd_
        buffers = state.get("momentum_buffer", [])
        if momentum == 0 or fresh is None:
            run(params, grads, buffers, is_first_step=False, **kw)
            return
        masks = kw.pop("masks")
        for first in (True, False):  # params that just got a buffer take torch's first-step branch
            idx = [i for i, f in enumerate(fresh) if f == first]
            if idx:
                run([params[i] for i in idx], [grads[i] for i in idx], [buffers[i] for i in idx],
                    is_first_step=first, masks=None if masks is None else [masks[i] for i in idx], **kw)
