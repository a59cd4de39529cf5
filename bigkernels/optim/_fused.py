"""Machinery shared by the fused optimizers (one place, so every optimizer gets it):

* **The torch namesake's front-end.** A fused optimizer subclasses the ``torch.optim`` class it
  replaces (its *namesake*) and this mixin. Unless the class defines ``__init__`` itself, it gets
  one made from the namesake's signature *of the installed torch* (read with ``inspect`` when the
  class is created), plus the keyword-only arguments in ``_fused_keywords`` (``max_grad_norm``).
  The arguments go to the namesake's own ``__init__``, so every keyword, default, param form
  (tensors, dicts, ``named_parameters()`` / ``(name, param)`` tuples with ``param_names`` in the
  state_dict) and every construction error is torch's own. ``foreach``, ``fused`` and
  ``capturable`` are accepted and kept in the param groups (state_dict compatible) but choose
  nothing: there is one implementation, the fused one. ``differentiable=True`` is refused.
* **Buckets**: params of one group, device, dtype, "kernel can take them" and "pruned", built once
  and reused while the parameter set and the registered pruning masks are unchanged.
* **The step** in two halves. :meth:`FusedOptimizerMixin._init_group` does everything that is
  bookkeeping: buckets, gathering gradients, validation, creating missing state (only once the
  step is known to run), choosing each bucket's backend. It appends the tensors of the step to
  one list and returns a plan made of Python constants. ``torch.compile`` runs a method of that
  name on a ``torch.optim.Optimizer`` eagerly instead of tracing it (what torch's own optimizers
  rely on), so the traced part of :meth:`step` is only list slicing and op calls: no graph break
  in our code. Eagerly, a step on an unchanged parameter set costs a constant number of Python
  statements per bucket (gradients gathered with C-level ``map`` calls; the ops take lists).
* GradScaler's protocol (``grad_scale`` / ``found_inf`` consumed inside the ops), global-norm
  clipping (``max_grad_norm``), pruning masks passed to the ops.
* **DTensor params** (FSDP2's ``fully_shard``, tensor parallel, any placement): buckets are split
  by mesh and placements, and ``_init_group`` hands the ops the local shards of params, grads,
  state and masks (the update is elementwise, so this is exact). A grad whose placements differ
  from its param's (e.g. ``Partial`` under sequence parallelism) is redistributed first, as
  torch's optimizers do implicitly. State is created from the DTensor param, so it is a DTensor
  with the param's mesh and placements (torch's layout: DCP and torch.optim checkpoints
  interoperate); step counters stay plain tensors, as torch keeps them. With ``max_grad_norm``
  each bucket's squares are summed locally and the partial sums reduced once per step and mesh
  (one all-reduce per sharded mesh dimension, replicated dimensions counted once): the norm is
  ``clip_grad_norm_``'s total norm. Every rank must step (collectives), as with torch.
* **Flat state** (``_flat_state = True``; FusedAdam/AdamW): every state of a kernel bucket lives
  in one flat buffer per state name (``step``: one fp32 counter per param), the state_dict entries
  being views of it (DTensors made from those views for DTensor params), so a step hands the op
  two tensor lists (params, grads) instead of one per state. ``state_dict()`` hands out compact
  copies of those views (torch's layout: one tensor of its own per entry), because ``torch.save``
  writes a view's whole storage (every param's piece, the alignment padding): a checkpoint holds
  exactly the state's elements, as torch.optim's does. State replaced from outside (a
  ``load_state_dict``, a bucket that changed) is copied back into a flat buffer at the next step
  (once). Steps where some params of a bucket have no gradient, and devices without a flat
  kernel, pass the views as lists.
* A step that raises removes the state it created (nothing half-initialised is left for a
  checkpoint to save).

Subclass hooks (see the bottom of :class:`FusedOptimizerMixin`): ``_state_names``,
``_init_state`` (or ``_create_state`` for a whole bucket), ``_op_name``, ``_check_group``,
``_update``, ``_bucket_kind``; class attributes ``_fused_keywords``, ``_state_made_by_step`` and
``_flat_state``.
"""
from __future__ import annotations

