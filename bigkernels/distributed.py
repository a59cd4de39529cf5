"""bigkernels on DTensors (FSDP2's ``fully_shard``, tensor parallel): the one place that knows how
pruning masks and compressed layers are sharded.

**Pruning masks.** A pruned layer keeps its mask in the ``weight_mask`` buffer, shaped like its
``weight``. FSDP2 shards parameters only, so a mask made before ``fully_shard`` stays a plain
full-size tensor on every rank while its weight becomes a sharded DTensor: :func:`mask_like_weight`
hands out the mask placed like the weight, splitting this rank's full copy without communication
once per mask version (cached; a new mask from ``prune_`` / ``GradualPruner``, or an in-place
change, re-shards it). A mask made after sharding (``prune_`` on DTensor weights) is stored as a
DTensor placed like its weight from the start, so no rank ever holds more than its shard of it.
:func:`local_masks` gives the local shards the optimizers apply (bigkernels' fused optimizers in
their step, torch's optimizers through the post-step hook of
:mod:`bigkernels.sparse.mask_registry`), checked before any weight is written.
``prune_`` scores a sharded weight on the whole tensor (:func:`full_tensor`: one all-gather per
layer), so its sparsity is exact over the full weight and every rank computes the same mask.

**Compressed layers under FSDP2.** ``fully_shard`` shards a module's parameters and leaves its
buffers alone: ``QuantLinear``'s bias and ``SparseLinear``'s stored non-zeros (their trainable
parts) are sharded, all-gathered for forward and trained by any optimizer; ``QuantLinear``'s int8
weight and scales and ``SparseLinear``'s index buffers are buffers, so every rank keeps a full
copy (FSDP2 has no way to shard a buffer). To split the int8 weight itself, use tensor parallelism.

**Tensor parallelism.** :class:`ColwiseParallel` and :class:`RowwiseParallel` are torch's styles
(same arguments, same behaviour for ``nn.Linear`` / ``nn.Embedding``) that also take
:class:`bigkernels.nn.QuantLinear`: its int8 weight and per-output-channel scales are split as
they are (never re-quantised per shard), so a shard computes exactly what the whole layer
computes for its rows (colwise) or its part of the sum (rowwise). See :func:`quant_linear_forward`.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import List, Optional

import torch
from torch import Tensor, nn

from bigkernels.ops import _dtensor

DTensor = _dtensor.DTensor
is_dtensor = _dtensor.is_dtensor
_describe = _dtensor._describe


def _require_dtensor() -> None:
    if DTensor is None:  # pragma: no cover
        raise RuntimeError("bigkernels.distributed needs a torch built with distributed support (torch.distributed)")


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor on every rank: ``t.full_tensor()`` for a DTensor (a collective: every
    rank of its mesh must call it), ``t`` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (``t`` itself for a plain tensor)."""
    return t._local_tensor if is_dtensor(t) else t


def placed_like(t: Tensor, like: Tensor) -> bool:
    """Whether ``t`` is a DTensor with ``like``'s mesh, placements and shape."""
    return (is_dtensor(t) and t.device_mesh == like.device_mesh and tuple(t.placements) == tuple(like.placements)
            and t.shape == like.shape)


def shard_like(full: Tensor, like: Tensor, what: str = "tensor") -> Tensor:
    """``full`` (the whole tensor, the same on every rank) as a DTensor placed like the DTensor
    ``like``: each rank keeps its own piece of its copy, without communication."""
    from torch.distributed.tensor import distribute_tensor

    _require_dtensor()
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"{what} has shape {tuple(full.shape)}, expected {tuple(like.shape)} (the whole tensor it "
                         f"is split like)")
    out = distribute_tensor(full.detach().to(like._local_tensor.device), like.device_mesh, like.placements,
                            src_data_rank=None)
    if out._local_tensor.shape != like._local_tensor.shape:  # FSDP2 and DTensor split alike; guard anyway
        raise ValueError(f"{what}: its shard here has shape {tuple(out._local_tensor.shape)} but the tensor it "
                         f"follows ({_describe(like)}) has a local shard of shape {tuple(like._local_tensor.shape)}")
    return out


# ----- pruning masks ------------------------------------------------------------------------------------
_MASK_SHARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> (mask, version, spec, shard)


