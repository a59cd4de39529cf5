"""FusedAdafactor: torch.optim.Adafactor with each param's step in three fused passes."""
from __future__ import annotations

from typing import List

import torch

from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar
from bigkernels.reference.optim import adafactor_factored


def _factor_zeros(p, shape):
    """A row / column factor of ``p``: zeros of ``shape``; for a DTensor param a DTensor replicated over
    its mesh (the factors are statistics of whole rows and columns, see ``FusedAdafactor._step_whole``)."""
    from bigkernels.ops import _dtensor

    if _dtensor.DTensor is not None and isinstance(p, _dtensor.DTensor):
        from torch.distributed.tensor import Replicate

        local = torch.zeros(shape, dtype=p.dtype, device=p._local_tensor.device)
        return _dtensor.DTensor.from_local(local, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return p.new_zeros(shape)


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
                state["row_var"] = _factor_zeros(p, p.shape[:-1] + (1,))
            if state.get("col_var") is None:
                state["col_var"] = _factor_zeros(p, p.shape[:-2] + (1, p.shape[-1]))
        elif state.get("variance") is None:
            state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _op_name(self, group: dict) -> str:
        return "fused_adafactor_"

    def _local_state(self, bucket, p, name: str, t):
        # The row / column factors of a DTensor param are replicated (whole statistics on every rank),
        # even where they happen to have the param's shape (one row or one column).
        if name in ("row_var", "col_var") and getattr(t, "_local_tensor", None) is not None:
            return t._local_tensor
        return super()._local_state(bucket, p, name, t)

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
        kw = dict(backend=backend, lr=hyper(group["lr"]), beta2_decay=hyper(group["beta2_decay"]), eps1=hyper(eps1),
                  eps2=hyper(eps2), d=hyper(group["d"]), weight_decay=hyper(group["weight_decay"]),
                  maximize=bool(group["maximize"]), **extra)
        sharded = self._sharded_params(group, params)
        if sharded:
            keep = [i for i in range(len(params)) if i not in sharded]
            for i, dp in sharded.items():
                self._step_whole(dp, i, grads, state, kw)
            params, grads = [params[i] for i in keep], [grads[i] for i in keep]
            state = {n: [v[i] for i in keep] for n, v in state.items()}
            if kw.get("masks") is not None:
                kw["masks"] = [kw["masks"][i] for i in keep]
            if not params:
                return
        optim_ops.fused_adafactor_(params, grads, state.get("row_var", []), state.get("col_var", []),
                                   state.get("variance", []), state["step"], **kw)

    # ----- DTensor params split over ranks ------------------------------------------------------------
    # Adafactor's statistics are over whole rows and columns (and its clipping over the whole update),
    # so a param sharded over ranks (FSDP2, tensor parallel) is stepped whole: its param, gradient (and
    # mask, and a vector's variance) are gathered, every rank runs the same fused step on the whole
    # tensor with the replicated row / column factors, and keeps its own shard of the result. Exact
    # (equal to the unsharded step); costs an all-gather of the param and the gradient per step.
    # torch.optim.Adafactor itself cannot step sharded DTensors (torch 2.14: in-place pow_ on a
    # _NormPartial). Params replicated over their whole mesh take the usual path on local tensors.
    @staticmethod
    def _sharded_params(group, params) -> dict:
        """{index in ``params``: its DTensor param} for the local shards of params sharded over ranks."""
        from bigkernels.ops import _dtensor

        if _dtensor.DTensor is None:
            return {}
        owners = {id(p._local_tensor): p for p in group["params"]
                  if isinstance(p, _dtensor.DTensor) and _dtensor.sharded_dims(p.placements)}
        if not owners:
            return {}
        return {i: owners[id(t)] for i, t in enumerate(params) if id(t) in owners}

    def _step_whole(self, dp, i: int, grads, state, kw) -> None:
        from torch.distributed.tensor import DTensor, Replicate

        from bigkernels.distributed import shard_like

        mesh, placements = dp.device_mesh, tuple(dp.placements)

        def whole(local):
            t = DTensor.from_local(local, mesh, placements, run_check=False, shape=dp.shape, stride=dp.stride())
            return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()

        grad = dp.grad.redistribute(mesh, [Replicate()] * mesh.ndim).to_local() if isinstance(dp.grad, DTensor) \
            else whole(grads[i])
        param = whole(dp._local_tensor).clone()
        st = self.state[dp]
        factored = "row_var" in state
        variance = whole(state["variance"][i]).clone() if not factored else None
        one = dict(kw)
        if one.get("masks") is not None:
            one["masks"] = [whole(one["masks"][i])]
        optim_ops.fused_adafactor_([param], [grad], [state["row_var"][i]] if factored else [],
                                   [state["col_var"][i]] if factored else [], [variance] if not factored else [],
                                   [state["step"][i]], **one)
        with torch.no_grad():
            dp._local_tensor.copy_(shard_like(param, dp, "the stepped param")._local_tensor)
            if not factored:
                st["variance"]._local_tensor.copy_(shard_like(variance, dp, "variance")._local_tensor)
