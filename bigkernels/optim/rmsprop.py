"""FusedRMSprop: torch.optim.RMSprop with the whole step in one fused kernel."""
from __future__ import annotations

from typing import List

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar


class FusedRMSprop(FusedOptimizerMixin, torch.optim.RMSprop):
    """Drop-in for ``torch.optim.RMSprop`` (alpha, eps, weight_decay, momentum, centered,
    maximize): same arguments, defaults, param groups and state_dict (``step``, ``square_avg``,
    ``momentum_buffer`` when momentum > 0, ``grad_avg`` when centered; a torch checkpoint loads
    here and back), with the step fused into one kernel per device and dtype: each element's
    gradient, param and states are read once and written once (torch's for-loop makes six to
    eight passes and allocates a temporary the size of each param).

    Memory per param: one state (``square_avg``) plus one for momentum and one for centered, in
    the param's dtype; the step counter is one fp32 number per param tensor.

    Arguments: every argument of the installed torch's ``torch.optim.RMSprop`` (same defaults and
    errors; params as tensors, dicts or ``named_parameters()``, ``lr`` as a float or a 1-element
    tensor). ``foreach`` and ``capturable`` are accepted and stored like torch's but select
    nothing; ``differentiable=True`` raises a RuntimeError. Extra keyword ``max_grad_norm``,
    GradScaler inside the step, pruning masks, fp64 and torch.compile as in
    :class:`bigkernels.optim.FusedAdam`.
    """

    def _state_names(self, group: dict, bucket) -> List[str]:
        names = ["step", "square_avg"]
        if scalar(group["momentum"]) > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    def _init_state(self, p, state, group) -> None:
        # torch.optim.RMSprop's layout (its CPU step keeps ``step`` on the CPU; here it lives on the
        # param's device, as torch's capturable mode keeps it, read by the kernels without a sync).
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in self._state_names(group, None)[1:]:
            if state.get(name) is None:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _op_name(self, group: dict) -> str:
        return "fused_rmsprop_"

    def _check_group(self, group: dict) -> None:
        # torch.optim.RMSprop's constructor checks (and messages), which the kernels repeat.
        for key, what in (("lr", "learning rate"), ("eps", "epsilon value"), ("momentum", "momentum value"),
                          ("weight_decay", "weight_decay value"), ("alpha", "alpha value")):
            value = scalar(group[key])
            if not 0.0 <= value:
                raise ValueError(f"Invalid {what}: {value}")

    def _update(self, group, backend, params, grads, state, fresh, extra) -> None:
        momentum = hyper(group["momentum"])
        optim_ops.fused_rmsprop_(
            params, grads, state["square_avg"], state.get("grad_avg", []), state.get("momentum_buffer", []),
            state["step"], backend=backend, lr=hyper(group["lr"]), alpha=hyper(group["alpha"]),
            eps=hyper(group["eps"]), weight_decay=hyper(group["weight_decay"]), momentum=momentum,
            centered=bool(group["centered"]), maximize=bool(group["maximize"]), **extra)