def _layer(module: nn.Module) -> str:
    return type(module).__name__


def mask_like_weight(module: nn.Module) -> Tensor:
    """``module.weight_mask`` placed like ``module.weight``: the buffer itself when it already is
    (plain weight and mask, or a DTensor mask placed like its DTensor weight); for a plain
    full-size mask of a DTensor weight, this rank's shard as a DTensor, made once per mask version
    (the mask object and its in-place version) and weight placement, then reused (also for a
    whole mask held as a replicated DTensor, as ``parallelize_module`` leaves it). Raises a
    ValueError naming the layer when the mask cannot serve its weight."""
    w, m = module.weight, getattr(module, "weight_mask", None)
    if not isinstance(m, Tensor) or m.dtype != torch.bool:
        raise ValueError(f"{_layer(module)}: weight_mask must be a bool tensor shaped like its weight, got "
                         f"{m.dtype if isinstance(m, Tensor) else type(m).__name__}")
    if not is_dtensor(w):
        if is_dtensor(m):
            raise ValueError(f"{_layer(module)}: weight_mask is {_describe(m)} but its weight is a plain tensor")
        if m.shape != w.shape:
            raise ValueError(f"{_layer(module)}: weight_mask has shape {tuple(m.shape)}, its weight {tuple(w.shape)}")
        return m
    full = m
    if is_dtensor(m):
        if placed_like(m, w):
            return m
        # a whole mask that a DTensor API replicated (parallelize_module replicates the buffers it
        # does not split): its local tensor is the full mask
        if not (m.device_mesh == w.device_mesh and m.shape == w.shape and all(p.is_replicate() for p in m.placements)):
            raise ValueError(f"{_layer(module)}: weight_mask is {_describe(m)} (shape {tuple(m.shape)}) but its weight "
                             f"is {_describe(w)} (shape {tuple(w.shape)}): a sharded mask must be placed like its weight")
        full = m._local_tensor
    spec = (w.device_mesh, tuple(w.placements), tuple(w.shape), w._local_tensor.device)
    hit = _MASK_SHARDS.get(module)
    if hit is not None and hit[0] is full and hit[1] == full._version and hit[2] == spec:
        return hit[3]
    shard = shard_like(full, w, f"{_layer(module)}.weight_mask")
    _MASK_SHARDS[module] = (full, full._version, spec, shard)
    return shard


def local_masks(modules) -> List[Tensor]:
    """The local shards of ``modules``' masks, each shaped like its weight's local shard (see
    :func:`mask_like_weight`); all checked before returning, so a caller that writes weights
    only afterwards never writes on a failure."""
    return [local(mask_like_weight(m)) for m in modules]


def combine_masks(module: nn.Module, mask: Tensor) -> Tensor:
    """The mask to store on ``module`` for a new full-size ``mask`` (the weight's own layout):
    placed like the weight (sharded when the weight is a DTensor: this rank keeps its shard
    only) and ANDed with the mask the layer has (pruned weights never come back)."""
    w = module.weight
    mask = mask.to(device=local(w).device, dtype=torch.bool).contiguous()
    if is_dtensor(w):
        mask = shard_like(mask, w, f"{_layer(module)}: the new mask")
    elif tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"{_layer(module)}: mask has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}")
    if getattr(module, "weight_mask", None) is not None:
        prev = local(mask_like_weight(module))
        if is_dtensor(mask):
            mask = DTensor.from_local(mask._local_tensor & prev, w.device_mesh, w.placements, run_check=False,
                                      shape=w.shape, stride=w.stride())
        else:
            mask = mask & prev
    return mask


