"""Triton kernel of the 8-bit AdamW op (``bigkernels::adamw8bit_triton_``), registered with
``torch.library.triton_op``; schema as ``bigkernels::adamw8bit_`` in ``bigkernels.ops.optim`` but for
``masks`` (a required list, empty for none: see bigkernels.triton.optim).

Each program updates a ``[ROWS, BLOCK]`` tile: ROWS consecutive quantisation blocks of one
tensor, ``BLOCK = block_size`` elements each (contiguous along the row, so every thread's loads are
16-byte vectors of params/grads and 4-byte words of codes). Per row it decodes both moments,
updates them and the params, reduces the new block maxima (NaN propagates), and encodes the codes
against them: one read and one write of every byte of state. Codes and scales are bit for bit
those of ``bigkernels.reference.optim.adamw8bit_``: every state operation is one IEEE-rounded fp32
operation (``div_rn`` / ``sqrt_rn``, and on the GPU ``add_rn`` so the compiler cannot contract a
product and a sum into an FMA), in the reference's order.

Launches as the other Triton optimizer ops (whose jit helpers and host helpers this module uses):
eagerly ONE launch over every tensor through a cached device table of addresses (rows: params,
grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps, masks), then a
step-increment launch; traced (torch.compile, fake tensors) one launch per tensor.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from bigkernels.reference import optim as ref
from bigkernels.triton._common import _INTERPRET, launcher
from bigkernels.triton.optim import (_contiguous_rows, _grad_multiplier, _increment_steps_kernel,
                                     _increment_steps_traced, _is_eager, _is_finite_step, _locate,
                                     _log_beta, _mask_row, _prologue, _row_ptr, _split, STEP_BLOCK)

if not _INTERPRET:
    from triton.language.extra import libdevice

# Elements per program: ROWS = TILE // block_size blocks (at least one). Small under the interpreter.
TILE = 128 if _INTERPRET else 2048
NUM_WARPS = 4
MIN_BLOCK, MAX_BLOCK = 64, 4096
_RN_ADD: tl.constexpr = tl.constexpr(not _INTERPRET)  # numpy's fp32 adds never contract; the GPU's might


def _code_constants(mant: int, binades: int):
    """(shift, fp32 bits of the smallest magnitude, rounding offset, largest q) of a magnitude code
    (see bigkernels.reference.optim), as constexprs (plain ints: the interpreter cannot shift by a
    constexpr)."""
    shift, base = 23 - mant, (127 - binades) << 23
    return tuple(tl.constexpr(v) for v in (shift, base, (1 << (shift - 1)) - base, binades << mant))


_M_SHIFT, _M_BASE, _M_OFFSET, _M_MAXQ = _code_constants(ref.EXP_AVG_MANT, ref.EXP_AVG_BINADES)
_R_SHIFT, _R_BASE, _R_OFFSET, _R_MAXQ = _code_constants(ref.SQRT_MANT, ref.SQRT_BINADES)
_M_ZERO_BELOW: tl.constexpr = tl.constexpr((127 - ref.EXP_AVG_BINADES - 1) << 23)  # bits of half the smallest


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _add(a, b):
    """a + b rounded once (never fused with the product feeding it)."""
    if _RN_ADD:
        return libdevice.add_rn(a, b)
    else:
        return a + b


@triton.jit
def _decode_magnitude(code, SHIFT: tl.constexpr, BASE: tl.constexpr):
    """fp32 values of int32 magnitude codes (0 -> 0.0); see bigkernels.reference.optim."""
    bits = ((code - 1) << SHIFT) + BASE
    return tl.where(code > 0, bits.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _encode_magnitude(a, SHIFT: tl.constexpr, OFFSET: tl.constexpr, MAXQ: tl.constexpr):
    """int32 magnitude codes of non-negative fp32 bit patterns ``a`` (nearest, ties up, saturating)."""
    q = (a + OFFSET) >> SHIFT
    return tl.minimum(tl.maximum(q, 0), MAXQ) + 1


@triton.jit
def _row_max(x):
    """Maximum of each row of non-negative ``x``, NaN where the row has a NaN (as torch.amax)."""
    has_nan = tl.max((x != x).to(tl.int32), 1) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, 1))


@triton.jit
def _inverse(scale):
    """1 / scale (IEEE), or 0 where scale is 0."""
    return tl.where(scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), 0.0)


@triton.jit
def _ld(ptr, offs, mask, FULL: tl.constexpr):
    """Load (masked, 0 outside, unless the tile is known full: unmasked loads vectorise)."""
    if FULL:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=mask, other=0)


@triton.jit
def _st(ptr, offs, value, mask, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, value)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _tile(p, g, mc, rc, ms, rs, keep, start, n, mult, step_size, bias_correction2_sqrt,
          beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
          SCALE_GRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MASK: tl.constexpr,
          BLOCK: tl.constexpr, ROWS: tl.constexpr, FULL: tl.constexpr):
    """The [ROWS, BLOCK] tile of blocks from element ``start`` (a block boundary)."""
    blk = start // BLOCK + tl.arange(0, ROWS)
    row_ok = blk * BLOCK < n
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    gf = _ld(g, offs, mask, FULL).to(tl.float32)
    if SCALE_GRAD:
        gf = gf * mult
    if MAXIMIZE:
        gf = -gf
    # dequantise
    m_code = _ld(mc, offs, mask, FULL).to(tl.int32)
    m_mag = _decode_magnitude(m_code & 127, _M_SHIFT, _M_BASE)
    mf = tl.where(m_code >= 128, -m_mag, m_mag) * _ld(ms, blk, row_ok, FULL)[:, None]
    rf = _decode_magnitude(_ld(rc, offs, mask, FULL).to(tl.int32), _R_SHIFT, _R_BASE)
    rf = rf * _ld(rs, blk, row_ok, FULL)[:, None]
    # update (the state path rounded as the reference)
    mf = _add(mf * beta1, gf * one_minus_beta1)
    rf = tl.sqrt_rn(_add((rf * rf) * beta2, (gf * one_minus_beta2) * gf))
    pf = _ld(p, offs, mask, FULL).to(tl.float32)
    if HAS_WD:
        pf = pf * decay
    pf = pf - tl.div_rn(step_size * mf, tl.div_rn(rf, bias_correction2_sqrt) + eps)
    if HAS_MASK:  # pruned params (mask byte 0) stored as 0
        pf = tl.where(_ld(keep, offs, mask, FULL) != 0, pf, 0.0)
    _st(p, offs, pf.to(p.dtype.element_ty), mask, FULL)
    # requantise against the new block maxima
    m_scale = _row_max(tl.abs(mf))
    r_scale = _row_max(rf)
    x = (mf * _inverse(m_scale)[:, None]).to(tl.int32, bitcast=True)
    a = x & 0x7FFFFFFF
    m_code = _encode_magnitude(a, _M_SHIFT, _M_OFFSET, _M_MAXQ) | tl.where(x < 0, 128, 0)
    m_code = tl.where(a >= _M_ZERO_BELOW, m_code, 0)
    a = (rf * _inverse(r_scale)[:, None]).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    r_code = tl.where(a != 0, _encode_magnitude(a, _R_SHIFT, _R_OFFSET, _R_MAXQ), 0)
    _st(mc, offs, m_code.to(tl.uint8), mask, FULL)
    _st(rc, offs, r_code.to(tl.uint8), mask, FULL)
    _st(ms, blk, m_scale, row_ok, FULL)
    _st(rs, blk, r_scale, row_ok, FULL)


@triton.jit
def _adamw8bit_kernel(
    table, n_tensors,
    p_ptr, g_ptr, mc_ptr, rc_ptr, ms_ptr, rs_ptr, s_ptr, keep_ptr, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr,
    lr_hi, lr_lo, log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, max_grad_norm,
    USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MASK: tl.constexpr,
    NROWS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    # Table rows: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 exp_avg_scales, 5 exp_avg_sq_scales,
    # 6 steps, 7 masks.
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        tid, start, n = _locate(table, n_tensors, numel, NROWS, ROWS * BLOCK, USE_TABLE)
        p = _row_ptr(table, n_tensors, tid, 0, p_ptr, USE_TABLE, ALIGNED)
        g = _row_ptr(table, n_tensors, tid, 1, g_ptr, USE_TABLE, ALIGNED)
        mc = _row_ptr(table, n_tensors, tid, 2, mc_ptr, USE_TABLE, ALIGNED)
        rc = _row_ptr(table, n_tensors, tid, 3, rc_ptr, USE_TABLE, ALIGNED)
        ms = _row_ptr(table, n_tensors, tid, 4, ms_ptr, USE_TABLE, False)
        rs = _row_ptr(table, n_tensors, tid, 5, rs_ptr, USE_TABLE, False)
        s = _row_ptr(table, n_tensors, tid, 6, s_ptr, USE_TABLE, False)
        keep = _row_ptr(table, n_tensors, tid, 7, keep_ptr, USE_TABLE and HAS_MASK, ALIGNED)
        mult = 1.0
        if HAS_GRAD_SCALE or CLIP:
            mult = _grad_multiplier(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP)
        step = tl.load(s).to(tl.float64) + 1.0
        log_beta1 = tl.cast(log_beta1_hi, tl.float64) + tl.cast(log_beta1_lo, tl.float64)
        log_beta2 = tl.cast(log_beta2_hi, tl.float64) + tl.cast(log_beta2_lo, tl.float64)
        step_size = ((tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64))
                     / (1.0 - tl.exp(step * log_beta1))).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2)).to(tl.float32)
        args = (p, g, mc, rc, ms, rs, keep, start, n, mult, step_size, bias_correction2_sqrt,
                beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay)
        if start + ROWS * BLOCK <= n:
            _tile(*args, HAS_GRAD_SCALE or CLIP, MAXIMIZE, HAS_WD, HAS_MASK, BLOCK, ROWS, True)
        else:
            _tile(*args, HAS_GRAD_SCALE or CLIP, MAXIMIZE, HAS_WD, HAS_MASK, BLOCK, ROWS, False)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 32
_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales", "state_steps")
_MUTATED_ROWS = (0, 2, 3, 4, 5, 6)
_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales", "state_steps")


def clear_table_cache() -> None:
    _TABLE_CACHE.clear()


def rows_per_program(block_size: int) -> int:
    return max(1, TILE // block_size)


def _table(rows, device: torch.device, chunk: int):
    """(device int64 table, programs, every address 16-byte aligned): the addresses of every row,
    the params' numels and one ``(tensor << 32) | chunk`` entry per program; cached by addresses
    and numels."""
    ptrs = [t.data_ptr() for row in rows for t in row]
    numels = [t.numel() for t in rows[0]]
    key = (device, chunk, tuple(ptrs), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    numel_t = torch.tensor(numels, dtype=torch.int64)
    counts = (numel_t + (chunk - 1)) // chunk
    total = int(counts.sum())
    tids = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    chunk_ids = torch.arange(total, dtype=torch.int64) - (torch.cumsum(counts, 0) - counts)[tids]
    table = torch.cat([torch.tensor(ptrs, dtype=torch.int64), numel_t, (tids << 32) | chunk_ids])
    if device.type != "cpu":
        table = table.pin_memory().to(device, non_blocking=True)
    entry = _TABLE_CACHE[key] = (table, total, all(ptr % 16 == 0 for ptr in ptrs))
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _validate(op: str, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps,
              block_size: int) -> None:
    if not (MIN_BLOCK <= block_size <= MAX_BLOCK and block_size & (block_size - 1) == 0):
        raise ValueError(f"{op}: block_size must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, got {block_size}")
    ref.check_adamw8bit_lists(op, params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, block_size)
    n = len(params)
    for name, lst in (("grads", grads), ("state_steps", state_steps)):
        if len(lst) != n:
            raise ValueError(f"{op}: {name} must have one tensor per param ({n}), got {len(lst)}")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: params must be float32, float16 or bfloat16, got {dtype}")
    for i in range(n):
        for name, t in (("params", params[i]), ("grads", grads[i])):
            if t.dtype != dtype or t.device != device or t.shape != params[i].shape:
                raise ValueError(f"{op}: expected {name}[{i}] of dtype {dtype} and shape {tuple(params[i].shape)} "
                                 f"on {device}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
        s = state_steps[i]
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
            raise ValueError(f"{op}: state_steps[{i}] must be a one-element float32 tensor on {device}")
        for name, t in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i]),
                        ("exp_avg_scales", exp_avg_scales[i]), ("exp_avg_sq_scales", exp_avg_sq_scales[i])):
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be contiguous")


@triton_op("bigkernels::adamw8bit_triton_", mutates_args=_MUTATES)
def adamw8bit_triton_(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    exp_avg_scales: List[Tensor], exp_avg_sq_scales: List[Tensor], state_steps: List[Tensor], masks: List[Tensor],
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None,
    *, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, maximize: bool, block_size: int,
    max_grad_norm: float = 0.0,
) -> None:
    """AdamW step with 8-bit block-quantised moments (see bigkernels.reference.optim) with the Triton kernel."""
    op = "adamw8bit_triton_"
    _validate(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps, block_size)
    keep = _mask_row(op, params, masks)
    n = len(params)
    if n == 0:
        return
    device, grad_scale, found_inf, grad_norm, clip = _prologue(op, params, grad_scale, found_inf, grad_norm,
                                                               max_grad_norm)
    rows = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(exp_avg_scales),
            list(exp_avg_sq_scales), list(state_steps)] + ([keep] if keep is not None else [])
    lr_hi, lr_lo = _split(lr)
    lb1_hi, lb1_lo = _split(_log_beta(beta1))
    lb2_hi, lb2_lo = _split(_log_beta(beta2))
    hyper = (lr_hi, lr_lo, lb1_hi, lb1_lo, lb2_hi, lb2_lo, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
             1.0 - lr * weight_decay, max_grad_norm)
    rows_pp = rows_per_program(block_size)
    flags = dict(HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None, CLIP=clip,
                 MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0, HAS_MASK=keep is not None, NROWS=len(rows),
                 BLOCK=block_size, ROWS=rows_pp)
    chunk = rows_pp * block_size
    rows, write_back = _contiguous_rows(rows, _MUTATED_ROWS)
    fin = found_inf if found_inf is not None else rows[0][0]
    scale_args = (grad_scale if grad_scale is not None else rows[0][0], grad_norm if grad_norm is not None else rows[0][0])

    if _is_eager(params[0], grads[0], exp_avgs[0], state_steps[0]) and not write_back:
        table, total, aligned = _table(rows, device, chunk)
        refs = [row[0] for row in rows]  # typed pointers: the kernel casts addresses to their type
        if total > 0:
            launcher(_adamw8bit_kernel, traced=False)[(total,)](
                table, n, *refs[:7], refs[7] if keep is not None else refs[0], 0, fin, *scale_args, *hyper,
                USE_TABLE=True, ALIGNED=aligned,
                num_warps=NUM_WARPS, **flags)
        launcher(_increment_steps_kernel, traced=False)[(triton.cdiv(n, STEP_BLOCK),)](
            table, 6 * n, n, refs[6], fin, HAS_FOUND_INF=found_inf is not None, BLOCK=STEP_BLOCK,
            num_warps=NUM_WARPS)
        return

    # Traced (fake / functional tensors) or strided params/grads: one launch per tensor.
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    for i in range(n):
        numel = rows[0][i].numel()
        if numel == 0:
            continue
        launcher(_adamw8bit_kernel)[(triton.cdiv(numel, chunk),)](
            dummy, 1, *(row[i] for row in rows[:7]), keep[i] if keep is not None else dummy, numel,
            found_inf if found_inf is not None else dummy,
            grad_scale if grad_scale is not None else dummy, grad_norm if grad_norm is not None else dummy,
            *hyper, USE_TABLE=False, ALIGNED=False, num_warps=NUM_WARPS, **flags)
    for orig, tmp in write_back:
        orig.copy_(tmp)
    _increment_steps_traced(state_steps, found_inf)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile cases: compiled for sm_80 and sm_90 by tests/test_optim_8bit_triton.py
# (and by the project-wide AOT test through aot_cases())
# --------------------------------------------------------------------------------------------

_SIZES = {"*fp32": 4, "*fp16": 2, "*bf16": 2}


def _aot_case(param_type: str, block_size: int, masks: bool, grad_scale: bool):
    """(kernel, signature, constexprs, 16-byte vector loads expected) of an eager table launch with
    16-byte aligned tensors: every thread reads its share of the whole tile's params and grads in
    16-byte vectors on the full-tile path."""
    sig = {"table": "*i64", "n_tensors": "i32", "p_ptr": param_type, "g_ptr": param_type, "mc_ptr": "*u8",
           "rc_ptr": "*u8", "ms_ptr": "*fp32", "rs_ptr": "*fp32", "s_ptr": "*fp32", "keep_ptr": "*u8",
           "numel": "i32", "found_inf_ptr": "*fp32", "grad_scale_ptr": "*fp32", "grad_norm_ptr": "*fp32"}
    sig.update({k: "fp32" for k in ("lr_hi", "lr_lo", "log_beta1_hi", "log_beta1_lo", "log_beta2_hi",
                                    "log_beta2_lo", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
                                    "decay", "max_grad_norm")})
    rows = rows_per_program(block_size)
    constexprs = dict(USE_TABLE=True, ALIGNED=True, HAS_FOUND_INF=grad_scale, HAS_GRAD_SCALE=grad_scale, CLIP=False,
                      MAXIMIZE=False, HAS_WD=True, HAS_MASK=masks, NROWS=8 if masks else 7, BLOCK=block_size,
                      ROWS=rows)
    per_thread_bytes = rows * block_size // (32 * NUM_WARPS) * _SIZES[param_type]
    return _adamw8bit_kernel, sig, constexprs, 2 * max(1, per_thread_bytes // 16)


AOT_CASES = [
    _aot_case("*fp32", 256, masks=False, grad_scale=False),
    _aot_case("*bf16", 256, masks=False, grad_scale=True),
    _aot_case("*fp16", 256, masks=True, grad_scale=True),
    _aot_case("*fp32", 64, masks=False, grad_scale=False),
    _aot_case("*fp32", 4096, masks=True, grad_scale=False),
]


def aot_cases():
    """AOT_CASES as the project-wide AOT test's cases (bigkernels.triton._common.AOTCase, once that
    convention is in the tree), for each of its targets."""
    from bigkernels.triton._common import AOT_TARGETS, AOTCase

    cases = [AOTCase(kernel, constexprs, sig, num_warps=NUM_WARPS, arch=arch, group=f"adamw8bit/{sig['p_ptr'][1:]}",
                     vector_loads=vector_loads)
             for arch in AOT_TARGETS for kernel, sig, constexprs, vector_loads in AOT_CASES]
    # the per-tensor path (one launch per tensor, for tensors the host's alignment check rejects
    # from the table): vectorised by Triton's specialisation of aligned pointer arguments
    kernel, sig, constexprs, vector_loads = AOT_CASES[0]
    cases += [AOTCase(kernel, dict(constexprs, USE_TABLE=False, ALIGNED=False), sig, num_warps=NUM_WARPS, arch=arch,
                      group="adamw8bit/per-tensor", vector_loads=vector_loads, note="per-tensor path")
              for arch in AOT_TARGETS]
    return cases
