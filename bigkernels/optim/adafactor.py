"""FusedAdafactor: torch.optim.Adafactor with each param's step in three fused passes."""
from __future__ import annotations

from typing import List

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar
from bigkernels.reference.optim import adafactor_factored


class FusedAdafactor(FusedOptimizerMixin, torch.optim.Adafactor):
    """Drop-in for ``torch.optim.Adafactor`` (lr, beta2_decay, eps=(eps1, eps2), d, weight_decay,
    maximize): same arguments, defaults, param groups and state_dict (``step``; ``row_var`` and
    ``col_var`` for params of >= 2 dims, factored over their last two dims; ``variance`` for
    vectors), with each param's step fused into three passes over its gradient: the row / column
    statistics (with the param's RMS), the RMS of the update (torch's clipping by ``d`` needs it
    before any element changes), and the update itself. torch's own step is a for-loop of about
    fifteen ops per param, two host syncs per param (``.item()``) and a temporary the size of
    each param.

    When to use it: large matrices where Adam's two full-size states do not fit. Memory per
    param: a ``rows x cols`` matrix keeps ``rows + cols`` numbers (a batch of them for > 2-D
    params), a vector keeps one number per element, in the param's dtype; plus one fp32 step
    counter per tensor.

    As torch, ``eps=(None, ...)`` takes eps1 as the machine epsilon of the dtype of the group's
    first param with a gradient (for the whole group). Differences from torch: GradScaler's
    scale is consumed inside the step (torch's Adafactor asks GradScaler to unscale the
    gradients first; the results are the same) and ``max_grad_norm`` clips inside it; params
    with no elements only count the step (torch's step divides by their size and raises).
    ``foreach`` is accepted and stored but selects nothing; complex params raise torch's
    RuntimeError (at construction rather than at the first step).
    """

    def add_param_group(self, param_group) -> None:
        try:
            super().add_param_group(param_group)
        except ValueError as err:
            if "complex" not in str(err):
                raise
            raise RuntimeError(f"Adafactor does not support complex parameters ({err})") from err

    def _bucket_kind(self, p):
        return adafactor_factored(p)

    def _state_names(self, group: dict, bucket) -> List[str]:
        return ["step", "row_var", "col_var"] if bucket.kind else ["step", "variance"]

    def _init_state(self, p, state, group) -> None:
        # torch.optim.Adafactor's layout (its step lives on the CPU; here on the param's device,
        # where the kernels read it without a sync; torch's step reads it with .item() anywhere).
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if adafactor_factored(p):
            if state.get("row_var") is None:
                state["row_var"] = p.new_zeros(p.shape[:-1] + (1,))
            if state.get("col_var") is None:
                state["col_var"] = p.new_zeros(p.shape[:-2] + (1, p.shape[-1]))
        elif state.get("variance") is None:
            state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _op_name(self, group: dict) -> str:
        return "fused_adafactor_"

    def _check_group(self, group: dict) -> None:
        # torch.optim.Adafactor's constructor checks (and messages), which the kernels repeat.
        lr, beta2_decay, d, wd = (scalar(group[k]) for k in ("lr", "beta2_decay", "d", "weight_decay"))
        eps1, eps2 = group["eps"]
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps1 is not None and not 0.0 <= scalar(eps1):
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps1}")
        if not 0.0 <= scalar(eps2):
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps2}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= wd:
            raise ValueError(f"weight_decay should be >= 0 but is: {wd}")

    def _update(self, group, backend, params, grads, state, fresh, extra) -> None:
        eps1, eps2 = group["eps"]
        if eps1 is None:  # torch: the machine epsilon of the group's first param with a gradient
            first = next((p for p in group["params"] if p.grad is not None), params[0])
            eps1 = torch.finfo(first.dtype).eps
        optim_ops.fused_adafactor_(
            params, grads, state.get("row_var", []), state.get("col_var", []), state.get("variance", []),
            state["step"], backend=backend, lr=hyper(group["lr"]), beta2_decay=hyper(group["beta2_decay"]),
            eps1=hyper(eps1), eps2=hyper(eps2), d=hyper(group["d"]), weight_decay=hyper(group["weight_decay"]),
            maximize=bool(group["maximize"]), **extra)