def expect_masks_(model: nn.Module, keys) -> List[str]:
    """Give the layers whose ``weight_mask`` a checkpoint holds (``keys``: its state-dict names,
    e.g. those of ``torch.distributed.checkpoint``'s metadata; other names are ignored) a
    keep-everything mask, placed like the weight (only the local shard is allocated for a
    DTensor weight), so that loading the checkpoint restores the masks: DCP loads only the
    entries the model has, and a model rebuilt to resume has no masks yet. Layers that have a
    mask keep it. Returns the layers' names."""
    from bigkernels.sparse import mask_registry

    names = []
    for key in keys:
        if not key.endswith(".weight_mask"):
            continue
        fqn = key[: -len(".weight_mask")]
        try:
            layer = model.get_submodule(fqn)
        except AttributeError:
            continue
        w = getattr(layer, "weight", None)
        if not isinstance(w, Tensor) or getattr(layer, "weight_mask", None) is not None:
            continue
        ones = torch.ones(local(w).shape, dtype=torch.bool, device=local(w).device)
        if is_dtensor(w):
            ones = DTensor.from_local(ones, w.device_mesh, w.placements, run_check=False, shape=w.shape,
                                      stride=w.stride())
        layer.register_buffer("weight_mask", ones)
        mask_registry.register(layer)
        names.append(fqn)
    return names


def wanda_norms_sum_(squares: dict, linears: dict) -> None:
    """Wanda's per-input-feature sums of squares, summed in place over the ranks of each sharded
    layer's mesh (every rank may have run different calibration data; the masks must agree)."""
    import torch.distributed as dist

    for fqn, layer in linears.items():
        w = getattr(layer, "weight", None)
        if fqn in squares and is_dtensor(w):
            for d in range(w.device_mesh.ndim):
                dist.all_reduce(squares[fqn], group=w.device_mesh.get_group(d))


# ----- tensor parallelism --------------------------------------------------------------------------------
def _quant_placements(style: str):
    """(buffer / parameter name -> placement) of a QuantLinear split colwise or rowwise."""
    from torch.distributed.tensor import Replicate, Shard

    if style == "colwise":  # output channels split: weight rows, their scales and the bias
        return {"weight_int8": Shard(0), "weight_scale": Shard(0), "smooth_scale": Replicate(), "bias": Shard(0)}
    return {"weight_int8": Shard(1), "weight_scale": Replicate(), "smooth_scale": Shard(0), "bias": Replicate()}


def _partition_quant(style: str, src_data_rank: Optional[int], name: str, module: nn.Module, device_mesh) -> None:
    from torch.distributed.tensor import distribute_tensor

    if device_mesh.ndim != 1:
        raise ValueError(f"bk.distributed.{style.capitalize()}Parallel: QuantLinear {name!r}: expected a 1-D device mesh "
                         f"(the tensor-parallel dimension, e.g. mesh['tp']), got {device_mesh.ndim} dimensions")
    for key, pl in _quant_placements(style).items():
        if key == "bias":
            b = module.bias
            if b is not None:
                module.register_parameter("bias", nn.Parameter(
                    distribute_tensor(b.detach(), device_mesh, [pl], src_data_rank=src_data_rank),
                    requires_grad=b.requires_grad))
        elif module._buffers.get(key) is not None:
            module.register_buffer(key, distribute_tensor(module._buffers[key], device_mesh, [pl],
                                                          src_data_rank=src_data_rank))
    module._dense.drop()  # a dequantised copy of the whole weight must not outlive the split


