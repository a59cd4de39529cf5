"""Triton kernels of the fused optimizer ops, registered with ``torch.library.triton_op``.

Ops (``bigkernels`` namespace; schemas as their namesakes in ``bigkernels.ops.optim`` but for ``masks``):
``fused_adam_triton_``, ``fused_adamw_triton_``, ``fused_sgd_triton_``, ``sum_of_squares_triton``.
The maths is exactly ``bigkernels.reference.optim`` (fp32 inside, fp64 for the bias corrections
and the gradient multiplier, as the reference computes them in Python/double).

Two launch paths share each kernel body (``USE_TABLE`` constexpr):

* **table** (eager calls on real tensors -- ``nn.Parameter`` included --, the fast path): ONE
  launch over every tensor. A device
  int64 table holds, per tensor, the address of each operand (params, grads, states, step), its
  numel, and per program a packed ``(tensor index << 32) | chunk index`` entry; each program
  updates one CHUNK of one tensor, BLOCK elements at a time. The table depends only on the
  addresses and numels, so it is cached by them (an optimizer's tensors keep their addresses from
  step to step, so after the first step a call does no host->device copy).
  The step counters are read by the update kernel (as step + 1) and bumped afterwards by a
  second tiny launch, so no program reads a step another one already bumped. When every data
  tensor starts 16-byte aligned (checked when the table is built) the kernel is told so
  (``ALIGNED``: ``tl.multiple_of`` on the loaded addresses) and the whole BLOCKs of each chunk
  run unmasked, so their loads and stores are 16-byte vectors; the last partial block is masked.
  Unaligned tensors take the same kernel without the hint (scalar accesses).
* **per-tensor** (when the op is traced by torch.compile / export / fake tensors, where data
  pointers do not exist): the same kernel launched once per tensor with real pointer arguments,
  so Inductor sees ordinary user-defined Triton kernels; steps are bumped with
  ``torch._foreach_add_``.

Pruning masks (``masks``, one bool tensor per param, or an empty list for none) ride in one more
table row (as uint8 views): pruned params are stored as 0 in the same pass. That argument is the
one schema difference from the namesakes: their ``Tensor[]? masks=None`` cannot be written as a
triton_op signature (no optional tensor lists, no keyword-only tensors), so here it is a required
list right after the tensor lists; the dispatcher passes ``masks=[]`` for None.

``found_inf``, ``grad_scale`` and ``grad_norm`` are read inside the kernels from device tensors:
no call synchronises with the host. A non-zero ``found_inf`` leaves every tensor and step as is.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the interpreter dereferences the
table's integer addresses, so the table path is exercised there too.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from bigkernels.reference.optim import CLIP_EPS, check_masks
from bigkernels.triton._common import _INTERPRET, is_real_tensor, launcher

# Elements per program (CHUNK) and per loop iteration (BLOCK). Read at call time, so tests may
# change them. Small under the interpreter so tiny test tensors still span several chunks/blocks.
if _INTERPRET:
    BLOCK = 32
    CHUNK = 64
else:
    BLOCK = 1024
    CHUNK = 8192
NUM_WARPS = 4
_CLIP_EPS = tl.constexpr(CLIP_EPS)  # torch.nn.utils.clip_grad_norm_'s epsilon, as the reference
STEP_BLOCK = 128  # step counters per program of the step-increment kernel
SUM_BLOCK = 1024  # partials per iteration of the final sum_of_squares reduction


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _locate(table, n_tensors, numel, NROWS: tl.constexpr, CHUNK: tl.constexpr, USE_TABLE: tl.constexpr):
    """(tensor index, first element, numel) of this program's chunk: from the table, or (without
    one: the per-tensor traced path) chunk ``program_id`` of the single tensor of ``numel``."""
    if USE_TABLE:
        entry = tl.load(table + (NROWS + 1) * n_tensors + tl.program_id(0))
        tid = entry >> 32
        chunk = entry & 0xFFFFFFFF
        return tid, chunk * CHUNK, tl.load(table + NROWS * n_tensors + tid)
    else:
        return 0, tl.program_id(0).to(tl.int64) * CHUNK, numel


@triton.jit
def _row_ptr(table, n_tensors, tid, ROW: tl.constexpr, ref_ptr, USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address of tensor ``tid`` in table row ``ROW`` typed like ``ref_ptr`` (16-byte aligned, as
    the host checked, with ALIGNED: the loads of full blocks then vectorise); ``ref_ptr`` itself
    without a table (Triton specialises pointer arguments on their alignment)."""
    if USE_TABLE:
        ptr = tl.load(table + ROW * n_tensors + tid).to(ref_ptr.dtype)
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr
    else:
        return ref_ptr


@triton.jit
def _full_end(start, end, BLOCK: tl.constexpr):
    """End of the whole BLOCKs of [start, end): they run without a mask (vectorised loads and
    stores); the remainder runs as one masked block."""
    return start + (end - start) // BLOCK * BLOCK