import inspect
import math
from itertools import compress, repeat
from operator import attrgetter, eq, is_, is_not
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from bigkernels.ops import _dtensor, _registry
from bigkernels.ops import optim as optim_ops
from bigkernels.reference.optim import flat_offsets
from bigkernels.sparse import mask_registry

DTensor = _dtensor.DTensor
_GRAD = attrgetter("grad")
_LAYOUT = attrgetter("layout")
_WEIGHT_MASK = attrgetter("weight_mask")
_LOCAL = attrgetter("_local_tensor")  # a DTensor's shard on this rank (FSDP2 reads it the same way)
_PLACEMENTS = attrgetter("placements")
_MESH = attrgetter("device_mesh")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the C++/CUDA/Triton kernels take
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)  # fp64: the reference ops (fp64 maths)


class Bucket:
    """Params of one group on one device with one dtype, plus their state lists (same order).
    ``mask_owners`` (or None): the pruned module owning each param, whose ``weight_mask`` the
    op applies; a bucket's params are either all pruned or none. ``kernel_ok``: dense,
    contiguous and of a kernel dtype (otherwise the reference op runs). ``spec``: None, or the
    DTensor params' ``(mesh, placements)`` (``state`` then holds local shards); ``shard_dims``: the
    mesh dimensions they are split over. ``flat``: state name -> flat buffer (local) when the
    optimizer keeps flat state; ``offsets``: each param's piece in them (``flat_offsets``)."""

    __slots__ = ("group_index", "params", "mask_owners", "state", "device", "dtype", "kernel_ok", "kind", "ready",
                 "spec", "shard_dims", "flat", "offsets")

    def __init__(self, group_index: int, params: List[Tensor], kernel_ok: bool, mask_owners: Optional[list] = None,
                 kind: Any = None, spec: Optional[tuple] = None):
        self.group_index = group_index
        self.params = params
        self.mask_owners = mask_owners
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.kernel_ok = kernel_ok
        self.kind = kind  # the optimizer's _bucket_kind of its params
        self.spec = spec
        self.shard_dims = _dtensor.sharded_dims(spec[1]) if spec is not None else ()
        self.state: Dict[str, List[Tensor]] = {}
        self.ready = False  # every param has its state and ``state`` holds it
        self.flat: Optional[Dict[str, Tensor]] = None
        self.offsets: Optional[List[int]] = None

    def locals(self, params: List[Tensor]) -> List[Tensor]:
        """``params`` as the ops take them: their local shards for DTensors."""
        return params if self.spec is None else list(map(_LOCAL, params))


def _spec(p: Tensor) -> Optional[tuple]:
    """A DTensor's (mesh, placements); None for a plain tensor."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    return p.device_mesh, tuple(p.placements)


def _check_param(owner: str, p: Tensor) -> None:
    if p.is_complex():
        raise ValueError(
            f"{owner}: complex parameters are not supported (got {p.dtype}); "
            "use torch.view_as_real on the parameter or torch.optim's optimizer")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{owner}: parameters must be float32, float16, bfloat16 or float64, got {p.dtype}")


def _torch_namesake(cls) -> Optional[type]:
    """The torch.optim optimizer ``cls`` stands in for: the first torch.optim class in its MRO."""
    for base in cls.__mro__[1:]:
        if (issubclass(base, torch.optim.Optimizer) and base is not torch.optim.Optimizer
                and base.__module__.startswith("torch.optim")):
            return base
    return None


def _drop_in_init(cls, namesake: type):
    """``cls.__init__``: the namesake's signature (installed torch) + ``cls._fused_keywords``."""
    own = dict(cls._fused_keywords)
    sig = inspect.signature(namesake.__init__)
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in own.items()]
    params = list(sig.parameters.values())
    tail = [params.pop()] if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else []

    def __init__(self, params, *args, **kwargs):
        self._init_fused(**{k: kwargs.pop(k) for k in own if k in kwargs})
        namesake.__init__(self, params, *args, **kwargs)

    __init__.__signature__ = sig.replace(parameters=params + extra + tail)
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = (
        f"Takes every argument of the installed torch's ``{namesake.__module__}.{namesake.__name__}`` "
        f"(same defaults, same errors) plus keyword-only {', '.join(f'``{k}``' for k in own)}.")
    return __init__