def quant_linear_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """A tensor-parallel QuantLinear's forward (its ``forward`` calls this when its int8 weight is
    a DTensor): ``x`` is the DTensor the style's input function made.

    colwise (int8 weight split by output rows): ``x`` replicated; each rank runs the int8 op on the
    whole input with its rows, scales and bias: its output columns are the unsharded layer's,
    exactly as computed there (the same per-token activation quantisation in w8a8); output
    ``Shard(-1)``. rowwise (split by input columns): ``x`` sharded on its last dimension; each
    rank multiplies its slice by its int8 columns with the full per-output scales, the partial
    sums are all-reduced and the bias added once: w8a16 equals the unsharded layer up to float
    rounding (the sum's order); w8a8 quantises each rank's activation slice on its own absmax,
    so it differs from the unsharded layer within the quantisation error. Gradients flow to the
    input and the bias (the int8 weight is frozen)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    from bigkernels.nn._checks import check_linear_input
    from bigkernels.ops.quant import quant_linear

    w = layer._buffers["weight_int8"]
    mesh = w.device_mesh
    if tuple(w.placements) not in ((Shard(0),), (Shard(1),)):
        raise ValueError(f"QuantLinear: its int8 weight is {_describe(w)}; tensor parallelism splits it Shard(0) "
                         "(bk.distributed.ColwiseParallel) or Shard(1) (RowwiseParallel) on a 1-D mesh")
    colwise = w.placements[0] == Shard(0)
    if not is_dtensor(x):
        raise TypeError(f"QuantLinear split for tensor parallelism ({_describe(w)}) expects a DTensor input (what "
                        f"the parallel style's input function makes), got a plain {type(x).__name__}; apply it "
                        "with parallelize_module and bk.distributed.ColwiseParallel / RowwiseParallel")
    check_linear_input("QuantLinear", x, layer.in_features)
    if x.device_mesh != mesh:
        raise ValueError(f"QuantLinear: input is {_describe(x)} but the layer is split on {mesh}")
    want = Replicate() if colwise else Shard(x.dim() - 1)
    if tuple(x.placements) != (want,):
        x = x.redistribute(mesh, [want])
    # the gradient of a replicated input is a partial sum over the column shards
    xl = x.to_local(grad_placements=[Partial()]) if colwise else x.to_local()
    smooth = layer._buffers.get("smooth_scale")
    if smooth is not None:
        xl = xl / local(smooth).to(xl.dtype)
    bias = layer.bias
    lb = bias.to_local().float() if (bias is not None and colwise) else None
    out = quant_linear(xl, local(w), local(layer._buffers["weight_scale"]), lb, layer.mode)
    if colwise:  # (uneven shards: the global shape cannot be inferred from the local one)
        shape = (*out.shape[:-1], layer.out_features)
        stride = tuple(torch.empty(shape, device="meta").stride())
        return DTensor.from_local(out, mesh, [Shard(out.dim() - 1)], run_check=False, shape=shape, stride=stride)
    out = DTensor.from_local(out, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
    return out if bias is None else out + bias.to(out.dtype)


def _is_quant_linear(module: nn.Module) -> bool:
    from bigkernels.nn.quant_linear import QuantLinear

    return isinstance(module, QuantLinear)


def _styles():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel as TorchColwise
    from torch.distributed.tensor.parallel import RowwiseParallel as TorchRowwise
    from torch.distributed.tensor.parallel.style import distribute_module

    class ColwiseParallel(TorchColwise):
        """torch's ``ColwiseParallel`` (same keyword arguments: ``input_layouts``,
        ``output_layouts``, ``use_local_output``) that also splits a
        :class:`bigkernels.nn.QuantLinear` by output channels: int8 weight rows, their scales
        and the bias ``Shard(0)``, SmoothQuant's input scale replicated; the input is replicated
        and the output ``Shard(-1)`` by default, as for ``nn.Linear``."""

        def _apply(self, module: nn.Module, device_mesh):
            if not _is_quant_linear(module):
                return super()._apply(module, device_mesh)
            return distribute_module(
                module, device_mesh, partial(_partition_quant, "colwise", getattr(self, "src_data_rank", 0)),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    class RowwiseParallel(TorchRowwise):
        """torch's ``RowwiseParallel`` (same keyword arguments) that also splits a
        :class:`bigkernels.nn.QuantLinear` by input channels: int8 weight columns ``Shard(1)``
        and SmoothQuant's input scale ``Shard(0)``, per-output scales and bias replicated; the
        input is ``Shard(-1)`` and the output replicated by default, as for ``nn.Linear``."""

        def _apply(self, module: nn.Module, device_mesh):
            if not _is_quant_linear(module):
                return super()._apply(module, device_mesh)
            self.desired_input_layouts = (Shard(-1),)
            return distribute_module(
                module, device_mesh, partial(_partition_quant, "rowwise", getattr(self, "src_data_rank", 0)),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    for cls in (ColwiseParallel, RowwiseParallel):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"ColwiseParallel": ColwiseParallel, "RowwiseParallel": RowwiseParallel}


def __getattr__(name: str):
    # The styles subclass torch.distributed.tensor.parallel's, imported on first use only.
    if name in ("ColwiseParallel", "RowwiseParallel"):
        _require_dtensor()
        globals().update(_styles())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ColwiseParallel", "RowwiseParallel", "expect_masks_", "full_tensor", "local_masks", "mask_like_weight", "shard_like"]