@triton.jit
def _ld(ptr, offs, mask, FULL: tl.constexpr):
    """fp32 of ``ptr[offs]`` (masked, 0 outside, unless FULL)."""
    if FULL:
        return tl.load(ptr + offs).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _st(ptr, offs, val, mask, FULL: tl.constexpr):
    """``ptr[offs] = val`` in ptr's dtype (masked unless FULL)."""
    if FULL:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _is_finite_step(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """1 when the step must run (no found_inf, or found_inf == 0), else 0 (as an int32 scalar)."""
    if HAS_FOUND_INF:
        ok = (tl.load(found_inf_ptr) == 0).to(tl.int32)
    else:
        ok = tl.full((), 1, tl.int32)
    return ok


@triton.jit
def _grad_multiplier(grad_scale_ptr, grad_norm_ptr, max_grad_norm,
                     HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr):
    """fp32(1/grad_scale * min(1, max_norm / (grad_norm/grad_scale + eps))), computed in fp64."""
    mult = tl.full((), 1.0, tl.float64)
    if HAS_GRAD_SCALE:
        mult = 1.0 / tl.load(grad_scale_ptr).to(tl.float64)
    if CLIP:
        norm = tl.load(grad_norm_ptr).to(tl.float64) * mult
        clip = tl.cast(max_grad_norm, tl.float64) / (norm + _CLIP_EPS)
        clip = tl.where(clip > 1.0, 1.0, clip)  # keeps NaN, as torch.clamp does
        mult = mult * clip
    return mult.to(tl.float32)


@triton.jit
def _keep(pf, keep, offs, mask, HAS_MASK: tl.constexpr, FULL: tl.constexpr):
    """The updated params with pruned elements (mask byte 0) set to 0."""
    if HAS_MASK:
        if FULL:
            k = tl.load(keep + offs)
        else:
            k = tl.load(keep + offs, mask=mask, other=1)
        pf = tl.where(k != 0, pf, 0.0)
    return pf


@triton.jit
def _grad_and_param(g, p, offs, mask, mult, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr,
                    MAXIMIZE: tl.constexpr, FULL: tl.constexpr):
    """(fp32 gradient, unscaled / clipped / negated as asked, fp32 param) of one block."""
    gf = _ld(g, offs, mask, FULL)
    if HAS_GRAD_SCALE or CLIP:
        gf = gf * mult
    if MAXIMIZE:
        gf = -gf
    return gf, _ld(p, offs, mask, FULL)


@triton.jit
def _adam_block(p, g, m, v, vmax, keep, offs, mask, mult, step_size, bias_correction2_sqrt,
                beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay,
                HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, HAS_MASK: tl.constexpr, FULL: tl.constexpr):
    """One block of the Adam update (all masked unless FULL)."""
    gf, pf = _grad_and_param(g, p, offs, mask, mult, HAS_GRAD_SCALE, CLIP, MAXIMIZE, FULL)
    if HAS_WD:
        if DECOUPLED:
            pf = pf * decay
        else:
            gf = gf + weight_decay * pf
    mf = _ld(m, offs, mask, FULL)
    vf = _ld(v, offs, mask, FULL)
    mf = mf * beta1 + one_minus_beta1 * gf
    vf = vf * beta2 + one_minus_beta2 * gf * gf
    if AMSGRAD:
        vmf = _ld(vmax, offs, mask, FULL)
        vmf = tl.maximum(vmf, vf, propagate_nan=tl.PropagateNan.ALL)
        _st(vmax, offs, vmf, mask, FULL)
        denom = tl.div_rn(tl.sqrt_rn(vmf), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(vf), bias_correction2_sqrt) + eps
    pf = _keep(pf - tl.div_rn(step_size * mf, denom), keep, offs, mask, HAS_MASK, FULL)
    _st(p, offs, pf, mask, FULL)
    _st(m, offs, mf, mask, FULL)
    _st(v, offs, vf, mask, FULL)


@triton.jit
def _adam_kernel(
    table, n_tensors,
    p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, vmax_ptr, keep_ptr, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr,
    lr_hi, lr_lo, log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, max_grad_norm,
    USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    CLIP: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_MASK: tl.constexpr, NROWS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Table rows: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 steps, 5 max_exp_avg_sqs, 6 masks.
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        tid, start, n = _locate(table, n_tensors, numel, NROWS, CHUNK, USE_TABLE)
        p = _row_ptr(table, n_tensors, tid, 0, p_ptr, USE_TABLE, ALIGNED)
        g = _row_ptr(table, n_tensors, tid, 1, g_ptr, USE_TABLE, ALIGNED)
        m = _row_ptr(table, n_tensors, tid, 2, m_ptr, USE_TABLE, ALIGNED)
        v = _row_ptr(table, n_tensors, tid, 3, v_ptr, USE_TABLE, ALIGNED)
        s = _row_ptr(table, n_tensors, tid, 4, s_ptr, USE_TABLE, False)
        vmax = _row_ptr(table, n_tensors, tid, 5, vmax_ptr, USE_TABLE, ALIGNED)
        keep = _row_ptr(table, n_tensors, tid, 6, keep_ptr, USE_TABLE and HAS_MASK, ALIGNED)
        mult = tl.full((), 1.0, tl.float32)
        if HAS_GRAD_SCALE or CLIP:
            mult = _grad_multiplier(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP)
        # Bias corrections in fp64 from the step read before the step kernel bumps it.
        step = tl.load(s).to(tl.float64) + 1.0
        log_beta1 = tl.cast(log_beta1_hi, tl.float64) + tl.cast(log_beta1_lo, tl.float64)
        log_beta2 = tl.cast(log_beta2_hi, tl.float64) + tl.cast(log_beta2_lo, tl.float64)
        bias_correction1 = 1.0 - tl.exp(step * log_beta1)
        bc2 = tl.sqrt(1.0 - tl.exp(step * log_beta2)).to(tl.float32)
        step_size = ((tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)) / bias_correction1).to(tl.float32)
        end = tl.minimum(start + CHUNK, n)
        full_end = _full_end(start, end, BLOCK)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _adam_block(p, g, m, v, vmax, keep, offs, offs < end, mult, step_size, bc2, beta1, one_minus_beta1,
                        beta2, one_minus_beta2, eps, weight_decay, decay, HAS_GRAD_SCALE, CLIP, AMSGRAD, MAXIMIZE,
                        DECOUPLED, HAS_WD, HAS_MASK, True)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _adam_block(p, g, m, v, vmax, keep, offs, offs < end, mult, step_size, bc2, beta1, one_minus_beta1,
                        beta2, one_minus_beta2, eps, weight_decay, decay, HAS_GRAD_SCALE, CLIP, AMSGRAD, MAXIMIZE,
                        DECOUPLED, HAS_WD, HAS_MASK, False)


@triton.jit
def _sgd_block(p, g, buf, keep, offs, mask, mult, lr, momentum, one_minus_dampening, weight_decay,
               HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
               HAS_MASK: tl.constexpr, FULL: tl.constexpr):
    """One block of the SGD update (all masked unless FULL)."""
    gf, pf = _grad_and_param(g, p, offs, mask, mult, HAS_GRAD_SCALE, CLIP, MAXIMIZE, FULL)
    if HAS_WD:
        gf = gf + weight_decay * pf
    if HAS_MOMENTUM:
        if FIRST_STEP:
            bf = gf
        else:
            bf = _ld(buf, offs, mask, FULL)
            bf = bf * momentum + one_minus_dampening * gf
        _st(buf, offs, bf, mask, FULL)
        if NESTEROV:
            gf = gf + momentum * bf
        else:
            gf = bf
    pf = _keep(pf - lr * gf, keep, offs, mask, HAS_MASK, FULL)
    _st(p, offs, pf, mask, FULL)


@triton.jit
def _sgd_kernel(
    table, n_tensors,
    p_ptr, g_ptr, buf_ptr, keep_ptr, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr,
    lr, momentum, one_minus_dampening, weight_decay, max_grad_norm,
    USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, HAS_MASK: tl.constexpr, NROWS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    # Table rows: 0 params, 1 grads, 2 momentum_buffers, 3 masks.
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        tid, start, n = _locate(table, n_tensors, numel, NROWS, CHUNK, USE_TABLE)
        p = _row_ptr(table, n_tensors, tid, 0, p_ptr, USE_TABLE, ALIGNED)
        g = _row_ptr(table, n_tensors, tid, 1, g_ptr, USE_TABLE, ALIGNED)
        buf = _row_ptr(table, n_tensors, tid, 2, buf_ptr, USE_TABLE, ALIGNED)
        keep = _row_ptr(table, n_tensors, tid, 3, keep_ptr, USE_TABLE and HAS_MASK, ALIGNED)
        mult = tl.full((), 1.0, tl.float32)
        if HAS_GRAD_SCALE or CLIP:
            mult = _grad_multiplier(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP)
        end = tl.minimum(start + CHUNK, n)
        full_end = _full_end(start, end, BLOCK)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _sgd_block(p, g, buf, keep, offs, offs < end, mult, lr, momentum, one_minus_dampening, weight_decay,
                       HAS_GRAD_SCALE, CLIP, MAXIMIZE, HAS_WD, HAS_MOMENTUM, FIRST_STEP, NESTEROV, HAS_MASK, True)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _sgd_block(p, g, buf, keep, offs, offs < end, mult, lr, momentum, one_minus_dampening, weight_decay,
                       HAS_GRAD_SCALE, CLIP, MAXIMIZE, HAS_WD, HAS_MOMENTUM, FIRST_STEP, NESTEROV, HAS_MASK, False)


@triton.jit
def _increment_steps_kernel(table, row_offset, n_tensors, s_ptr, found_inf_ptr,
                            HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """state_steps[i] += 1 for every i, unless found_inf is non-zero."""
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_tensors
        addrs = tl.load(table + row_offset + offs, mask=mask, other=0)
        ptrs = addrs.to(s_ptr.dtype)
        steps = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, steps + 1.0, mask=mask)


@triton.jit
def _sum_of_squares_kernel(
    table, n_tensors, x_ptr, numel, partials, out_offset,
    USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """partials[out_offset + program] = fp32 sum of squares of this program's chunk."""
    tid, start, n = _locate(table, n_tensors, numel, 1, CHUNK, USE_TABLE)
    x = _row_ptr(table, n_tensors, tid, 0, x_ptr, USE_TABLE, ALIGNED)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    end = tl.minimum(start + CHUNK, n)
    full_end = _full_end(start, end, BLOCK)
    for off in range(start, full_end, BLOCK):
        xf = _ld(x, off + tl.arange(0, BLOCK), None, True)
        acc += xf * xf
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        xf = _ld(x, offs, offs < end, False)
        acc += xf * xf
    tl.store(partials + out_offset + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _sum_partials_kernel(partials, n, out, BLOCK: tl.constexpr):
    """out = sum(partials) in a fixed order (one program, fp64 accumulation), stored as fp32."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for off in range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(out, tl.sum(acc, axis=0).to(tl.float32))


# --------------------------------------------------------------------------------------------
# Host side: validation, the cached address table, launches
# --------------------------------------------------------------------------------------------

_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 32


def clear_table_cache() -> None:
    """Forget every cached address table (they are also evicted least-recently-used first)."""
    _TABLE_CACHE.clear()


def _f32(x: float) -> float:
    return float(np.float32(x))


def _split(x: float):
    """x as an fp32 pair (hi, lo) with hi + lo == x to ~1e-15: passes a double into a kernel."""
    hi = _f32(x)
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, _f32(x - hi)


def _log_beta(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _is_eager(*tensors: Tensor) -> bool:
    """Real tensors (``nn.Parameter`` included) outside any tracing: the table path can read their
    addresses. Fake / functional tensors (tracing) take the per-tensor path."""
    return all(is_real_tensor(t) for t in tensors)


def _scalar_tensor(t: Optional[Tensor], name: str, op: str, device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must hold exactly one element, got shape {tuple(t.shape)}")
    if t.device != device:
        t = t.to(device, non_blocking=True)
    return t


def _prologue(op: str, params, grad_scale, found_inf, grad_norm, max_grad_norm):
    """The step's device and its GradScaler / clipping scalars on it (clipping only when both a norm and
    ``max_grad_norm > 0`` are given)."""
    device = params[0].device
    grad_scale = _scalar_tensor(grad_scale, "grad_scale", op, device)
    found_inf = _scalar_tensor(found_inf, "found_inf", op, device)
    clip = grad_norm is not None and max_grad_norm > 0
    grad_norm = _scalar_tensor(grad_norm, "grad_norm", op, device) if clip else None
    return device, grad_scale, found_inf, grad_norm, clip


def _check_lengths(op: str, n: int, **lists) -> None:
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{op}: {name} must have one tensor per param ({n}), got {len(lst)}")


def _validate_rows(op: str, rows: Sequence[Sequence[Tensor]], names: Sequence[str], device: torch.device,
                   step_rows: Sequence[int] = ()) -> bool:
    """Checks device, dtype and numel of every tensor; returns whether all are contiguous."""
    numels = [t.numel() for t in rows[0]]
    contiguous = True
    for r, (row, name) in enumerate(zip(rows, names)):
        dtype = row[0].dtype
        if name == "masks":  # uint8 views of bool masks (checked by _mask_row)
            pass
        elif not dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be floating point, got {dtype}")
        for i, t in enumerate(row):
            if t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device}, expected {device} (the params' device)")
            if t.dtype != dtype:
                raise ValueError(f"{op}: every tensor of {name} must have dtype {dtype}; {name}[{i}] is {t.dtype}")
            if r in step_rows:
                if t.numel() != 1:
                    raise ValueError(f"{op}: {name}[{i}] must be a one-element step counter, got shape {tuple(t.shape)}")
            elif t.numel() != numels[i]:
                raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements, expected {numels[i]} "
                                 f"(as {names[0]}[{i}])")
            if not t.is_contiguous():
                contiguous = False
    return contiguous


def _table(rows: Sequence[Sequence[Tensor]], device: torch.device, chunk: int, op: str,
           names: Sequence[str], step_rows: Sequence[int] = (), cache: bool = True):
    """(device int64 table, number of programs, aligned), cached by the tensors' addresses and
    numels; ``aligned``: every tensor of the data rows (all but ``step_rows``) starts at a 16-byte
    aligned address, so the kernels may tell the compiler so (vectorised loads of whole blocks).

    Returns None when some tensor is not contiguous (the caller then works on contiguous copies).
    Validation runs when the table is built; a later call with the same addresses, numels and
    dtypes is the same set of tensors, so it is not repeated.
    """
    ptrs = [t.data_ptr() for row in rows for t in row]
    numels = [t.numel() for t in rows[0]]
    key = (device, chunk, tuple(row[0].dtype for row in rows), tuple(ptrs), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    if not _validate_rows(op, rows, names, device, step_rows):
        return None
    n = len(numels)
    aligned = all(t.data_ptr() % 16 == 0 for r, row in enumerate(rows) if r not in step_rows for t in row)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    counts = (numel_t + (chunk - 1)) // chunk
    total = int(counts.sum())
    tids = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    chunk_ids = torch.arange(total, dtype=torch.int64) - first[tids]
    programs = (tids << 32) | chunk_ids
    table = torch.cat([torch.tensor(ptrs, dtype=torch.int64), numel_t, programs])
    if device.type != "cpu":
        table = table.pin_memory().to(device, non_blocking=True)
    entry = (table, total, aligned)
    if not cache:  # tables of contiguous stand-ins point at temporaries: never reuse them
        return entry
    _TABLE_CACHE[key] = entry
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _contiguous_rows(rows, mutated_rows):
    """Contiguous stand-ins for each row, and the (original, stand-in) pairs to copy back."""
    new_rows, write_back, standins = [], [], {}
    for r, row in enumerate(rows):
        new_row = []
        for t in row:
            if t.is_contiguous():
                new_row.append(t)
                continue
            # A tensor repeated in two rows (a placeholder row) shares one stand-in and one write-back.
            c = standins.get(id(t))
            if c is None:
                c = standins[id(t)] = t.contiguous()
                write_back.append([t, c, False])
            new_row.append(c)
            if r in mutated_rows:
                next(w for w in write_back if w[1] is c)[2] = True
        new_rows.append(new_row)
    return new_rows, [(t, c) for t, c, mutated in write_back if mutated]


def _mask_row(op: str, params, masks: Sequence[Tensor]) -> Optional[List[Tensor]]:
    """The masks as contiguous uint8 views (a table row), after checking them; None without masks
    (an empty list: triton_op cannot express the main schema's ``Tensor[]? masks=None``)."""
    if len(masks) == 0 and len(params) > 0:
        return None
    check_masks(op, params, masks)
    return [m.contiguous().view(torch.uint8) for m in masks]


def _grid_1d(numel: int, chunk: int):
    return (triton.cdiv(numel, chunk),)


# ---------------------------------- Adam / AdamW ----------------------------------------------

# Row names; the last ("masks") is only present when masks are given (zip stops at the rows).
_ADAM_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "max_exp_avg_sqs", "masks")
_ADAM_MUTATED_ROWS = (0, 2, 3, 4, 5)


def _adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
               weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, grad_norm, max_grad_norm,
               masks, decoupled: bool) -> None:
    op = "fused_adamw_triton_" if decoupled else "fused_adam_triton_"
    n = len(params)
    _check_lengths(op, n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps)
    if amsgrad:
        _check_lengths(op, n, max_exp_avg_sqs=max_exp_avg_sqs)
    keep = _mask_row(op, params, masks)
    if n == 0:
        return
    device, grad_scale, found_inf, grad_norm, clip = _prologue(op, params, grad_scale, found_inf, grad_norm,
                                                               max_grad_norm)
    # Rows; without amsgrad the max_exp_avg_sqs row repeats exp_avg_sqs (never touched).
    rows = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps),
            list(max_exp_avg_sqs) if amsgrad else list(exp_avg_sqs)] + ([keep] if keep is not None else [])
    lr_hi, lr_lo = _split(lr)
    lb1_hi, lb1_lo = _split(_log_beta(beta1))
    lb2_hi, lb2_lo = _split(_log_beta(beta2))
    hyper = (lr_hi, lr_lo, lb1_hi, lb1_lo, lb2_hi, lb2_lo, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
             weight_decay, 1.0 - lr * weight_decay, max_grad_norm)
    flags = dict(HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None, CLIP=clip,
                 AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled),
                 HAS_WD=weight_decay != 0, HAS_MASK=keep is not None, NROWS=len(rows))
    chunk, block = CHUNK, BLOCK

    if _is_eager(params[0], grads[0], exp_avgs[0], state_steps[0]):
        entry = _table(rows, device, chunk, op, _ADAM_NAMES, step_rows=(4,))
        if entry is None:  # some tensor is not contiguous: run on contiguous copies, copy back
            rows, write_back = _contiguous_rows(rows, _ADAM_MUTATED_ROWS)
            entry = _table(rows, device, chunk, op, _ADAM_NAMES, step_rows=(4,), cache=False)
        else:
            write_back = []
        table, total, aligned = entry
        refs = [row[0] for row in rows]  # typed pointers: the kernel casts addresses to their type
        dummy = refs[0]
        if total > 0:
            launcher(_adam_kernel, traced=False)[(total,)](
                table, n, *refs[:6], refs[6] if keep is not None else dummy, 0,
                found_inf if found_inf is not None else dummy,
                grad_scale if grad_scale is not None else dummy,
                grad_norm if grad_norm is not None else dummy,
                *hyper, USE_TABLE=True, ALIGNED=aligned, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS, **flags)
        launcher(_increment_steps_kernel, traced=False)[(triton.cdiv(n, STEP_BLOCK),)](
            table, 4 * n, n, refs[4], found_inf if found_inf is not None else dummy,
            HAS_FOUND_INF=found_inf is not None, BLOCK=STEP_BLOCK, num_warps=NUM_WARPS)
        for orig, tmp in write_back:
            orig.copy_(tmp)
        return

    # Traced (fake / functional tensors): one launch of the same kernel per tensor.
    _validate_rows(op, rows, _ADAM_NAMES, device, step_rows=(4,))
    rows, write_back = _contiguous_rows(rows, _ADAM_MUTATED_ROWS)
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    for i in range(n):
        p, g, m, v, s, vmax = (row[i] for row in rows[:6])
        if not amsgrad:
            vmax = dummy
        numel = p.numel()
        if numel == 0:
            continue
        launcher(_adam_kernel)[_grid_1d(numel, chunk)](
            dummy, 1, p, g, m, v, s, vmax, keep[i] if keep is not None else dummy, numel,
            found_inf if found_inf is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            grad_norm if grad_norm is not None else dummy,
            *hyper, USE_TABLE=False, ALIGNED=False, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS, **flags)
    for orig, tmp in write_back:
        orig.copy_(tmp)
    _increment_steps_traced(state_steps, found_inf)


