"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW with the whole step in one fused kernel."""
from __future__ import annotations

from typing import List, Optional

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, scalar
from bigkernels.reference import optim as ref


class _FusedAdamBase(FusedOptimizerMixin):
    def _state_names(self, group: dict) -> List[str]:
        names = ["step", "exp_avg", "exp_avg_sq"]
        return names + ["max_exp_avg_sq"] if group["amsgrad"] else names

    def _init_state(self, p, state, group) -> None:
        # torch.optim.Adam's layout: a 0-d fp32 step (on the param's device, as torch's fused
        # Adam keeps it) and moments shaped like the param.
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if state.get(name) is None:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, bucket, params, grads, state, fresh, extra) -> None:
        group = bucket.group
        beta1, beta2 = group["betas"]
        kw = dict(lr=scalar(group["lr"]), beta1=scalar(beta1), beta2=scalar(beta2),
                  weight_decay=scalar(group["weight_decay"]), eps=scalar(group["eps"]),
                  amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]), **extra)
        lists = (params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", []),
                 state["step"])
        decoupled = bool(group.get("decoupled_weight_decay", False))
        if bucket.kernel_ok:
            optim_ops.fused_adam_(*lists, decoupled_weight_decay=decoupled, **kw)
        else:
            ref.fused_adam_(*lists, decoupled_weight_decay=decoupled, **kw)


class FusedAdam(_FusedAdamBase, torch.optim.Adam):
    """Drop-in for ``torch.optim.Adam``: same arguments, defaults, param groups and state_dict
    (a torch.optim.Adam checkpoint loads here and back), with the step fused into one kernel per
    device and dtype (CPU C++, CUDA C++ or Triton, whichever is fastest here).

    Extra keyword ``max_grad_norm``: clip gradients by their global L2 norm inside the step (one
    reduction pass, then the update; gradients themselves are not modified); the norm of the
    step is kept in ``last_grad_norm``. Works with ``torch.amp.GradScaler``: the scaler's
    grad_scale/found_inf are consumed inside the kernel and a step with inf/NaN gradients changes
    no parameter and no state.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None):
        self._init_fused(max_grad_norm)
        torch.optim.Adam.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  amsgrad=amsgrad, maximize=maximize)


class FusedAdamW(_FusedAdamBase, torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` (decoupled weight decay); see :class:`FusedAdam` for
    what is fused, ``max_grad_norm`` and GradScaler support."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None):
        self._init_fused(max_grad_norm)
        torch.optim.AdamW.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   amsgrad=amsgrad, maximize=maximize)
