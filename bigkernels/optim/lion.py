"""FusedLion: the Lion optimizer (Chen et al. 2023) with the whole step in one fused kernel."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar


class FusedLion(FusedOptimizerMixin, torch.optim.Optimizer):
    """Lion ("Symbolic Discovery of Optimization Algorithms", Chen et al. 2023), fused: per step
    ``c = beta1 m + (1 - beta1) g;  p -= lr (sign(c) + weight_decay p);  m = beta2 m + (1 - beta2) g``
    with sign(0) = 0, in one pass over each element (read p, g, m; write p, m).

    When to use it: Lion's updates all have magnitude ``lr`` (a sign), so it wants a 3-10x smaller
    learning rate and a 3-10x larger weight decay than AdamW; in exchange it keeps one state per
    param instead of two. Memory per param: one state (``exp_avg``) in the param's dtype (4 bytes
    for fp32 params, 2 for bf16), half of Adam's; no step counter.

    Arguments: ``params`` (tensors, param-group dicts or ``named_parameters()``), ``lr`` (float or
    1-element tensor), ``betas``, ``weight_decay``, keyword-only ``maximize`` and
    ``max_grad_norm`` (global-norm clipping inside the step, norm kept in ``last_grad_norm``).
    Works with torch.amp.GradScaler (inf/NaN steps change nothing), LR schedulers, pruning masks,
    fp64 params (reference op) and ``torch.compile(opt.step)``. A NaN in ``c`` makes the param
    NaN (torch.sign would give 0 and silently freeze it).
    """

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, max_grad_norm: Optional[float] = None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._init_fused(max_grad_norm=max_grad_norm)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _state_names(self, group: dict, bucket) -> List[str]:
        return ["exp_avg"]

    def _init_state(self, p, state, group) -> None:
        if state.get("exp_avg") is None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _op_name(self, group: dict) -> str:
        return "fused_lion_"

    def _check_group(self, group: dict) -> None:
        lr, wd = scalar(group["lr"]), scalar(group["weight_decay"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= beta1 <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {wd}")

    def _update(self, group, backend, params, grads, state, fresh, extra) -> None:
        beta1, beta2 = group["betas"]
        optim_ops.fused_lion_(params, grads, state["exp_avg"], backend=backend, lr=hyper(group["lr"]),
                              beta1=hyper(beta1), beta2=hyper(beta2), weight_decay=hyper(group["weight_decay"]),
                              maximize=bool(group["maximize"]), **extra)