def _increment_steps_traced(state_steps, found_inf) -> None:
    if found_inf is None:
        torch._foreach_add_(list(state_steps), 1.0)
    else:
        # A list of 0-d tensors (the single-tensor overload would decompose into .item()).
        inc = (found_inf.reshape(()) == 0).to(state_steps[0].dtype)
        torch._foreach_add_(list(state_steps), [inc] * len(state_steps))


_ADAM_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def _adam_triton_op(name: str, decoupled: bool, doc: str):
    """The Triton op ``bigkernels::<name>``: one Adam step, weight decay decoupled or not."""

    def op(
        params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
        max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], masks: List[Tensor],
        grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None,
        *, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
        max_grad_norm: float = 0.0,
    ) -> None:
        _adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                   beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
                   grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                   masks=masks, decoupled=decoupled)

    op.__name__, op.__doc__ = name, doc
    return triton_op(f"bigkernels::{name}", mutates_args=_ADAM_MUTATES)(op)


fused_adam_triton_ = _adam_triton_op(
    "fused_adam_triton_", False, "Adam step (L2 weight decay added to the gradient) with the Triton kernel.")
fused_adamw_triton_ = _adam_triton_op(
    "fused_adamw_triton_", True, "AdamW step (decoupled weight decay) with the Triton kernel.")