class FusedOptimizerMixin:
    """Mixed into a torch.optim optimizer subclass; subclasses define the hooks at the bottom."""

    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes grad_scale/found_inf to step()
    # Keyword-only arguments our optimizers take beyond the namesake's, with their defaults; each is
    # given to _init_fused and kept as an attribute of the same name (pickled with the optimizer).
    _fused_keywords: Dict[str, Any] = {"max_grad_norm": None}
    # False: missing state is created in _init_group (before the trace, zeros: a fresh state needs
    # no special first step). True: the first step differs (SGD's momentum buffer is the gradient):
    # _init_group creates nothing and flags the params, and _update creates their state (in the
    # traced step, so torch.compile guards on the state dict and re-traces after the first step).
    _state_made_by_step = False
    # True: kernel buckets keep each state name in one flat buffer (state_dict entries are views;
    # see the module docstring) and ``_update`` gets ``extra["flat"]``: when True, each state list
    # is one flat buffer for the ``_flat_op_name`` op. The mixin then creates the state itself
    # (``_init_state`` / ``_create_state`` serve the other buckets): ``step`` as one fp32 counter
    # per param, every other name zeros shaped like the param, in its dtype.
    _flat_state = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        namesake = _torch_namesake(cls)
        if namesake is not None and "__init__" not in cls.__dict__:
            cls.__init__ = _drop_in_init(cls, namesake)

    def _init_fused(self, max_grad_norm: Optional[float] = None) -> None:
        """Validate and keep the keywords of ``_fused_keywords`` (before the namesake's __init__)."""
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a positive number or None)")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._reset_fused_caches()

    def _reset_fused_caches(self) -> None:
        self.last_grad_norm: Optional[Tensor] = None
        self._buckets: Optional[List[Bucket]] = None
        self._bucket_key = None
        self._masks_in_step: frozenset = frozenset()  # ids of the pruned modules our ops mask
        self._new_state: list = []  # (param, its state keys before) for state this step created

    # ----- parameter set & pickling -------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group`` (tensors, ``(name, tensor)`` tuples, its errors), then our
        checks; a group we refuse is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            name = type(self).__name__
            if group.get("differentiable", False):
                raise RuntimeError(
                    f"{name} does not support differentiable=True: its fused step is not differentiable "
                    f"(use torch.optim.{_namesake_name(self)}(..., differentiable=True))")
            for p in group["params"]:
                _check_param(name, p)
        except Exception:
            self.param_groups.pop()
            raise
        self._buckets = None

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._fused_keywords})
        return state

    def state_dict(self) -> Dict[str, Any]:
        """torch's ``state_dict`` (same keys, same layout), except that a state entry that is a view
        into a larger storage (flat state: a piece of its bucket's buffer) is handed out as a compact
        copy (a DTensor of a compact local shard for DTensor params), so ``torch.save`` and
        ``torch.distributed.checkpoint`` write exactly its elements. Other entries are the live
        tensors, as torch hands them out."""
        sd = super().state_dict()
        if any(map(_is_view_of_more, (t for st in sd["state"].values() for t in st.values()))):
            sd["state"] = {k: {n: _compact(t) if _is_view_of_more(t) else t for n, t in st.items()}
                           for k, st in sd["state"].items()}
        return sd

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Also how torch's load_state_dict installs the loaded state and groups.
        super().__setstate__(state)
        for k, default in self._fused_keywords.items():
            self.__dict__.setdefault(k, default)
        self._reset_fused_caches()

    def _get_buckets(self) -> List[Bucket]:
        key = mask_registry.optimizer_key(self)  # param groups, and masks prune_ registers
        if self._buckets is None or key != self._bucket_key:
            owners = mask_registry.masked_modules()
            buckets = []
            for gi, group in enumerate(self.param_groups):
                by_kind: Dict[tuple, List[Tensor]] = {}
                for p in group["params"]:
                    spec = _spec(p)
                    t = p if spec is None else p._local_tensor
                    if spec is not None and any(pl.is_partial() for pl in spec[1]):
                        raise ValueError(
                            f"{type(self).__name__}: a param is a DTensor with a Partial placement {spec[1]}: a "
                            "sum of per-rank tensors cannot be updated elementwise; redistribute it first")
                    fits = t.dtype in KERNEL_DTYPES and t.layout == torch.strided and t.is_contiguous()
                    kind = (p.device, p.dtype, fits, id(p) in owners, spec, self._bucket_kind(p))
                    by_kind.setdefault(kind, []).append(p)
                buckets += [Bucket(gi, ps, fits, [owners[id(p)] for p in ps] if masked else None, kind, spec)
                            for (_, _, fits, masked, spec, kind), ps in by_kind.items()]
            self._buckets, self._bucket_key = buckets, key
            self._masks_in_step = frozenset(id(m) for b in buckets for m in (b.mask_owners or ()))
        return self._buckets

    # ----- the step, first half: bookkeeping (eager, also under torch.compile) ---------------------
    def _init_group(self, out: list) -> Tuple[int, tuple]:
        """Everything of a step that is not maths. Appends to ``out``, per bucket with gradients:
        its params, grads, one list per state name (None for state ``_update`` creates; a list
        of one flat buffer with flat state) and its masks, all local shards for DTensors;
        returns ``(mask version, plan)`` with one plan entry per bucket: ``(group index, op
        backend, sum_of_squares backend, n params, ((state name, list length), ...), masked,
        fresh flags or None, flat, dist)`` (``flat``: the state lists are flat buffers for the
        ``_flat_op_name`` op; ``dist``: None, or the DTensor mesh and the dimensions its params
        are sharded over, for the norm's reduction). Raises before creating any state if the
        step cannot run, and removes the state it created if it raises later.

        torch.compile calls a method of this name on an optimizer eagerly, with the list given
        empty, and traces only what follows (torch/_dynamo/variables/optimizer.py): the plan is
        then a constant of the graph, valid while Dynamo's guards on the param groups, grads and
        state hold, and on ``mask_registry.version`` (read in :meth:`step`)."""
        work = []
        for b in self._get_buckets():
            grads = list(map(_GRAD, b.params))
            params, owners = b.params, b.mask_owners
            if any(map(is_, grads, repeat(None))):
                b.ready = False  # its cached state lists hold every param
                keep = list(map(is_not, grads, repeat(None)))
                params, grads = list(compress(params, keep)), list(compress(grads, keep))
                owners = None if owners is None else list(compress(owners, keep))
                if not params:
                    continue
            if not all(map(is_, map(_LAYOUT, grads), repeat(torch.strided))):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if b.spec is not None:
                grads = self._local_grads(b, grads)
            work.append((b, params, grads, owners))
        for gi in sorted({b.group_index for b, _, _, _ in work}):
            self._check_group(self.param_groups[gi])
        masks = [self._step_masks(b, owners) for b, _, _, owners in work]
        # Validated: state is created only now, for a step that runs.
        self._new_state = []
        plan = []
        try:
            for (b, params, grads, _), bucket_masks in zip(work, masks):
                group = self.param_groups[b.group_index]
                names = tuple(self._state_names(group, b))
                state, fresh = self._state_lists(b, params, names)
                device = b.device.type
                kernel = _registry.choose(self._op_name(group), device) if b.kernel_ok else "reference"
                norm = _registry.choose("sum_of_squares", device) if b.kernel_ok else "reference"
                flat = False
                if names and b.flat is not None and params is b.params and fresh is None:
                    flat_op = self._flat_op_name(group)
                    flat_kernel = _registry.choose(flat_op, device)
                    # else the list op's kernel on the views (also when BIGKERNELS_IMPL picks that op's)
                    if flat_kernel != "reference" and (_registry.forced_backend(self._op_name(group)) is None
                                                       or _registry.forced_backend(flat_op) is not None):
                        kernel, flat = flat_kernel, True
                out += b.locals(params)
                out += grads
                for n in names:
                    if flat:
                        out.append(b.flat[n])
                    else:
                        out += state[n]
                spans = tuple((n, 1 if flat else len(state[n])) for n in names)
                if bucket_masks is not None:
                    out += bucket_masks
                dist = (b.spec[0], b.shard_dims) if b.shard_dims else None
                plan.append((b.group_index, kernel, norm, len(params), spans, bucket_masks is not None, fresh, flat,
                             dist))
        except BaseException:
            self._forget_new_state()
            raise
        return mask_registry.version, tuple(plan)

    def _local_grads(self, bucket: Bucket, grads: List[Tensor]) -> List[Tensor]:
        """The local shards of a DTensor bucket's grads; a grad placed otherwise than its param
        (e.g. Partial) is redistributed to the param's placements first (what torch's optimizers
        do implicitly through DTensor ops)."""
        mesh, placements = bucket.spec
        if (all(map(isinstance, grads, repeat(DTensor))) and all(map(is_, map(_MESH, grads), repeat(mesh)))
                and all(map(eq, map(_PLACEMENTS, grads), repeat(placements)))):
            return list(map(_LOCAL, grads))
        out = []
        for g in grads:
            if not isinstance(g, DTensor) or g.device_mesh != mesh:
                raise ValueError(
                    f"{type(self).__name__}: the grad of a DTensor param on {mesh} with placements {placements} must "
                    f"be a DTensor on that mesh, got {_dtensor._describe(g)}")
            if tuple(g.placements) != placements:
                g = g.redistribute(mesh, placements)
            out.append(g._local_tensor)
        return out

    def _step_masks(self, bucket: Bucket, owners: Optional[list]) -> Optional[List[Tensor]]:
        """The pruning masks the op applies (None: not pruned): local shards placed like their
        DTensor params (``bigkernels.distributed.local_masks``: a full-size mask made before
        sharding is split once per mask version), checked before anything is written."""
        if owners is None:
            return None
        if bucket.spec is None:
            return list(map(_WEIGHT_MASK, owners))  # plain params: the buffers (the op checks them)
        from bigkernels import distributed

        try:
            return distributed.local_masks(owners)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: pruning mask: {e}") from e

    def _state_lists(self, bucket: Bucket, params: List[Tensor], names: tuple):
        """State lists of ``params`` (local shards for DTensors) and, with ``_state_made_by_step``,
        which of them have no state yet (None when none). Creates missing state otherwise
        (torch's lazy init; also for DTensor params with ``_state_made_by_step``, whose ``_update``
        then finds it made) and puts step counters on the param's device as fp32 (what the
        kernels read); keeps flat state flat."""
        if not names:  # e.g. SGD without momentum: torch keeps no state at all
            return {}, None
        if bucket.ready and params is bucket.params and tuple(bucket.state) == names:
            return bucket.state, None
        get = self.state.get
        fresh = [st is None or any(st.get(n) is None for n in names) for st in map(get, params)]
        flat = self._flat_state and bucket.kernel_ok
        new = list(compress(params, fresh)) if any(fresh) else []
        if new and (not self._state_made_by_step or bucket.spec is not None or flat):
            self._new_state += [(p, None if get(p) is None else frozenset(get(p))) for p in new]
            if flat:
                self._flatten(bucket, names, new)
            else:
                self._create_state(bucket, new)
        elif flat and (bucket.flat is None or any(n not in bucket.flat for n in names)):
            self._flatten(bucket, names, [])
        lists: Dict[str, List[Optional[Tensor]]] = {n: [] for n in names}
        for p in params:
            st = get(p) or {}
            step = st.get("step")
            if step is not None and not flat and (step.device != p.device or step.dtype != torch.float32):
                st["step"] = step.to(device=p.device, dtype=torch.float32)
            for n in names:
                t = st.get(n)
                lists[n].append(t if t is None or bucket.spec is None else self._local_state(bucket, p, n, t))
        if not self._state_made_by_step or not any(fresh):
            if params is bucket.params:
                bucket.state, bucket.ready = lists, True
            return lists, None
        return lists, tuple(fresh)

    def _local_state(self, bucket: Bucket, p: Tensor, name: str, t: Tensor) -> Tensor:
        """The local shard of a DTensor param's state entry: a DTensor (with the param's
        placements when shaped like it), or a plain 0-d tensor such as a step counter."""
        mesh, placements = bucket.spec
        if isinstance(t, DTensor):
            if t.shape == p.shape and (t.device_mesh != mesh or tuple(t.placements) != placements):
                raise ValueError(
                    f"{type(self).__name__}: state '{name}' of a DTensor param on {mesh} with placements "
                    f"{placements} is {_dtensor._describe(t)}: it must be placed like its param")
            return t._local_tensor
        if t.dim() != 0:
            raise ValueError(
                f"{type(self).__name__}: state '{name}' of a DTensor param (shape {tuple(p.shape)}, placements "
                f"{placements}) is a plain tensor of shape {tuple(t.shape)}; expected a DTensor placed like the "
                "param (torch's layout; load sharded checkpoints with torch.distributed.checkpoint)")
        return t

    # ----- flat state --------------------------------------------------------------------------------
    def _flatten(self, bucket: Bucket, names: tuple, new: List[Tensor]) -> None:
        """Make every state entry of ``bucket``'s params a view of the bucket's flat buffer of
        its name (entries that are not, e.g. after a ``load_state_dict``, are copied in once) and
        create the entries of ``new`` params as zeroed views. ``step``: one fp32 counter per param; other names: shaped like the param."""
        params = bucket.params
        locs = bucket.locals(params)
        if bucket.offsets is None:
            bucket.offsets = flat_offsets([t.numel() for t in locs], locs[0].element_size())
            bucket.flat = {}
        new_ids = set(map(id, new))
        get = self.state.get
        for name in names:
            steps = name == "step"
            entries = [(get(p) or {}).get(name) for p in params]
            buf = bucket.flat.get(name)
            if buf is None:
                n = len(params) if steps else bucket.offsets[-1]
                buf = torch.zeros(n, dtype=torch.float32 if steps else bucket.dtype, device=locs[0].device)
            bucket.flat[name] = buf
            for i, (p, e) in enumerate(zip(params, entries)):
                if e is None and id(p) not in new_ids:
                    continue  # no state (no gradient yet): no entry, as torch
                piece = buf[i] if steps else buf[bucket.offsets[i]:bucket.offsets[i] + locs[i].numel()].view(
                    locs[i].shape)
                if e is None:
                    piece.zero_()
                else:
                    t = self._local_state(bucket, p, name, e) if bucket.spec is not None else e
                    if _is_piece(t, piece):
                        continue
                    if t.numel() != piece.numel():
                        raise ValueError(
                            f"{type(self).__name__}: state '{name}' has {t.numel()} elements, expected "
                            f"{piece.numel()} (shape {tuple(piece.shape)}) for its param")
                    piece.copy_(t.reshape(piece.shape))
                self.state[p][name] = piece if steps or bucket.spec is None else DTensor.from_local(
                    piece, bucket.spec[0], bucket.spec[1], run_check=False, shape=p.shape, stride=p.stride())

    def _forget_new_state(self) -> None:
        """Remove the state entries the current step created (it raised)."""
        for p, keys in self._new_state:
            st = self.state.get(p)
            if st is None:
                continue
            if keys is None:
                del self.state[p]
            else:
                for k in [k for k in st if k not in keys]:
                    del st[k]
        self._new_state = []
        for b in self._buckets or ():
            b.ready = False

    # ----- the step, second half: the maths (what torch.compile traces) ----------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every param with a gradient (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tensors: list = []
        version, plan = self._init_group(tensors)
        if version != mask_registry.version:
            # Unreachable eagerly (the plan was made just now); under torch.compile this comparison
            # is what makes Dynamo guard the traced step on the registered masks.
            raise RuntimeError("bigkernels: pruning masks changed during an optimizer step")
        if not plan:
            return loss
        work, pos = [], 0
        for gi, backend, norm_backend, n, spans, masked, fresh, flat, dist in plan:
            params, grads = tensors[pos:pos + n], tensors[pos + n:pos + 2 * n]
            pos += 2 * n
            state = {}
            for name, length in spans:
                state[name] = tensors[pos:pos + length]
                pos += length
            masks = None
            if masked:
                masks = tensors[pos:pos + n]
                pos += n
            work.append((gi, backend, norm_backend, params, grads, state, masks, fresh, flat, dist))
        if torch.compiler.is_compiling():
            self._step_buckets(work)
        else:
            try:
                self._step_buckets(work)
            except BaseException:
                self._forget_new_state()  # nothing half-initialised left for a checkpoint to save
                raise
            self._new_state = []
        return loss

    def _step_buckets(self, work: list) -> None:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_norm = self._global_grad_norm(work, grad_scale)
        per_device: Dict[torch.device, dict] = {}
        for gi, backend, _, params, grads, state, masks, fresh, flat, _ in work:
            dev = params[0].device
            extra = per_device.get(dev)
            if extra is None:  # GradScaler's tensors (and the norm) copied at most once per device
                extra = dict(grad_scale=_on(grad_scale, dev), found_inf=_on(found_inf, dev))
                if grad_norm is not None:
                    extra.update(grad_norm=_on(grad_norm, dev), max_grad_norm=self.max_grad_norm)
                per_device[dev] = extra
            group = self.param_groups[gi]
            if backend != "reference" and torch.compiler.is_compiling() and _has_tensor_value(group):
                backend = "reference"  # see hyper(): the kernels' ops take hyperparameters as floats
            extra = dict(extra, masks=masks)
            if self._flat_state:
                extra["flat"] = flat
            self._update(group, backend, params, grads, state, fresh, extra)

    def _global_grad_norm(self, work, grad_scale) -> Optional[Tensor]:
        """L2 norm over every gradient of the step (still scaled), one reduction pass per bucket;
        DTensor buckets' sums are partial and reduced once per mesh (see _reduce_partial_sums)."""
        if self.max_grad_norm is None:
            return None
        first = work[0][3][0].device
        total = None
        partial: Dict[Any, Dict[tuple, List[Tensor]]] = {}
        for _, _, norm_backend, _, grads, _, _, _, _, dist in work:
            sq = optim_ops.sum_of_squares(grads, backend=norm_backend).to(first)
            if dist is None:  # plain tensors, or DTensors replicated over their whole mesh: counted once
                total = sq if total is None else total + sq
            else:
                partial.setdefault(dist[0], {}).setdefault(dist[1], []).append(sq)
        for mesh, by_dims in partial.items():
            sq = _reduce_partial_sums(mesh, by_dims).to(first)
            total = sq if total is None else total + sq
        norm = total.sqrt()
        scale = _on(grad_scale, first)
        self.last_grad_norm = norm / scale if scale is not None else norm
        return norm

    # ----- hooks for subclasses -----------------------------------------------------------------
    def _bucket_kind(self, p: Tensor) -> Any:
        """Extra key splitting buckets (hashable), e.g. factored (>= 2-D) vs not for Adafactor, or a
        DTensor's mesh and placements. Default: None (no split)."""
        return None

    def _state_names(self, group: dict, bucket: Bucket) -> List[str]:
        """State entries the op takes for ``bucket``'s params, in the op's order (torch's
        state_dict names)."""
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        """Fill the missing entries of ``state`` (``self.state[p]``) in torch's layout."""
        raise NotImplementedError

    def _create_state(self, bucket: Bucket, params: List[Tensor]) -> None:
        """Create the state of ``params`` (those of ``bucket`` that have none yet). Override to
        allocate per bucket (e.g. one flat buffer per state name with per-param views)."""
        group = self.param_groups[bucket.group_index]
        for p in params:
            self._init_state(p, self.state[p], group)

    def _op_name(self, group: dict) -> str:
        """The registered op (``bigkernels.ops._registry``) that steps this group's buckets."""
        raise NotImplementedError

    def _flat_op_name(self, group: dict) -> str:
        """With ``_flat_state``: the op taking flat state buffers (used where it has a compiled
        kernel for the device; the ``_op_name`` op on the views otherwise)."""
        raise NotImplementedError

    def _check_group(self, group: dict) -> None:
        """Raise (as torch's constructor would) if the group's current hyperparameters cannot be
        stepped; runs before any state is created. Default: nothing to check."""

    def _update(self, group: dict, backend: str, params, grads, state, fresh, extra) -> None:
        """Run the op on ``backend``; ``state`` maps each state name to its list; ``fresh`` (None,
        or one flag per param) marks params without state when ``_state_made_by_step``;
        ``extra`` holds the GradScaler / clipping inputs and ``masks`` (None, or one per param)."""
        raise NotImplementedError


