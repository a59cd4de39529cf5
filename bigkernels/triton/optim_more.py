"""Triton kernels of ``fused_rmsprop_``, ``fused_lion_`` and ``fused_adafactor_``, registered with
``torch.library.triton_op`` as ``fused_rmsprop_triton_``, ``fused_lion_triton_`` and
``fused_adafactor_triton_`` (schemas as the main ops but for ``masks``, a required list, empty for
none: see ``bigkernels.triton.optim``). Maths exactly ``bigkernels.reference.optim``'s, in fp32.

RMSprop and Lion are elementwise and use ``bigkernels.triton.optim``'s launch scheme and device
helpers: eagerly, ONE launch over every tensor through its cached device table of addresses (one
program per CHUNK of one tensor; ``ALIGNED`` when the host found every tensor 16-byte aligned, so
the whole BLOCKs run unmasked with 16-byte vector loads and stores, and unaligned views still
work); traced (torch.compile, fake tensors), one launch per tensor with real pointers. Every launch
goes through ``_common.launcher`` (device guard, tracing wrapper).

Adafactor runs per param (its statistics are per-param reductions), with no host sync:
factored params (a batch of R x C matrices) in four launches — statistics (one program per
BLOCK_R rows: row sums of g^2 lerped into row_var, column partial sums, sum of p^2), column
factors (col_var, the mean of row_var per matrix), the sum of U^2 per program, and the update
(each program re-adds the partials in a fixed order: deterministic, no atomics); vectors in two
(statistics + U^2, update). The gradient is read three times (factored) or twice (vectors).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from bigkernels.reference.optim import check_adafactor_lists
from bigkernels.triton import optim as _tri  # CHUNK / BLOCK / NUM_WARPS are read from it at call time
from bigkernels.triton._common import launcher
from bigkernels.triton.optim import (
    _check_lengths,
    _contiguous_rows,
    _full_end,
    _grad_multiplier,
    _grid_1d,
    _increment_steps_kernel,
    _increment_steps_traced,
    _is_eager,
    _is_finite_step,
    _keep,
    _ld,
    _locate,
    _mask_row,
    _prologue,
    _row_ptr,
    _st,
    _table,
    _validate_rows,
)

# --------------------------------------------------------------------------------------------
# Shared device helpers (the block loads / stores, table addresses and masking are optim's)
# --------------------------------------------------------------------------------------------


@triton.jit
def _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr,
             MAXIMIZE: tl.constexpr):
    """The gradient multiplier (unscale x clip), negated for maximize, as an fp32 scalar."""
    mult = tl.full((), 1.0, tl.float32)
    if HAS_GRAD_SCALE or CLIP:
        mult = _grad_multiplier(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP)
    if MAXIMIZE:
        mult = -mult
    return mult


# --------------------------------------------------------------------------------------------
# RMSprop
# --------------------------------------------------------------------------------------------


@triton.jit
def _rmsprop_block(p, g, sq, ga, buf, keep, offs, mask, mult, lr, alpha, one_minus_alpha, eps, weight_decay,
                   momentum, HAS_WD: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   HAS_MASK: tl.constexpr, FULL: tl.constexpr):
    """One block of the RMSprop update (all masked unless FULL)."""
    gf = _ld(g, offs, mask, FULL) * mult
    pf = _ld(p, offs, mask, FULL)
    if HAS_WD:
        gf = gf + weight_decay * pf
    sqf = _ld(sq, offs, mask, FULL) * alpha + one_minus_alpha * gf * gf
    _st(sq, offs, sqf, mask, FULL)
    if CENTERED:
        gaf = _ld(ga, offs, mask, FULL)
        if one_minus_alpha < 0.5:  # torch.lerp's formula
            gaf = gaf + one_minus_alpha * (gf - gaf)
        else:
            gaf = gf - (gf - gaf) * alpha
        _st(ga, offs, gaf, mask, FULL)
        avg = tl.sqrt_rn(sqf - gaf * gaf) + eps
    else:
        avg = tl.sqrt_rn(sqf) + eps
    if HAS_MOMENTUM:
        bf = _ld(buf, offs, mask, FULL) * momentum + tl.div_rn(gf, avg)
        _st(buf, offs, bf, mask, FULL)
        pf = pf - lr * bf
    else:
        pf = pf - lr * tl.div_rn(gf, avg)
    _st(p, offs, _keep(pf, keep, offs, mask, HAS_MASK, FULL), mask, FULL)


@triton.jit
def _rmsprop_kernel(
    table, n_tensors,
    p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, keep_ptr, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, max_grad_norm,
    USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, CENTERED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, HAS_MASK: tl.constexpr, NROWS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Table rows: 0 params, 1 grads, 2 square_avgs, 3 grad_avgs, 4 momentum_buffers, 5 steps, 6 masks.
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        tid, start, n = _locate(table, n_tensors, numel, NROWS, CHUNK, USE_TABLE)
        p = _row_ptr(table, n_tensors, tid, 0, p_ptr, USE_TABLE, ALIGNED)
        g = _row_ptr(table, n_tensors, tid, 1, g_ptr, USE_TABLE, ALIGNED)
        sq = _row_ptr(table, n_tensors, tid, 2, sq_ptr, USE_TABLE, ALIGNED)
        ga = _row_ptr(table, n_tensors, tid, 3, ga_ptr, USE_TABLE, ALIGNED)
        buf = _row_ptr(table, n_tensors, tid, 4, buf_ptr, USE_TABLE, ALIGNED)
        keep = _row_ptr(table, n_tensors, tid, 6, keep_ptr, USE_TABLE and HAS_MASK, ALIGNED)
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, MAXIMIZE)
        end = tl.minimum(start + CHUNK, n)
        full_end = _full_end(start, end, BLOCK)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _rmsprop_block(p, g, sq, ga, buf, keep, offs, offs < end, mult, lr, alpha, one_minus_alpha, eps,
                           weight_decay, momentum, HAS_WD, CENTERED, HAS_MOMENTUM, HAS_MASK, True)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _rmsprop_block(p, g, sq, ga, buf, keep, offs, offs < end, mult, lr, alpha, one_minus_alpha, eps,
                           weight_decay, momentum, HAS_WD, CENTERED, HAS_MOMENTUM, HAS_MASK, False)


# --------------------------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------------------------


@triton.jit
def _lion_block(p, g, m, keep, offs, mask, mult, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
                HAS_MASK: tl.constexpr, FULL: tl.constexpr):
    """One block of the Lion update (all masked unless FULL)."""
    gf = _ld(g, offs, mask, FULL) * mult
    mf = _ld(m, offs, mask, FULL)
    c = mf * beta1 + one_minus_beta1 * gf
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c))  # 0 -> 0 (signed), NaN -> NaN
    pf = _ld(p, offs, mask, FULL) * decay - lr * sign
    _st(p, offs, _keep(pf, keep, offs, mask, HAS_MASK, FULL), mask, FULL)
    _st(m, offs, mf * beta2 + one_minus_beta2 * gf, mask, FULL)


@triton.jit
def _lion_kernel(
    table, n_tensors,
    p_ptr, g_ptr, m_ptr, keep_ptr, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, max_grad_norm,
    USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASK: tl.constexpr, NROWS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Table rows: 0 params, 1 grads, 2 exp_avgs, 3 masks.
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        tid, start, n = _locate(table, n_tensors, numel, NROWS, CHUNK, USE_TABLE)
        p = _row_ptr(table, n_tensors, tid, 0, p_ptr, USE_TABLE, ALIGNED)
        g = _row_ptr(table, n_tensors, tid, 1, g_ptr, USE_TABLE, ALIGNED)
        m = _row_ptr(table, n_tensors, tid, 2, m_ptr, USE_TABLE, ALIGNED)
        keep = _row_ptr(table, n_tensors, tid, 3, keep_ptr, USE_TABLE and HAS_MASK, ALIGNED)
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, MAXIMIZE)
        end = tl.minimum(start + CHUNK, n)
        full_end = _full_end(start, end, BLOCK)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _lion_block(p, g, m, keep, offs, offs < end, mult, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        decay, HAS_MASK, True)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _lion_block(p, g, m, keep, offs, offs < end, mult, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        decay, HAS_MASK, False)


# --------------------------------------------------------------------------------------------
# Adafactor (per param)
# --------------------------------------------------------------------------------------------


@triton.jit
def _lerp(start, end, w, one_minus_w):
    """torch.lerp's formula (the branch on w < 0.5 taken per element: w is only known on the device)."""
    return tl.where(w < 0.5, start + w * (end - start), end - (end - start) * one_minus_w)