# ---------------------------------- SGD --------------------------------------------------------

_SGD_NAMES = ("params", "grads", "momentum_buffers", "masks")
_SGD_MUTATED_ROWS = (0, 2)
_SGD_MUTATES = ("params", "momentum_buffers")


@triton_op("bigkernels::fused_sgd_triton_", mutates_args=_SGD_MUTATES)
def fused_sgd_triton_(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], masks: List[Tensor],
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None,
    *, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
    is_first_step: bool, max_grad_norm: float = 0.0,
) -> None:
    """SGD step (momentum, dampening, nesterov, weight decay, maximize) with the Triton kernel."""
    op = "fused_sgd_triton_"
    n = len(params)
    _check_lengths(op, n, grads=grads)
    has_momentum = momentum != 0
    if has_momentum:
        _check_lengths(op, n, momentum_buffers=momentum_buffers)
    keep = _mask_row(op, params, masks)
    if n == 0:
        return
    device, grad_scale, found_inf, grad_norm, clip = _prologue(op, params, grad_scale, found_inf, grad_norm,
                                                               max_grad_norm)
    # Without momentum the buffer row repeats params (never touched).
    rows = [list(params), list(grads), list(momentum_buffers) if has_momentum else list(params)]
    rows += [keep] if keep is not None else []
    hyper = (lr, momentum, 1.0 - dampening, weight_decay, max_grad_norm)
    flags = dict(HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None, CLIP=clip,
                 MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum,
                 FIRST_STEP=bool(is_first_step), NESTEROV=bool(nesterov), HAS_MASK=keep is not None,
                 NROWS=len(rows))
    chunk, block = CHUNK, BLOCK

    if _is_eager(params[0], grads[0]):
        entry = _table(rows, device, chunk, op, _SGD_NAMES)
        write_back = []
        if entry is None:
            rows, write_back = _contiguous_rows(rows, _SGD_MUTATED_ROWS)
            entry = _table(rows, device, chunk, op, _SGD_NAMES, cache=False)
        table, total, aligned = entry
        dummy = rows[0][0]
        if total > 0:
            launcher(_sgd_kernel, traced=False)[(total,)](
                table, n, rows[0][0], rows[1][0], rows[2][0], rows[3][0] if keep is not None else dummy, 0,
                found_inf if found_inf is not None else dummy,
                grad_scale if grad_scale is not None else dummy,
                grad_norm if grad_norm is not None else dummy,
                *hyper, USE_TABLE=True, ALIGNED=aligned, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS, **flags)
        for orig, tmp in write_back:
            orig.copy_(tmp)
        return

    _validate_rows(op, rows, _SGD_NAMES, device)
    rows, write_back = _contiguous_rows(rows, _SGD_MUTATED_ROWS)
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    for i in range(n):
        p, g, buf = (row[i] for row in rows[:3])
        if not has_momentum:
            buf = dummy
        numel = p.numel()
        if numel == 0:
            continue
        launcher(_sgd_kernel)[_grid_1d(numel, chunk)](
            dummy, 1, p, g, buf, keep[i] if keep is not None else dummy, numel,
            found_inf if found_inf is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            grad_norm if grad_norm is not None else dummy,
            *hyper, USE_TABLE=False, ALIGNED=False, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS, **flags)
    for orig, tmp in write_back:
        orig.copy_(tmp)