def _is_piece(t: Tensor, piece: Tensor) -> bool:
    """Whether ``t`` is exactly ``piece`` (same storage and offset, shape, dtype and device; an
    empty tensor has no data pointer of its own, so the storage is compared)."""
    return (t.untyped_storage().data_ptr() == piece.untyped_storage().data_ptr()
            and t.storage_offset() == piece.storage_offset() and t.shape == piece.shape and t.dtype == piece.dtype
            and t.device == piece.device and t.is_contiguous())


def _is_view_of_more(t) -> bool:
    """Whether ``t`` (a state_dict value) is a tensor viewing a storage larger than itself (for a
    DTensor: its local shard), which ``torch.save`` would write whole."""
    if not isinstance(t, Tensor):
        return False
    local = t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t
    return local.untyped_storage().nbytes() != local.numel() * local.element_size()


def _compact(t: Tensor) -> Tensor:
    """A copy of ``t`` in a storage of its own (a DTensor keeps its mesh, placements and global
    shape and stride)."""
    if DTensor is not None and isinstance(t, DTensor):
        return DTensor.from_local(t._local_tensor.clone(memory_format=torch.contiguous_format), t.device_mesh,
                                  t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return t.clone(memory_format=torch.contiguous_format)


def _reduce_partial_sums(mesh, by_dims: Dict[tuple, List[Tensor]]) -> Tensor:
    """The global sum of squares from this rank's partial sums on ``mesh``, grouped by the mesh
    dimensions their tensors are sharded over: one fp64 vector (one entry per group) all-reduced
    over each of those dimensions (one all-reduce for FSDP's 1-D mesh), each entry then divided
    by the size of the reduced dimensions its tensors are replicated on (their copies were summed;
    exact in fp64 for these sizes)."""
    import torch.distributed._functional_collectives as funcol

    union = sorted({d for dims in by_dims for d in dims})
    keys = list(by_dims)
    vec = torch.stack([torch.stack(by_dims[k]).double().sum() for k in keys])
    if vec.device.type != mesh.device_type:
        vec = vec.to(mesh.device_type)
    for d in union:
        vec = funcol.all_reduce(vec, "sum", (mesh, d))
    div = [math.prod(mesh.size(d) for d in union if d not in k) for k in keys]
    if any(x != 1 for x in div):
        vec = vec / torch.tensor(div, dtype=torch.float64, device=vec.device)
    return vec.sum().float()


def _namesake_name(opt) -> str:
    namesake = _torch_namesake(type(opt))
    return namesake.__name__ if namesake is not None else "Optimizer"


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """A GradScaler / norm 0-d tensor on ``device`` as fp32 (the ops' expectation)."""
    if t is None or t.device == device:
        return t
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


def scalar(value) -> float:
    """A hyperparameter as a Python float (LR schedulers and torch's optim_db use 0-d tensors)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def hyper(value):
    """A hyperparameter for the op: a Python float, except a tensor (``lr=torch.tensor(...)``,
    tensor betas) under torch.compile, which stays a tensor: reading its value would break the
    graph, so :meth:`FusedOptimizerMixin.step` runs such groups on the reference op, which
    computes with tensors (traced and fused by the compiler, as torch's own compiled step is).
    Floats reach the kernels' ops as constants of the graph: under torch.compile a new float value
    (an LR scheduler stepping a float lr) re-traces the step; a tensor lr does not."""
    if isinstance(value, torch.Tensor) and torch.compiler.is_compiling():
        return value
    return scalar(value)


def _has_tensor_value(group: dict) -> bool:
    """Whether a hyperparameter of ``group`` is a tensor (or a tuple holding one, like betas)."""
    return any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v))
               for k, v in group.items() if k != "params")
