"""AdamW8bit: AdamW with both moments stored in 8 bits (block-wise quantised), dequantised, updated
and requantised inside one fused kernel per device and dtype."""
from __future__ import annotations

from itertools import chain
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from bigkernels.ops import _dtensor
from bigkernels.ops import optim as optim_ops
from bigkernels.optim._fused import FusedOptimizerMixin, hyper, scalar
from bigkernels.reference import optim as ref

_QUANTISED = ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")  # state names of an 8-bit param
_FP32 = ("exp_avg", "exp_avg_sq")  # state names of a param that keeps fp32 moments (besides "step")
MIN_BLOCK, MAX_BLOCK = 64, 4096


def _check_block_size(block_size) -> None:
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or not MIN_BLOCK <= block_size <= MAX_BLOCK
            or block_size & (block_size - 1)):
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a power of two from {MIN_BLOCK} to {MAX_BLOCK})")


def _is_quantised_entry(name: str, value: Any) -> bool:
    return isinstance(value, Tensor) and (name.endswith("_scale") or (name in _FP32 and value.dtype == torch.uint8))


class AdamW8bit(FusedOptimizerMixin, torch.optim.Optimizer):
    """AdamW whose two moments take 2 bytes per parameter instead of 8: each moment is stored as
    8-bit codes plus one fp32 scale (the block's absolute maximum) per ``block_size`` elements,
    and the whole step (dequantise -> AdamW update -> requantise) runs in one fused kernel per
    device and dtype (CPU C++ on scalar/AVX2/AVX-512, Triton on CUDA).

    Arguments as ``torch.optim.AdamW``'s: ``params`` (tensors, param-group dicts or
    ``named_parameters()``), ``lr`` (float or 1-element tensor), ``betas``, ``eps``,
    ``weight_decay`` (decoupled), and keyword-only ``maximize``; plus:

    * ``block_size`` (default 256): elements per scale, a power of two from 64 to 4096 (kept in
      each param group, so a checkpoint says what it holds). State memory per 8-bit param:
      2 + 8 / block_size bytes (2.03 B at 256, 0.254x of fp32 AdamW's 8 B).
    * ``max_grad_norm``: clip gradients by their global L2 norm inside the step (``last_grad_norm``
      keeps the norm).

    Params with fewer than ``MIN_8BIT_NUMEL`` (4,096) elements (biases, norms) keep fp32 moments
    and run the fused AdamW kernel, as bitsandbytes does. The codes are small float formats (the
    first moment with a sign bit and 3 mantissa bits over 15 binades; the second moment stored as
    its square root with 4 mantissa bits over 15 binades, so down to 2**-30 of its block maximum
    and never rounded to zero): see ``bigkernels.reference.optim`` for the exact definition, which
    every backend reproduces bit for bit. Rounding is to nearest (deterministic).

    State dict: per 8-bit param ``step``, ``exp_avg`` / ``exp_avg_sq`` (uint8 codes shaped like the
    param), ``exp_avg_scale`` / ``exp_avg_sq_scale`` (fp32, one per block): tensors and numbers
    only, so ``torch.load``'s default ``weights_only=True`` reads it; loading it back keeps the
    state 8-bit and training continues exactly. Loading a ``torch.optim.AdamW`` (or FusedAdamW)
    state dict quantises its moments (see :meth:`from_fp32_state`); :meth:`fp32_state_dict` goes
    the other way. Works with ``torch.amp.GradScaler`` (inf/NaN steps change nothing), LR
    schedulers, bigkernels.prune_ masks (applied inside the step), fp32/bf16/fp16 params on the
    kernels (fp64 and non-contiguous params on the reference op) and ``torch.compile``.
    A non-finite moment makes its whole block non-finite (as in other block-quantised optimizers).

    DTensor params (FSDP2, tensor parallel) are stepped on their local shards, blocks counted within
    each rank's shard: ``exp_avg`` / ``exp_avg_sq`` are DTensors placed like the param, the scales 1-D
    DTensors split evenly over the param's sharded mesh dimensions (each rank holding as many as the
    largest shard has blocks). Such a checkpoint reloads on the same mesh and placements; to change
    the sharding go through :meth:`fp32_state_dict` (DTensor moments placed like the params).
    """

    MIN_8BIT_NUMEL = ref.ADAMW8BIT_MIN_NUMEL
    _fused_keywords = {"max_grad_norm": None}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, block_size: int = 256,
                 max_grad_norm: Optional[float] = None, maximize: bool = False):
        _check_hyper(scalar(lr), [scalar(b) for b in betas], scalar(eps), scalar(weight_decay))
        _check_block_size(block_size)
        self._init_fused(max_grad_norm=max_grad_norm)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        block_size=block_size)
        super().__init__(params, defaults)

    # ----- conversions ------------------------------------------------------------------------
    @classmethod
    def from_fp32_state(cls, params, state_dict, *, block_size: int = 256,
                        max_grad_norm: Optional[float] = None) -> "AdamW8bit":
        """An AdamW8bit over ``params`` that continues a ``torch.optim.AdamW`` (or FusedAdamW /
        AdamW8bit) run: ``state_dict`` is that optimizer's state dict (or the optimizer itself),
        whose param groups (lr, betas, eps, weight_decay, ...) and steps are taken over and whose
        fp32 moments are quantised (params below MIN_8BIT_NUMEL keep them in fp32)."""
        if isinstance(state_dict, torch.optim.Optimizer):
            state_dict = state_dict.state_dict()
        groups = state_dict["param_groups"]
        first = groups[0] if groups else {}
        opt = cls(params, lr=first.get("lr", 1e-3), betas=first.get("betas", (0.9, 0.999)),
                  eps=first.get("eps", 1e-8), weight_decay=first.get("weight_decay", 1e-2), block_size=block_size,
                  max_grad_norm=max_grad_norm, maximize=bool(first.get("maximize", False)))
        opt.load_state_dict(state_dict)
        return opt

    def fp32_state_dict(self) -> Dict[str, Any]:
        """This optimizer's state dict with the moments dequantised to the params' dtype and
        without ``block_size``: what ``torch.optim.AdamW.load_state_dict`` takes."""
        sd = self.state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        block_of = {id(p): g["block_size"] for g in self.param_groups for p in g["params"]}
        state = {}
        for pid, st in sd["state"].items():
            p = params[pid]
            st = dict(st)
            if "exp_avg_scale" in st:
                st["exp_avg"], st["exp_avg_sq"] = _dequantise(p, *(st.pop(k) for k in _QUANTISED), block_of[id(p)])
            state[pid] = st
        groups = [{k: v for k, v in g.items() if k != "block_size"} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping 8-bit codes and fp32 scales as they are (torch
        would cast every state tensor to the param's dtype), then bringing every param's state to
        this optimizer's layout: fp32 moments of 8-bit-sized params (a torch.optim.AdamW
        checkpoint) quantised, codes of small params dequantised. Raises before changing anything
        on an amsgrad state or codes/scales that do not fit their param."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        saved_block = {pid: g.get("block_size") for g in saved_groups for pid in g["params"]}
        own_block = [g["block_size"] for g in self.param_groups]
        for g in saved_groups:
            if g.get("amsgrad", False):
                raise ValueError("AdamW8bit cannot load an amsgrad=True state (max_exp_avg_sq has no 8-bit form); "
                                 "load it into torch.optim.AdamW(amsgrad=True) instead")
            if g.get("block_size") is not None:
                _check_block_size(g["block_size"])
        kept: Dict[Any, Dict[str, Tensor]] = {}
        stripped = {}
        for pid, st in state_dict["state"].items():
            kept[pid] = {k: v for k, v in st.items() if _is_quantised_entry(k, v)}
            stripped[pid] = {k: v for k, v in st.items() if k not in kept[pid]}
            if kept[pid] and pid in id_map:
                _check_quantised(id_map[pid], kept[pid], saved_block[pid], pid)
        super().load_state_dict(dict(state_dict, state=stripped))
        for g, block in zip(self.param_groups, own_block):
            g.setdefault("block_size", block)  # a torch.optim.AdamW checkpoint has none
            g.setdefault("maximize", False)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, entries in kept.items():
            p = id_map.get(pid)
            if p is None:
                continue
            st = self.state[p]
            st.update({k: v.to(p.device) for k, v in entries.items()})
        for p, st in list(self.state.items()):
            if isinstance(p, Tensor) and id(p) in group_of:
                self._to_own_layout(p, st, group_of[id(p)])
        self._reset_fused_caches()

    def _to_own_layout(self, p: Tensor, st: dict, group: dict) -> None:
        """Quantise fp32 moments of an 8-bit-sized param; dequantise the codes of a small one."""
        st.pop("max_exp_avg_sq", None)
        quantised = "exp_avg_scale" in st
        if self._bucket_kind(p) == "8bit" and not quantised and st.get("exp_avg") is not None:
            st.update(zip(_QUANTISED, self._quantise(p, st.pop("exp_avg"), st.pop("exp_avg_sq"), group)))
        elif self._bucket_kind(p) != "8bit" and quantised:
            st["exp_avg"], st["exp_avg_sq"] = _dequantise(p, *(st.pop(k) for k in _QUANTISED), group["block_size"])

    # ----- the one place that makes 8-bit state --------------------------------------------------
    def _new_8bit_state(self, p: Tensor, group: dict) -> Dict[str, Tensor]:
        """Zero 8-bit moments for ``p``: codes shaped like it, one fp32 scale per block of its
        elements in flat order (for a DTensor param: of its local shard, see :func:`_wrap_8bit`)."""
        local = p._local_tensor if _dtensor.is_dtensor(p) else p
        blocks = ref.num_blocks(local.numel(), group["block_size"])
        codes = [torch.zeros(local.shape, dtype=torch.uint8, device=local.device) for _ in range(2)]
        scales = [torch.zeros(blocks, dtype=torch.float32, device=local.device) for _ in range(2)]
        return _wrap_8bit(p, *codes, *scales, group["block_size"])

    def _quantise(self, p: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, group: dict):
        """fp32 moments -> (codes, codes, scales, scales) in the layout of :meth:`_new_8bit_state`
        (a DTensor param's moments, placed like it, quantised shard by shard)."""
        if _dtensor.is_dtensor(p):
            local = p._local_tensor
            exp_avg = _local_like(p, exp_avg, "exp_avg")
            exp_avg_sq = _local_like(p, exp_avg_sq, "exp_avg_sq")
        else:
            local = p
        mc, rc, ms, rs = ref.quantize_adamw8bit_state(exp_avg.to(local.device), exp_avg_sq.to(local.device),
                                                      group["block_size"])
        st = _wrap_8bit(p, mc.view(local.shape), rc.view(local.shape), ms, rs, group["block_size"])
        return tuple(st[k] for k in _QUANTISED)

    def _local_state(self, bucket, p: Tensor, name: str, t: Tensor) -> Tensor:
        # A DTensor param's scales are padded to the largest shard's block count (see _wrap_8bit):
        # the op takes the blocks of this rank's shard.
        local = super()._local_state(bucket, p, name, t)
        if name.endswith("_scale"):
            local = local[:ref.num_blocks(p._local_tensor.numel(), self.param_groups[bucket.group_index]["block_size"])]
        return local

    # ----- hooks of FusedOptimizerMixin ----------------------------------------------------------
    def _bucket_kind(self, p: Tensor) -> str:
        return "8bit" if p.numel() >= self.MIN_8BIT_NUMEL else "fp32"

    def _state_names(self, group: dict, bucket) -> List[str]:
        # _init_group asks _op_name(group) right after this for the same bucket; the op depends on
        # the bucket's kind, which _op_name is not given.
        self._bucket_named = bucket
        return ["step", *_QUANTISED] if bucket.kind == "8bit" else ["step", *_FP32]

    def _op_name(self, group: dict) -> str:
        return "adamw8bit_" if self._bucket_named.kind == "8bit" else "fused_adamw_"

    def _create_state(self, bucket, params: List[Tensor]) -> None:
        group = self.param_groups[bucket.group_index]
        for p in params:
            st = self.state[p]
            if "step" not in st:  # a plain fp32 counter (as torch keeps it, also for DTensor params)
                local = p._local_tensor if _dtensor.is_dtensor(p) else p
                st["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
            if bucket.kind == "8bit":
                st.update(self._new_8bit_state(p, group))
            else:
                st.update({n: torch.zeros_like(p, memory_format=torch.preserve_format) for n in _FP32})

    def _check_group(self, group: dict) -> None:
        _check_hyper(scalar(group["lr"]), [scalar(b) for b in group["betas"]], scalar(group["eps"]),
                     scalar(group["weight_decay"]))
        _check_block_size(group["block_size"])

    def _update(self, group, backend, params, grads, state, fresh, extra) -> None:
        beta1, beta2 = group["betas"]
        kw = dict(lr=hyper(group["lr"]), beta1=hyper(beta1), beta2=hyper(beta2),
                  weight_decay=hyper(group["weight_decay"]), eps=hyper(group["eps"]),
                  maximize=bool(group["maximize"]), backend=backend, **extra)
        if "exp_avg_scale" in state:
            optim_ops.adamw8bit_(params, grads, state["exp_avg"], state["exp_avg_sq"], state["exp_avg_scale"],
                                 state["exp_avg_sq_scale"], state["step"], block_size=int(group["block_size"]), **kw)
        else:
            optim_ops.fused_adam_(params, grads, state["exp_avg"], state["exp_avg_sq"], [], state["step"],
                                  decoupled_weight_decay=True, amsgrad=False, **kw)


def _check_hyper(lr: float, betas, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's constructor checks and messages."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected two values, got {len(betas)}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_quantised(p: Tensor, entries: Dict[str, Tensor], block_size: Optional[int], pid) -> None:
    """Codes and scales of a loaded state fit param ``p`` (checked before anything is loaded)."""
    if block_size is None:
        raise ValueError(f"AdamW8bit.load_state_dict: param {pid} has 8-bit state but its group has no block_size")
    missing = [k for k in _QUANTISED if k not in entries]
    if missing:
        raise ValueError(f"AdamW8bit.load_state_dict: param {pid}'s 8-bit state lacks {missing}")
    blocks = _scale_spec(p, block_size)[2] if _dtensor.is_dtensor(p) else ref.num_blocks(p.numel(), block_size)
    for k in _FP32:
        if entries[k].numel() != p.numel():
            raise ValueError(f"AdamW8bit.load_state_dict: param {pid}: {k} has {entries[k].numel()} codes, "
                             f"expected {p.numel()} (the param's numel)")
    for k in ("exp_avg_scale", "exp_avg_sq_scale"):
        t = entries[k]
        if t.dtype != torch.float32 or t.shape != (blocks,):
            raise ValueError(f"AdamW8bit.load_state_dict: param {pid}: expected {k} float32 of shape ({blocks},) "
                             f"(block_size {block_size}), got {t.dtype} of shape {tuple(t.shape)}")


def _scale_spec(p: Tensor, block_size: int):
    """(placements, padded local blocks, global length) of a DTensor param's scales: a 1-D DTensor
    split evenly (``Shard(0)``) over the mesh dimensions ``p`` is sharded on and replicated over the
    others, each rank holding as many scales as the param's largest local shard has blocks (the
    first ones used, the rest zero): DTensor's even split then matches every rank's piece, so DCP
    saves and reloads it on the same mesh and placements."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    placements = tuple(Replicate() if pl.is_replicate() else Shard(0) for pl in p.placements)
    shape = list(p.shape)
    for d, pl in enumerate(p.placements):  # the first (largest) chunk along every sharded dim
        if pl.is_shard():
            dim = pl.dim % len(shape) if shape else 0
            shape[dim] = -(-shape[dim] // mesh.size(d))
    largest = 1
    for x in shape:
        largest *= x
    padded = ref.num_blocks(largest, block_size)
    sharded = 1
    for d, pl in enumerate(p.placements):
        if not pl.is_replicate():
            sharded *= mesh.size(d)
    return placements, padded, padded * sharded


def _wrap_8bit(p: Tensor, mc: Tensor, rc: Tensor, ms: Tensor, rs: Tensor, block_size: int) -> Dict[str, Tensor]:
    """The state entries of ``p`` from local codes and scales: as they are for a plain param; for a
    DTensor param codes placed like it and scales as :func:`_scale_spec` (quantised per local shard)."""
    if not _dtensor.is_dtensor(p):
        return dict(exp_avg=mc, exp_avg_sq=rc, exp_avg_scale=ms, exp_avg_sq_scale=rs)
    from torch.distributed.tensor import DTensor

    mesh, placements = p.device_mesh, tuple(p.placements)
    splace, padded, length = _scale_spec(p, block_size)

    def codes(t):
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())

    def scales(t):
        buf = torch.zeros(padded, dtype=torch.float32, device=t.device)
        buf[:t.numel()] = t
        return DTensor.from_local(buf, mesh, splace, run_check=False, shape=(length,), stride=(1,))

    return dict(exp_avg=codes(mc), exp_avg_sq=codes(rc), exp_avg_scale=scales(ms), exp_avg_sq_scale=scales(rs))


def _local_like(p: Tensor, t: Tensor, name: str) -> Tensor:
    """The local shard of a DTensor param's fp32 moment ``t`` (a DTensor placed like it)."""
    if not (_dtensor.is_dtensor(t) and t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements)):
        raise ValueError(f"AdamW8bit: state '{name}' of a DTensor param with placements {tuple(p.placements)} is "
                         f"{_dtensor._describe(t)}: it must be a DTensor placed like its param")
    return t._local_tensor


def _dequantise(p: Tensor, mc: Tensor, rc: Tensor, ms: Tensor, rs: Tensor, block_size: int):
    """(exp_avg, exp_avg_sq) of ``p`` in its dtype from its codes and scales (DTensors placed like
    a DTensor param, from each rank's shard)."""
    if not _dtensor.is_dtensor(p):
        m, v = ref.dequantize_adamw8bit_state(mc, rc, ms, rs, block_size)
        return m.to(p.dtype), v.to(p.dtype)
    from torch.distributed.tensor import DTensor

    local = p._local_tensor
    nb = ref.num_blocks(local.numel(), block_size)
    m, v = ref.dequantize_adamw8bit_state(_local_like(p, mc, "exp_avg"), _local_like(p, rc, "exp_avg_sq"),
                                          ms.to_local()[:nb], rs.to_local()[:nb], block_size)
    return tuple(DTensor.from_local(t.to(p.dtype), p.device_mesh, tuple(p.placements), run_check=False,
                                    shape=p.shape, stride=p.stride()) for t in (m, v))