# ---------------------------------- sum_of_squares --------------------------------------------


@triton_op("bigkernels::sum_of_squares_triton", mutates_args=())
def sum_of_squares_triton(tensors: List[Tensor]) -> Tensor:
    """Sum of squares of every element of ``tensors`` as a 0-d fp32 tensor (deterministic)."""
    op = "sum_of_squares_triton"
    if len(tensors) == 0:
        raise ValueError(f"{op}: tensors must not be empty")
    device = tensors[0].device
    chunk, block = CHUNK, BLOCK
    out = torch.empty((), device=device, dtype=torch.float32)
    # One launch per dtype (usually one), each writing its programs' partials into one buffer.
    groups: dict = {}
    copied = False
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{op}: every tensor must be on {device}, got one on {t.device}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{op}: tensors must be floating point, got {t.dtype}")
        if not t.is_contiguous():
            t, copied = t.contiguous(), True
        groups.setdefault(t.dtype, []).append(t)

    eager = _is_eager(tensors[0])
    if eager:
        plans = [(_table([group], device, chunk, op, ("tensors",), cache=not copied), group)
                 for group in groups.values()]
        total = sum(entry[1] for entry, _ in plans)
        partials = torch.empty(max(total, 1), device=device, dtype=torch.float32)
        offset = 0
        for (table, count, aligned), group in plans:
            if count > 0:
                launcher(_sum_of_squares_kernel, traced=False)[(count,)](
                    table, len(group), group[0], 0, partials, offset,
                    USE_TABLE=True, ALIGNED=aligned, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS)
            offset += count
    else:
        counts = [[triton.cdiv(t.numel(), chunk) for t in group] for group in groups.values()]
        total = sum(sum(c) for c in counts)
        partials = torch.empty(max(total, 1), device=device, dtype=torch.float32)
        offset = 0
        for group, group_counts in zip(groups.values(), counts):
            for t, count in zip(group, group_counts):
                if count > 0:
                    launcher(_sum_of_squares_kernel)[(count,)](
                        partials, 1, t, t.numel(), partials, offset,
                        USE_TABLE=False, ALIGNED=False, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS)
                offset += count
    launch = launcher(_sum_partials_kernel, traced=not eager)
    launch[(1,)](partials, total, out, BLOCK=SUM_BLOCK, num_warps=NUM_WARPS)
    return out


