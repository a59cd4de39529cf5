"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW with the whole step in one fused kernel."""
from __future__ import annotations

from typing import List

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar

_DROP_IN_DOC = """
    Arguments: every argument of the installed torch's ``torch.optim.{name}`` (same order, defaults
    and errors; ``inspect.signature`` shows them): params as tensors, param-group dicts or
    ``named_parameters()`` / ``(name, param)`` tuples (``param_names`` in the state_dict), ``lr``
    as a float or a 1-element tensor, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``,
    ``maximize``{extra}. ``foreach``, ``fused`` and ``capturable`` are accepted and stored in the
    param groups like torch's but select nothing: the step is always this fused one.
    ``differentiable=True`` raises a RuntimeError (the fused step is not differentiable).

    Extra keyword ``max_grad_norm``: clip gradients by their global L2 norm inside the step (one
    reduction pass, then the update; gradients themselves are not modified); the norm of the
    step is kept in ``last_grad_norm``. Works with ``torch.amp.GradScaler``: the scaler's
    grad_scale/found_inf are consumed inside the kernel and a step with inf/NaN gradients changes
    no parameter and no state. fp32, bf16 and fp16 params run the fused kernels; fp64 (and
    non-contiguous) params run the pure-PyTorch reference op in their own precision.
    ``torch.compile(opt.step)`` traces the step without a graph break in bigkernels' code.
"""


class _FusedAdamBase(FusedOptimizerMixin):
    _decoupled_default = False  # groups without the key (torch versions before Adam had it)
    _flat_state = True  # one buffer per state name per bucket; state_dict entries are views of it

    def _state_names(self, group: dict, bucket) -> List[str]:
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

    def _decoupled(self, group: dict) -> bool:
        return bool(group.get("decoupled_weight_decay", self._decoupled_default))

    def _op_name(self, group: dict) -> str:
        return optim_ops.adam_op(self._decoupled(group))

    def _flat_op_name(self, group: dict) -> str:
        return optim_ops.adam_flat_op(self._decoupled(group))

    def _check_group(self, group: dict) -> None:
        # torch.optim.Adam's constructor checks (and messages), which the kernels repeat.
        lr, eps, wd = scalar(group["lr"]), scalar(group["eps"]), scalar(group["weight_decay"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {wd}")

    def _update(self, group, backend, params, grads, state, fresh, extra) -> None:
        beta1, beta2 = group["betas"]
        amsgrad = bool(group["amsgrad"])
        kw = dict(decoupled_weight_decay=self._decoupled(group), backend=backend, lr=hyper(group["lr"]),
                  beta1=hyper(beta1), beta2=hyper(beta2), weight_decay=hyper(group["weight_decay"]),
                  eps=hyper(group["eps"]), amsgrad=amsgrad, maximize=bool(group["maximize"]))
        if extra.pop("flat", False):  # each state list is [one flat buffer]
            optim_ops.fused_adam_flat_(params, grads, state["exp_avg"][0], state["exp_avg_sq"][0],
                                       state["max_exp_avg_sq"][0] if amsgrad else None, state["step"][0], **kw,
                                       **extra)
        else:
            optim_ops.fused_adam_(params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", []),
                                  state["step"], **kw, **extra)


class FusedAdam(_FusedAdamBase, torch.optim.Adam):
    __doc__ = """Drop-in for ``torch.optim.Adam``: same arguments, defaults, param groups and state_dict
    (a torch.optim.Adam checkpoint loads here and back), with the step fused into one kernel per
    device and dtype (CPU C++, CUDA C++ or Triton, whichever is fastest here).
    """ + _DROP_IN_DOC.format(name="Adam", extra=", ``decoupled_weight_decay`` (True: AdamW's update)")


class FusedAdamW(_FusedAdamBase, torch.optim.AdamW):
    __doc__ = """Drop-in for ``torch.optim.AdamW`` (decoupled weight decay): same arguments, defaults,
    param groups and state_dict, with the step fused into one kernel per device and dtype.
    """ + _DROP_IN_DOC.format(name="AdamW", extra="")
    _decoupled_default = True