@triton.jit
def _lerp_weight(s_ptr, beta2_decay):
    """(w, 1 - w) with w = 1 - beta2_t = t^beta2_decay, t = step + 1 (fp64, read from the device step)."""
    t = tl.load(s_ptr).to(tl.float64) + 1.0
    w = tl.exp(tl.log(t) * tl.cast(beta2_decay, tl.float64))
    return w.to(tl.float32), (1.0 - w).to(tl.float32)


@triton.jit
def _adafactor_stats_kernel(
    g_ptr, p_ptr, rv_ptr, s_ptr, rows_out, col_part, p_part, R, C, blocks_per_slice,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr, max_grad_norm, beta2_decay,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (matrix b, rows r0..r0+BLOCK_R): row_var = lerp(row_var, mean_c g^2, w) (also kept
    unrounded in rows_out), col_part[program, c] = sum over its rows of g^2, p_part[program] =
    sum of p^2."""
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        pid = tl.program_id(0)
        b = pid // blocks_per_slice
        rows = (pid % blocks_per_slice) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        base = (b.to(tl.int64) * R + rows.to(tl.int64)) * C  # element offset of each row
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, False)
        racc = tl.zeros((BLOCK_R,), tl.float32)
        pacc = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = rmask[:, None] & (cols < C)[None, :]
            offs = base[:, None] + cols[None, :]
            x = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32) * mult
            x2 = x * x
            racc += tl.sum(x2, axis=1)
            tl.store(col_part + pid.to(tl.int64) * C + cols, tl.sum(x2, axis=0), mask=cols < C)
            q = tl.load(p_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            pacc += tl.sum(q * q, axis=1)
        ridx = b.to(tl.int64) * R + rows
        w, one_minus_w = _lerp_weight(s_ptr, beta2_decay)
        rv = _lerp(tl.load(rv_ptr + ridx, mask=rmask, other=0.0).to(tl.float32), racc / C, w, one_minus_w)
        tl.store(rv_ptr + ridx, rv.to(rv_ptr.dtype.element_ty), mask=rmask)
        tl.store(rows_out + ridx, rv, mask=rmask)
        tl.store(p_part + pid, tl.sum(pacc, axis=0))


@triton.jit
def _adafactor_cols_kernel(
    cv_ptr, s_ptr, rows_out, col_part, col_scale, row_mean, R, C, blocks_per_slice, eps1,
    found_inf_ptr, beta2_decay,
    HAS_FOUND_INF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (matrix b, columns tile): col_var = lerp(col_var, column sums / R, w) and
    col_scale = 1/sqrt(col_var); the tile-0 program also writes max(mean of row_var, eps1)."""
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for k in range(0, blocks_per_slice):
            acc += tl.load(col_part + (b * blocks_per_slice + k) * C + cols, mask=cmask, other=0.0)
        cidx = b * C + cols
        w, one_minus_w = _lerp_weight(s_ptr, beta2_decay)
        cv = _lerp(tl.load(cv_ptr + cidx, mask=cmask, other=0.0).to(tl.float32), acc / R, w, one_minus_w)
        tl.store(cv_ptr + cidx, cv.to(cv_ptr.dtype.element_ty), mask=cmask)
        tl.store(col_scale + cidx, 1.0 / tl.sqrt_rn(tl.where(cmask, cv, 1.0)), mask=cmask)
        if tl.program_id(1) == 0:
            racc = tl.zeros((BLOCK_R,), tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                racc += tl.load(rows_out + b * R + rows, mask=rows < R, other=0.0)
            tl.store(row_mean + b, tl.maximum(tl.sum(racc, axis=0) / R, eps1))


@triton.jit
def _adafactor_u(g_ptr, offs, m2, row_scale, col_scale, mult, inv_eps1):
    """U = g mult min(row_scale col_scale, 1/eps1): torch's g / sqrt(max(V, eps1^2))."""
    x = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32) * mult
    return x * tl.minimum(row_scale[:, None] * col_scale[None, :], inv_eps1)


@triton.jit
def _adafactor_rows(rows_out, row_mean, b, pid, R, BLOCK_R: tl.constexpr):
    """(row indices, their mask, element offsets' row base, 1/sqrt(row_var / mean)) of a program."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    ridx = b * R + rows
    scale = 1.0 / tl.sqrt_rn(tl.load(rows_out + ridx, mask=rmask, other=1.0) / tl.load(row_mean + b))
    return rows, rmask, ridx, scale


@triton.jit
def _adafactor_usq_kernel(
    g_ptr, rows_out, row_mean, col_scale, u_part, R, C, blocks_per_slice,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr, max_grad_norm, inv_eps1,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """u_part[program] = sum over its rows of U^2."""
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        pid = tl.program_id(0)
        b = (pid // blocks_per_slice).to(tl.int64)
        rows, rmask, ridx, rscale = _adafactor_rows(rows_out, row_mean, b, pid % blocks_per_slice, R, BLOCK_R)
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, False)
        acc = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            m2 = rmask[:, None] & cmask[None, :]
            cscale = tl.load(col_scale + b * C + cols, mask=cmask, other=0.0)
            u = _adafactor_u(g_ptr, ridx[:, None] * C + cols[None, :], m2, rscale, cscale, mult, inv_eps1)
            acc += tl.sum(tl.where(m2, u * u, 0.0), axis=1)
        tl.store(u_part + pid, tl.sum(acc, axis=0))


@triton.jit
def _adafactor_step_size(s_ptr, p_part, u_part, n_parts, numel, lr, eps2, d, SUM_BLOCK: tl.constexpr):
    """alpha / max(1, RMS(U) / d) with alpha = max(eps2, RMS(p)) min(lr, t^-1/2), in fp64, from the
    per-program partials (added in the same order by every program)."""
    pacc = tl.zeros((SUM_BLOCK,), tl.float64)
    uacc = tl.zeros((SUM_BLOCK,), tl.float64)
    for k0 in range(0, n_parts, SUM_BLOCK):
        k = k0 + tl.arange(0, SUM_BLOCK)
        pacc += tl.load(p_part + k, mask=k < n_parts, other=0.0).to(tl.float64)
        uacc += tl.load(u_part + k, mask=k < n_parts, other=0.0).to(tl.float64)
    step = tl.load(s_ptr).to(tl.float64) + 1.0
    rho = tl.minimum(tl.cast(lr, tl.float64), 1.0 / tl.sqrt(step))
    alpha = tl.maximum(tl.sqrt(tl.sum(pacc, axis=0) / numel), tl.cast(eps2, tl.float64)) * rho
    denom = tl.maximum(tl.sqrt(tl.sum(uacc, axis=0) / numel) / tl.cast(d, tl.float64), 1.0)
    return (alpha / denom).to(tl.float32)


@triton.jit
def _adafactor_apply_kernel(
    p_ptr, g_ptr, keep_ptr, s_ptr, rows_out, row_mean, col_scale, p_part, u_part, R, C, blocks_per_slice, n_parts,
    numel, found_inf_ptr, grad_scale_ptr, grad_norm_ptr, max_grad_norm, inv_eps1, lr, eps2, d, decay,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SUM_BLOCK: tl.constexpr,
):
    """p = p decay - step U over the program's rows."""
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        pid = tl.program_id(0)
        b = (pid // blocks_per_slice).to(tl.int64)
        rows, rmask, ridx, rscale = _adafactor_rows(rows_out, row_mean, b, pid % blocks_per_slice, R, BLOCK_R)
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, MAXIMIZE)
        step = _adafactor_step_size(s_ptr, p_part, u_part, n_parts, numel, lr, eps2, d, SUM_BLOCK)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            m2 = rmask[:, None] & cmask[None, :]
            offs = ridx[:, None] * C + cols[None, :]
            cscale = tl.load(col_scale + b * C + cols, mask=cmask, other=0.0)
            u = _adafactor_u(g_ptr, offs, m2, rscale, cscale, mult, inv_eps1)
            pf = tl.load(p_ptr + offs, mask=m2, other=0.0).to(tl.float32) * decay - step * u
            if HAS_MASK:
                pf = tl.where(tl.load(keep_ptr + offs, mask=m2, other=1) != 0, pf, 0.0)
            tl.store(p_ptr + offs, pf.to(p_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _adafactor_vec_u(g_ptr, v_ptr, offs, mask, mult, w, one_minus_w, eps1_sq):
    """(new variance, U) of a block of a vector param."""
    x = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mult
    v = _lerp(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), x * x, w, one_minus_w)
    return v, tl.div_rn(x, tl.sqrt_rn(tl.maximum(v, eps1_sq)))


@triton.jit
def _adafactor_vec_stats_kernel(
    g_ptr, v_ptr, p_ptr, s_ptr, p_part, u_part, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr, max_grad_norm, beta2_decay, eps1_sq,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per program (a CHUNK of the vector): sums of p^2 and U^2 (the variance is written by the
    update kernel, from the same values)."""
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * CHUNK
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, False)
        w, one_minus_w = _lerp_weight(s_ptr, beta2_decay)
        pacc = tl.zeros((BLOCK,), tl.float32)
        uacc = tl.zeros((BLOCK,), tl.float32)
        for off in range(start, tl.minimum(start + CHUNK, numel), BLOCK):
            offs = off + tl.arange(0, BLOCK)
            mask = offs < numel
            v, u = _adafactor_vec_u(g_ptr, v_ptr, offs, mask, mult, w, one_minus_w, eps1_sq)
            uacc += tl.where(mask, u * u, 0.0)
            q = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            pacc += q * q
        tl.store(p_part + pid, tl.sum(pacc, axis=0))
        tl.store(u_part + pid, tl.sum(uacc, axis=0))


@triton.jit
def _adafactor_vec_apply_kernel(
    p_ptr, g_ptr, v_ptr, keep_ptr, s_ptr, p_part, u_part, n_parts, numel,
    found_inf_ptr, grad_scale_ptr, grad_norm_ptr, max_grad_norm, beta2_decay, eps1_sq, lr, eps2, d, decay,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_MASK: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
):
    if _is_finite_step(found_inf_ptr, HAS_FOUND_INF) != 0:
        start = tl.program_id(0).to(tl.int64) * CHUNK
        mult = _mult_of(grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_GRAD_SCALE, CLIP, MAXIMIZE)
        step = _adafactor_step_size(s_ptr, p_part, u_part, n_parts, numel, lr, eps2, d, SUM_BLOCK)
        w, one_minus_w = _lerp_weight(s_ptr, beta2_decay)
        for off in range(start, tl.minimum(start + CHUNK, numel), BLOCK):
            offs = off + tl.arange(0, BLOCK)
            mask = offs < numel
            v, u = _adafactor_vec_u(g_ptr, v_ptr, offs, mask, mult, w, one_minus_w, eps1_sq)
            tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
            pf = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay - step * u
            pf = _keep(pf, keep_ptr, offs, mask, HAS_MASK, False)
            tl.store(p_ptr + offs, pf.to(p_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

ADAFACTOR_BLOCK_R = 8   # rows per program of the factored Adafactor kernels
ADAFACTOR_BLOCK_C = 128  # columns per tile
ADAFACTOR_COLS_BLOCK = 512  # columns per program of the column-factor kernel (4 per thread: 16-byte loads)
SUM_BLOCK = 256  # partials per iteration of the in-kernel sums


def _control(dummy, found_inf, grad_scale, grad_norm):
    """The three GradScaler / clipping pointer arguments (a dummy for each absent one)."""
    return tuple(t if t is not None else dummy for t in (found_inf, grad_scale, grad_norm))


def _elementwise(op: str, kernel, rows, names, mutated_rows, n_ptr_rows: int, keep, found_inf, grad_scale, grad_norm,
                 hyper, flags, step_row: Optional[int] = None) -> None:
    """Launch an elementwise kernel over ``rows`` (lists of tensors; the pointer rows first, then
    the steps row if any, then masks): one launch through the table when eager, else per tensor."""
    n = len(rows[0])
    device = rows[0][0].device
    chunk, block = _tri.CHUNK, _tri.BLOCK
    step_rows = () if step_row is None else (step_row,)
    flags = dict(flags, HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None,
                 HAS_MASK=keep is not None, NROWS=len(rows))
    if _is_eager(*(row[0] for row in rows)):
        entry = _table(rows, device, chunk, op, names, step_rows=step_rows)
        write_back = []
        if entry is None:  # some tensor is not contiguous: run on contiguous copies, copy back
            rows, write_back = _contiguous_rows(rows, mutated_rows)
            entry = _table(rows, device, chunk, op, names, step_rows=step_rows, cache=False)
        table, total, aligned = entry
        dummy = rows[0][0]
        ptrs = [row[0] for row in rows[:n_ptr_rows]]
        if total > 0:
            launcher(kernel, traced=False)[(total,)](
                table, n, *ptrs, rows[-1][0] if keep is not None else dummy, 0,
                *_control(dummy, found_inf, grad_scale, grad_norm), *hyper,
                USE_TABLE=True, ALIGNED=aligned, CHUNK=chunk, BLOCK=block, num_warps=_tri.NUM_WARPS, **flags)
        if step_row is not None:
            launcher(_increment_steps_kernel, traced=False)[(triton.cdiv(n, _tri.STEP_BLOCK),)](
                table, step_row * n, n, rows[step_row][0], found_inf if found_inf is not None else dummy,
                HAS_FOUND_INF=found_inf is not None, BLOCK=_tri.STEP_BLOCK, num_warps=_tri.NUM_WARPS)
        for orig, tmp in write_back:
            orig.copy_(tmp)
        return
    _validate_rows(op, rows, names, device, step_rows)
    steps = rows[step_row] if step_row is not None else None
    rows, write_back = _contiguous_rows(rows, mutated_rows)
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    for i in range(n):
        numel = rows[0][i].numel()
        if numel == 0:
            continue
        launcher(kernel)[_grid_1d(numel, chunk)](
            dummy, 1, *(row[i] for row in rows[:n_ptr_rows]), keep[i] if keep is not None else dummy, numel,
            *_control(dummy, found_inf, grad_scale, grad_norm), *hyper,
            USE_TABLE=False, ALIGNED=False, CHUNK=chunk, BLOCK=block, num_warps=_tri.NUM_WARPS, **flags)
    for orig, tmp in write_back:
        orig.copy_(tmp)
    if steps is not None:
        _increment_steps_traced(steps, found_inf)


_RMSPROP_NAMES = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps", "masks")


@triton_op("bigkernels::fused_rmsprop_triton_",
           mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps"))
def fused_rmsprop_triton_(
    params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor], grad_avgs: List[Tensor],
    momentum_buffers: List[Tensor], state_steps: List[Tensor], masks: List[Tensor],
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None,
    *, lr: float, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool, maximize: bool,
    max_grad_norm: float = 0.0,
) -> None:
    """RMSprop step (torch.optim.RMSprop semantics) with the Triton kernel."""
    op = "fused_rmsprop_triton_"
    n = len(params)
    has_momentum = momentum > 0
    _check_lengths(op, n, grads=grads, square_avgs=square_avgs, state_steps=state_steps)
    if centered:
        _check_lengths(op, n, grad_avgs=grad_avgs)
    if has_momentum:
        _check_lengths(op, n, momentum_buffers=momentum_buffers)
    keep = _mask_row(op, params, masks)
    if n == 0:
        return
    _, grad_scale, found_inf, grad_norm, clip = _prologue(op, params, grad_scale, found_inf, grad_norm, max_grad_norm)
    # Absent state rows repeat square_avgs (never touched).
    rows = [list(params), list(grads), list(square_avgs), list(grad_avgs) if centered else list(square_avgs),
            list(momentum_buffers) if has_momentum else list(square_avgs), list(state_steps)]
    rows += [keep] if keep is not None else []
    hyper = (lr, alpha, 1.0 - alpha, eps, weight_decay, momentum, max_grad_norm)
    flags = dict(CLIP=clip, MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0, CENTERED=bool(centered),
                 HAS_MOMENTUM=has_momentum)
    _elementwise(op, _rmsprop_kernel, rows, _RMSPROP_NAMES, (0, 2, 3, 4, 5), 5, keep, found_inf, grad_scale,
                 grad_norm, hyper, flags, step_row=5)


_LION_NAMES = ("params", "grads", "exp_avgs", "masks")


@triton_op("bigkernels::fused_lion_triton_", mutates_args=("params", "exp_avgs"))
def fused_lion_triton_(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], masks: List[Tensor],
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None,
    *, lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool, max_grad_norm: float = 0.0,
) -> None:
    """Lion step (``c = b1 m + (1 - b1) g; p = p (1 - lr wd) - lr sign(c); m = b2 m + (1 - b2) g``)
    with the Triton kernel."""
    op = "fused_lion_triton_"
    n = len(params)
    _check_lengths(op, n, grads=grads, exp_avgs=exp_avgs)
    keep = _mask_row(op, params, masks)
    if n == 0:
        return
    _, grad_scale, found_inf, grad_norm, clip = _prologue(op, params, grad_scale, found_inf, grad_norm, max_grad_norm)
    rows = [list(params), list(grads), list(exp_avgs)] + ([keep] if keep is not None else [])
    hyper = (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay, max_grad_norm)
    _elementwise(op, _lion_kernel, rows, _LION_NAMES, (0, 2), 3, keep, found_inf, grad_scale, grad_norm, hyper,
                 dict(CLIP=clip, MAXIMIZE=bool(maximize)))


@triton_op("bigkernels::fused_adafactor_triton_",
           mutates_args=("params", "row_vars", "col_vars", "variances", "state_steps"))
def fused_adafactor_triton_(
    params: List[Tensor], grads: List[Tensor], row_vars: List[Tensor], col_vars: List[Tensor],
    variances: List[Tensor], state_steps: List[Tensor], masks: List[Tensor],
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None,
    *, lr: float, beta2_decay: float, eps1: float, eps2: float, d: float, weight_decay: float, maximize: bool,
    max_grad_norm: float = 0.0,
) -> None:
    """Adafactor step (torch.optim.Adafactor semantics, see bigkernels.reference.optim) with the
    Triton kernels, launched per param."""
    op = "fused_adafactor_triton_"
    n = len(params)
    _check_lengths(op, n, grads=grads, state_steps=state_steps)
    factored = check_adafactor_lists(op, params, row_vars, col_vars, variances)
    keep = _mask_row(op, params, masks)
    if n == 0:
        return
    device, grad_scale, found_inf, grad_norm, clip = _prologue(op, params, grad_scale, found_inf, grad_norm,
                                                               max_grad_norm)
    state = [list(row_vars), list(col_vars)] if factored else [list(variances)]
    rows = [list(params), list(grads)] + state + [list(state_steps)]
    names = ("params", "grads") + (("row_vars", "col_vars") if factored else ("variances",)) + ("state_steps",)
    for r, row in enumerate(rows):
        for i, t in enumerate(row):
            if t.device != device:
                raise ValueError(f"{op}: {names[r]}[{i}] is on {t.device}, expected {device} (the params' device)")
            if r < len(rows) - 1 and t.dtype != params[0].dtype:
                raise ValueError(f"{op}: {names[r]}[{i}] is {t.dtype}, expected {params[0].dtype} like params[0]")
    rows, write_back = _contiguous_rows(rows, tuple(r for r in range(len(rows)) if r != 1))
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    control = _control(dummy, found_inf, grad_scale, grad_norm)
    flags = dict(HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None, CLIP=clip)
    traced = not _is_eager(params[0], grads[0])
    chunk, block, warps = _tri.CHUNK, _tri.BLOCK, _tri.NUM_WARPS
    inv_eps1 = 1.0 / eps1 if eps1 > 0 else float("inf")
    for i in range(n):
        p, g, s = rows[0][i], rows[1][i], rows[-1][i]
        numel = p.numel()
        if numel == 0:
            continue
        k = keep[i] if keep is not None else dummy
        if factored:
            rv, cv = rows[2][i], rows[3][i]
            R, C = p.shape[-2], p.shape[-1]
            B = numel // (R * C)
            bps = triton.cdiv(R, ADAFACTOR_BLOCK_R)
            parts = B * bps
            rows_out = torch.empty(B * R, device=device, dtype=torch.float32)
            col_part = torch.empty(parts * C, device=device, dtype=torch.float32)
            p_part = torch.empty(parts, device=device, dtype=torch.float32)
            u_part = torch.empty(parts, device=device, dtype=torch.float32)
            col_scale = torch.empty(B * C, device=device, dtype=torch.float32)
            row_mean = torch.empty(B, device=device, dtype=torch.float32)
            tiles = dict(BLOCK_R=ADAFACTOR_BLOCK_R, BLOCK_C=ADAFACTOR_BLOCK_C)
            launcher(_adafactor_stats_kernel, traced)[(parts,)](
                g, p, rv, s, rows_out, col_part, p_part, R, C, bps, *control, max_grad_norm, beta2_decay, **flags,
                **tiles, num_warps=warps)
            launcher(_adafactor_cols_kernel, traced)[(B, triton.cdiv(C, ADAFACTOR_COLS_BLOCK))](
                cv, s, rows_out, col_part, col_scale, row_mean, R, C, bps, eps1, control[0], beta2_decay,
                HAS_FOUND_INF=found_inf is not None, BLOCK_C=ADAFACTOR_COLS_BLOCK,
                BLOCK_R=SUM_BLOCK, num_warps=warps)
            launcher(_adafactor_usq_kernel, traced)[(parts,)](
                g, rows_out, row_mean, col_scale, u_part, R, C, bps, *control, max_grad_norm, inv_eps1, **flags,
                **tiles, num_warps=warps)
            launcher(_adafactor_apply_kernel, traced)[(parts,)](
                p, g, k, s, rows_out, row_mean, col_scale, p_part, u_part, R, C, bps, parts, numel, *control,
                max_grad_norm, inv_eps1, lr, eps2, d, 1.0 - lr * weight_decay, **flags,
                MAXIMIZE=bool(maximize), HAS_MASK=keep is not None, **tiles, SUM_BLOCK=SUM_BLOCK, num_warps=warps)
        else:
            v = rows[2][i]
            parts = triton.cdiv(numel, chunk)
            p_part = torch.empty(parts, device=device, dtype=torch.float32)
            u_part = torch.empty(parts, device=device, dtype=torch.float32)
            launcher(_adafactor_vec_stats_kernel, traced)[(parts,)](
                g, v, p, s, p_part, u_part, numel, *control, max_grad_norm, beta2_decay, eps1 * eps1, **flags,
                CHUNK=chunk, BLOCK=block, num_warps=warps)
            launcher(_adafactor_vec_apply_kernel, traced)[(parts,)](
                p, g, v, k, s, p_part, u_part, parts, numel, *control, max_grad_norm, beta2_decay, eps1 * eps1, lr,
                eps2, d, 1.0 - lr * weight_decay, **flags, MAXIMIZE=bool(maximize),
                HAS_MASK=keep is not None, CHUNK=chunk, BLOCK=block, SUM_BLOCK=SUM_BLOCK, num_warps=warps)
    for orig, tmp in write_back:
        orig.copy_(tmp)
    _increment_steps_traced(state_steps, found_inf)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# --------------------------------------------------------------------------------------------


def aot_cases():
    """The AOT compile cases of this module's kernels (convention: bigkernels/triton/_common.py).

    Elementwise kernels (RMSprop with every state, Lion), fp32 and bf16: the aligned table path
    (ALIGNED: the host checked the addresses), the per-tensor traced path (Triton specialises aligned
    pointers) and the unaligned table path (scalar accesses, must compile). The whole blocks' loads
    and stores of every streamed tensor must be 16-byte vectors where aligned. Adafactor: each pass
    of the factored (R x C, C a multiple of 16) and vector (numel a multiple of 16) kernels, whose
    gradient / state loads (and the updates' stores) must be 16-byte vectors."""
    from bigkernels.triton._common import AOT_TARGETS, AOTCase

    warps = _tri.NUM_WARPS
    block, chunk = 1024, 8192  # the GPU values of optim.BLOCK / CHUNK
    control = dict(found_inf_ptr="*fp32", grad_scale_ptr="*fp32", grad_norm_ptr="*fp32", max_grad_norm="fp32")
    scratch = dict(s_ptr="*fp32", rows_out="*fp32", col_part="*fp32", p_part="*fp32", u_part="*fp32",
                   col_scale="*fp32", row_mean="*fp32", keep_ptr="*u8")
    scalars = ("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum", "beta1", "one_minus_beta1",
               "beta2", "one_minus_beta2", "decay", "beta2_decay", "eps1", "eps1_sq", "inv_eps1", "eps2", "d")
    amp = dict(HAS_FOUND_INF=True, HAS_GRAD_SCALE=True, CLIP=False)

    def vectors(dt: str, tensors: int, per_thread: int) -> int:
        """16-byte accesses of ``tensors`` streams of ``per_thread`` elements per thread."""
        return tensors * max(1, per_thread * (4 if dt == "fp32" else 2) // 16)

    cases = []
    for arch in AOT_TARGETS:
        def add(kernel, dt, flags, group, loads=0, stores=0, path="", ints=()):
            sig = {n: f"*{dt}" for n in kernel.arg_names if n.endswith("_ptr") or n == "table"}
            sig.update({n: t for n, t in {**control, **scratch, "table": "*i64"}.items() if n in kernel.arg_names})
            sig.update({n: "fp32" for n in scalars if n in kernel.arg_names})
            # 16-divisible: every pointer, and the sizes named in ``ints`` (Triton specialises on both)
            aligned = tuple(n for n, t in sig.items() if t.startswith("*")) + tuple(
                n for n in ints if n in kernel.arg_names)
            cases.append(AOTCase(kernel, flags, sig, num_warps=warps, arch=arch, aligned=aligned,
                                 group=f"{group}/{dt}", vector_loads=loads, vector_stores=stores, vector_bytes=16,
                                 note=path))

        per_thread = block // (32 * warps)
        for dt in ("fp32", "bf16"):
            for path, use_table, aligned in (("table", True, True), ("per-tensor", False, False),
                                             ("table-unaligned", True, False)):
                n = 0 if path == "table-unaligned" else 1
                launch = dict(amp, USE_TABLE=use_table, ALIGNED=aligned, MAXIMIZE=False, HAS_MASK=False,
                              CHUNK=chunk, BLOCK=block)
                # p, g, square_avg, grad_avg, momentum buffer: loaded; all but g stored
                add(_rmsprop_kernel, dt, dict(launch, HAS_WD=True, CENTERED=True, HAS_MOMENTUM=True, NROWS=6),
                    f"rmsprop/{path}", vectors(dt, 5, per_thread) * n, vectors(dt, 4, per_thread) * n, path)
                # p, g, exp_avg loaded; p, exp_avg stored
                add(_lion_kernel, dt, dict(launch, NROWS=3), f"lion/{path}", vectors(dt, 3, per_thread) * n,
                    vectors(dt, 2, per_thread) * n, path)
            # Factored: BLOCK_R x BLOCK_C tiles; C (and so every row) a multiple of 16 elements.
            tiles = dict(BLOCK_R=ADAFACTOR_BLOCK_R, BLOCK_C=ADAFACTOR_BLOCK_C)
            per_tile = ADAFACTOR_BLOCK_R * ADAFACTOR_BLOCK_C // (32 * warps)
            sizes = ("C", "numel")
            add(_adafactor_stats_kernel, dt, dict(amp, **tiles), "adafactor/factored",
                vectors(dt, 2, per_tile), ints=sizes)  # g, p
            cols = vectors("fp32", 1, ADAFACTOR_COLS_BLOCK // (32 * warps))  # col_part read, col_scale written
            add(_adafactor_cols_kernel, dt, dict(HAS_FOUND_INF=True, BLOCK_C=ADAFACTOR_COLS_BLOCK, BLOCK_R=SUM_BLOCK),
                "adafactor/factored", cols, cols, ints=sizes)
            add(_adafactor_usq_kernel, dt, dict(amp, **tiles), "adafactor/factored", vectors(dt, 1, per_tile),
                ints=sizes)  # g
            add(_adafactor_apply_kernel, dt, dict(amp, MAXIMIZE=False, HAS_MASK=True, SUM_BLOCK=SUM_BLOCK, **tiles),
                "adafactor/factored", vectors(dt, 2, per_tile), vectors(dt, 1, per_tile), ints=sizes)  # g, p; p
            vec = dict(amp, CHUNK=chunk, BLOCK=block)
            add(_adafactor_vec_stats_kernel, dt, vec, "adafactor/vector", vectors(dt, 3, per_thread),
                ints=sizes)  # g, v, p
            add(_adafactor_vec_apply_kernel, dt, dict(vec, MAXIMIZE=False, HAS_MASK=True, SUM_BLOCK=SUM_BLOCK),
                "adafactor/vector", vectors(dt, 3, per_thread), vectors(dt, 2, per_thread), ints=sizes)  # g, v, p; v, p
    return cases