# ---------------------------------- ahead-of-time compile cases -------------------------------


def aot_cases():
    """The AOT compile cases of this module's kernels (convention: bigkernels/triton/_common.py).

    Memory-bound kernels: the hot loads of whole blocks must be vectorised (``vector_loads`` =
    one vector load per streamed tensor at least) on the table path when the host found every
    tensor 16-byte aligned (ALIGNED) and on the per-tensor path (Triton specialises aligned pointer
    arguments); the unaligned table path (scalar loads) must compile."""
    from bigkernels.triton._common import AOT_TARGETS, AOTCase

    f32 = "fp32"
    common = dict(table="*i64", found_inf_ptr="*fp32", grad_scale_ptr="*fp32", grad_norm_ptr="*fp32",
                  s_ptr="*fp32", keep_ptr="*u8", partials="*fp32", max_grad_norm=f32)
    adam_hyper = {k: f32 for k in ("lr_hi", "lr_lo", "log_beta1_hi", "log_beta1_lo", "log_beta2_hi", "log_beta2_lo",
                                   "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay",
                                   "decay")}
    sgd_hyper = {k: f32 for k in ("lr", "momentum", "one_minus_dampening", "weight_decay")}
    adamw = dict(HAS_FOUND_INF=True, HAS_GRAD_SCALE=True, CLIP=False, AMSGRAD=False, MAXIMIZE=False, DECOUPLED=True,
                 HAS_WD=True, HAS_MASK=False, NROWS=6)
    everything = dict(adamw, CLIP=True, AMSGRAD=True, MAXIMIZE=True, HAS_MASK=True, NROWS=7)
    sgd = dict(HAS_FOUND_INF=True, HAS_GRAD_SCALE=True, CLIP=True, MAXIMIZE=False, HAS_WD=True, HAS_MOMENTUM=True,
               FIRST_STEP=False, NESTEROV=True, HAS_MASK=True, NROWS=4)
    BLOCK_AOT = 1024
    launch = dict(CHUNK=8192, BLOCK=BLOCK_AOT)
    cases = []
    for arch in AOT_TARGETS:
        def add(kernel, dt, flags, path, tensors, numel="i32", group="", hyper=None):
            # per streamed tensor, a thread loads BLOCK / threads elements of a whole block: that
            # many bytes in 16-byte vectors (when aligned)
            size = 4 if dt == "fp32" else 2
            vector_loads = tensors * max(1, (BLOCK_AOT // (32 * NUM_WARPS)) * size // 16) if path != "table-unaligned" else 0
            use_table, aligned = {"table": (True, True), "table-unaligned": (True, False),
                                  "per-tensor": (False, False)}[path]
            sig = dict(common, **(hyper or {}), numel=numel)
            sig.update({n: f"*{dt}" for n in ("p_ptr", "g_ptr", "m_ptr", "v_ptr", "vmax_ptr", "buf_ptr", "x_ptr")
                        if n in kernel.arg_names})
            sig = {k: v for k, v in sig.items() if k in kernel.arg_names}
            flags = {k: v for k, v in flags.items() if k in kernel.arg_names}
            cases.append(AOTCase(kernel, dict(flags, USE_TABLE=use_table, ALIGNED=aligned, **launch), sig,
                                 num_warps=NUM_WARPS, num_stages=3, arch=arch, vector_loads=vector_loads,
                                 group=group or f"{kernel.__name__}/{dt}/{path}", note=path))

        for dt in ("fp32", "bf16", "fp16"):
            add(_adam_kernel, dt, adamw, "table", 4, hyper=adam_hyper)  # p, g, m, v
        add(_adam_kernel, "fp32", everything, "table", 5, hyper=adam_hyper)  # + max_exp_avg_sq
        add(_adam_kernel, "fp32", adamw, "table-unaligned", 0, hyper=adam_hyper)
        for dt in ("fp32", "bf16"):
            add(_adam_kernel, dt, adamw, "per-tensor", 4, hyper=adam_hyper)
        add(_adam_kernel, "bf16", adamw, "per-tensor", 4, numel="i64", hyper=adam_hyper)  # > 2^31 elements
        for dt in ("fp32", "bf16"):
            add(_sgd_kernel, dt, sgd, "table", 3, hyper=sgd_hyper)  # p, g, momentum buffer
        add(_sgd_kernel, "fp32", sgd, "per-tensor", 3, hyper=sgd_hyper)
        add(_sgd_kernel, "fp32", sgd, "table-unaligned", 0, hyper=sgd_hyper)
        for dt in ("fp32", "bf16"):
            add(_sum_of_squares_kernel, dt, {}, "table", 1)
        add(_sum_of_squares_kernel, "fp32", {}, "per-tensor", 1)
        cases.append(AOTCase(_increment_steps_kernel, dict(HAS_FOUND_INF=True, BLOCK=STEP_BLOCK),
                             dict(table="*i64", row_offset="i32", s_ptr="*fp32", found_inf_ptr="*fp32"),
                             num_warps=NUM_WARPS, arch=arch, group="_increment_steps_kernel"))
        cases.append(AOTCase(_sum_partials_kernel, dict(BLOCK=SUM_BLOCK), dict(partials="*fp32", out="*fp32"),
                             num_warps=NUM_WARPS, arch=arch, group="_sum_partials_kernel"))
    return cases
