"""The optimizer ops on DTensors (FSDP2, tensor parallel): run on the local shards.

An optimizer update is elementwise, so stepping each rank's local shard of a param with the
local shards of its grad and state is exact, whatever the placements, as long as every tensor
of param ``i`` has param ``i``'s mesh and placements. :func:`call_on_shards` checks that (a clear
error otherwise, before anything is modified) and runs the op on the local tensors; step
counters and GradScaler / clipping scalars may be plain tensors or replicated DTensors. A
sum of squares over sharded tensors is a partial sum per rank: :func:`sum_of_squares_on_shards`
returns it as a 0-d DTensor with ``Partial("sum")`` on the sharded mesh dimensions (``.full_tensor()``
reduces it), counting replicated dimensions once.

:func:`register` makes ``torch.ops.bigkernels.<op>`` itself accept DTensors (a rule for DTensor's
``__torch_dispatch__``, so the dispatcher never reaches DTensor's "no sharding strategy" error);
the Python wrappers in ``bigkernels.ops.optim`` route DTensors here before choosing a backend, so
the reference and Triton backends take them too. New elementwise optimizer ops register with
``register(name)`` (their first argument must be the params' list).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bigkernels.ops import _registry

try:  # torch built without distributed support has no DTensor: nothing to handle then
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Replicate
except Exception:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

# Arguments that are not "one per param" even though they are tensors.
_SCALAR_LISTS = ("state_steps",)


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(ts: Sequence[Any]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in ts)


def sharded_dims(placements) -> Tuple[int, ...]:
    """Mesh dimensions over which a tensor with ``placements`` is split (Shard and strided
    shards; Partial counts as sharded too: its values add up over that dimension)."""
    return tuple(d for d, pl in enumerate(placements) if not pl.is_replicate())


@functools.lru_cache(maxsize=None)
def _arguments(op: str) -> Tuple[Tuple[str, str], ...]:
    """(name, kind) of each argument of ``op``; kind: "list", "tensor" or "other"."""
    schema = torch._C.parse_schema(f"{_registry.NAMESPACE}::{op}{_registry.OPS[op].schema}")
    out = []
    for a in schema.arguments:
        t = str(a.type)
        kind = "list" if t in ("List[Tensor]", "Optional[List[Tensor]]") else (
            "tensor" if t in ("Tensor", "Optional[Tensor]") else "other")
        out.append((a.name, kind))
    return tuple(out)


def _describe(t: Any) -> str:
    if is_dtensor(t):
        return f"a DTensor on {t.device_mesh} with placements {tuple(t.placements)}"
    return f"a {type(t).__name__}" + (f" of shape {tuple(t.shape)}" if isinstance(t, Tensor) else "")


def _replicated_local(op: str, name: str, t: Any) -> Any:
    if not is_dtensor(t):
        return t
    if any(not pl.is_replicate() for pl in t.placements):
        raise ValueError(f"{op}: expected {name} to be a plain tensor or a replicated DTensor, got {_describe(t)}")
    return t._local_tensor


def _local_list(op: str, name: str, ts: Sequence[Any], params: Sequence[Any]) -> List[Any]:
    """The local shards of a per-param list, each checked against its param."""
    if name in _SCALAR_LISTS:
        return [_replicated_local(op, f"{name}[{i}]", t) for i, t in enumerate(ts)]
    if ts is not params and len(ts) != len(params):
        return list(ts)  # the op itself reports the length mismatch (same message as without DTensors)
    out = []
    for i, (t, p) in enumerate(zip(ts, params)):
        if is_dtensor(p):
            if not is_dtensor(t) or t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
                raise ValueError(
                    f"{op}: {name}[{i}] must be a DTensor with the mesh and placements of params[{i}] "
                    f"({p.device_mesh}, {tuple(p.placements)}) to be updated shard by shard, got {_describe(t)}")
            if ts is params and any(pl.is_partial() for pl in p.placements):
                raise ValueError(f"{op}: params[{i}] has a Partial placement {tuple(p.placements)}: a sum of "
                                 "per-rank tensors cannot be updated elementwise; redistribute it first")
            out.append(t._local_tensor)
        elif is_dtensor(t):
            raise ValueError(f"{op}: {name}[{i}] is {_describe(t)} but params[{i}] is {_describe(p)}: "
                             "give DTensors for every tensor of a DTensor param and plain tensors otherwise")
        else:
            out.append(t)
    return out


def call_on_shards(op: str, call: Callable, args: tuple, kwargs: Dict[str, Any]):
    """``call(*args, **kwargs)`` (op ``op``, elementwise over its first list) with every DTensor
    replaced by its local shard, after checking they line up (see the module docstring)."""
    spec = _arguments(op)
    args, kwargs = list(args), dict(kwargs)
    params = args[0]
    for pos, (name, kind) in enumerate(spec):
        if pos < len(args):
            value, put = args[pos], functools.partial(args.__setitem__, pos)
        elif name in kwargs:
            value, put = kwargs[name], functools.partial(kwargs.__setitem__, name)
        else:
            continue
        if kind == "list" and value is not None:
            put(_local_list(op, name, value, params))
        elif kind == "tensor" and value is not None:
            put(_replicated_local(op, name, value))
    return call(*args, **kwargs)


def sum_of_squares_on_shards(call: Callable, tensors: Sequence[Any]):
    """Sum of squares of DTensors on one mesh: ``call`` (the op on plain tensors) per group of
    equal placements on the local shards, as a 0-d fp32 DTensor that is ``Partial("sum")`` over
    the mesh dimensions any of them is sharded on (a replicated tensor's share is divided by the
    size of those dimensions it is replicated on, so it counts once) and replicated elsewhere."""
    op = "sum_of_squares"
    if not tensors:
        return call(tensors)
    if not all(map(is_dtensor, tensors)):
        i = next(i for i, t in enumerate(tensors) if not is_dtensor(t))
        raise ValueError(f"{op}: tensors[{i}] is {_describe(tensors[i])} but tensors[0] is {_describe(tensors[0])}: "
                         "give all DTensors (one mesh) or all plain tensors")
    mesh = tensors[0].device_mesh
    groups: Dict[Tuple[int, ...], List[Tensor]] = {}
    for i, t in enumerate(tensors):
        if t.device_mesh != mesh:
            raise ValueError(f"{op}: tensors[{i}] is on {t.device_mesh} but tensors[0] on {mesh}: "
                             "call it once per mesh")
        if any(pl.is_partial() for pl in t.placements):
            raise ValueError(f"{op}: tensors[{i}] has a Partial placement {tuple(t.placements)}; redistribute it first")
        groups.setdefault(sharded_dims(t.placements), []).append(t._local_tensor)
    union = sorted({d for dims in groups for d in dims})
    total = None
    for dims, local in groups.items():
        part = call(local).double() / math.prod(mesh.size(d) for d in union if d not in dims)
        total = part if total is None else total + part
    placements = [Partial("sum") if d in union else Replicate() for d in range(mesh.ndim)]
    return DTensor.from_local(total.float(), mesh, placements, run_check=False)


def register(op: str, sum_of_squares: bool = False) -> None:
    """Make ``torch.ops.bigkernels.<op>`` take DTensors (see the module docstring)."""
    if DTensor is None:
        return
    qual = f"{_registry.NAMESPACE}::{op}"

    def rule(cls, func, types, args, kwargs):
        if sum_of_squares:
            return sum_of_squares_on_shards(func, args[0] if args else kwargs["tensors"])
        return call_on_shards(op, func, tuple(args), kwargs or {})

    torch.library.register_torch_dispatch(qual, DTensor, rule)
