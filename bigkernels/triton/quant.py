"""Triton kernels of the int8 quantisation ops, registered with ``torch.library.triton_op``.

Ops (``bigkernels`` namespace; same schemas and semantics as their namesakes in
``bigkernels.ops.quant``, exact semantics in ``bigkernels.reference.quant``):

``quantize_per_token_triton(x) -> (x_int8, x_scale)``
    One pass per row block: fp32 absmax (a NaN flag kept apart, since hardware max drops NaN),
    ``scale = absmax / 127`` and ``q = round_half_even(x / scale)`` with correctly rounded
    divisions (``tl.div_rn``) exactly like the reference, clamped to +-127; zero rows give 0 codes
    and scale 0, NaN rows scale NaN and 0 codes. Rows longer than one block take two sweeps.
``int8_mm_triton(a, b) -> int32`` and ``int8_scaled_mm_triton(a, a_scale, b, b_scale, bias, out_dtype)``
    One tensor-core GEMM kernel (``a [M, K] @ b [N, K].T``, int8 x int8 -> int32 ``tl.dot``),
    grouped (GROUP_M) tile order for L2 reuse, with either the raw int32 store or the fused
    epilogue ``acc * a_scale[m] * b_scale[n] + bias`` cast to ``out_dtype``. Autotuned on GPU
    over configs for sm_80 / sm_90 (those whose estimated shared memory exceeds the device's are
    pruned before any launch: _common.smem_pruner), keyed on an M bucket, N and K; small M (<= 64)
    and large M have separate config lists.
``w8a16_mm_triton(x, w_int8, w_scale, bias) -> x.dtype``
    The int8 weight tile is converted to x's dtype in registers and fed to ``tl.dot`` with fp32
    accumulation (IEEE fp32 products for fp32 x); ``w_scale[n]`` and the bias are applied in the
    epilogue. For M <= 16 (memory bound: every weight byte is read once) a split-K variant with
    narrow-M tiles spreads the weight over enough programs to fill the GPU; its fp32 partials are
    summed in a fixed order by a second small kernel that applies scale, bias and the cast. fp32 x
    has its own config lists (IEEE FMA products: moderate tiles).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with one small fixed config (no
autotuning: it is far too slow there) chosen so that tiny test shapes still cover several tiles,
K remainders and the split-K path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

# The shared launcher (_common.launcher: device guard, tracing wrapper) and host helpers.
from bigkernels.triton._common import (_INTERPRET, _Tuned, _check_runnable, _check_tensor, _check_vector, _dummy,
                                       _m_bucket, dtype_size, launch_tiled, split_k, tile_smem)
from bigkernels.triton._common import _traced as _launch
_QMAX = 127.0

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    """torch.round of finite fp32 ``v`` (ties to even), exact: |v| = r + d with r = floor(|v|)
    and d = |v| - r computed without rounding error."""
    a = tl.abs(v)
    r = tl.floor(a)
    d = a - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    r = tl.where(up, r + 1.0, r)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_codes(x, scale):
    """int8 codes of fp32 ``x`` [ROWS, BLOCK_K] for per-row fp32 ``scale`` [ROWS]."""
    s = scale[:, None]
    v = tl.div_rn(x, s)
    # NaN (a NaN row, or inf/inf in an inf row) and zero rows give 0; clamp before rounding
    # (round is monotone and +-127 are integers, so this equals clamp(round(v))).
    bad = (v != v) | (s == 0.0)
    v = tl.where(bad, 0.0, v)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return _round_half_even(v).to(tl.int8)


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                               ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    q_rows = q_ptr + rows64[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if SINGLE:  # the whole row fits one block: read x once
        mask = row_mask[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        has_nan = tl.max((x != x).to(tl.int32), axis=1)
    else:
        amax = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        nans = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
        for k in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & ((k + cols)[None, :] < K)
            x = tl.load(x_rows + (k + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
            nans = tl.maximum(nans, (x != x).to(tl.int32))
        absmax = tl.max(amax, axis=1)
        has_nan = tl.max(nans, axis=1)
    scale = tl.div_rn(absmax, 127.0)
    scale = tl.where(has_nan > 0, float("nan"), scale)  # torch.amax propagates NaN
    tl.store(s_ptr + rows64, scale, mask=row_mask)
    if SINGLE:
        tl.store(q_rows + cols[None, :], _quantize_codes(x, scale), mask=mask)
    else:
        for k in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & ((k + cols)[None, :] < K)
            x = tl.load(x_rows + (k + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + (k + cols)[None, :], _quantize_codes(x, scale), mask=mask)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row tiles sweep the columns
    together, so their A rows and B columns stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
                      M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
                      SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """c = a [M, K] @ b [N, K].T in int32, or its dequantised form (SCALED)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap (their results are never stored): loads need no M/N mask.
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc=acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    m_mask = offs_m < M
    n_mask = offs_n < N
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SCALED:
        a_s = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        b_s = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
        out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr,
                  M, N, K, M_BUCKET, K_PER_SPLIT, stride_xm, stride_wn, stride_om,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = (x [M, K] @ w_int8 [N, K].T) * w_scale[n] + bias, the weight converted to x's dtype
    tile by tile. With SPLIT_K > 1, program (tile, s) sums K slice s and stores fp32 partials in
    ws [SPLIT_K, M, N]; _splitk_epilogue_kernel finishes."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_xm = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + offs_xm[:, None] * stride_xm + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + offs_wn[None, :] * stride_wn + (k_start + offs_k)[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_left = k_end - k
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wt = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        wt = wt.to(x_ptr.dtype.element_ty)  # exact: |w| <= 127 fits fp16/bf16/fp32
        if IEEE:
            acc = tl.dot(xt, wt, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc=acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        out = acc * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = (ws_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N
                   + offs_n[None, :])
        tl.store(ws_ptrs, acc, mask=mask)


@triton.jit
def _splitk_epilogue_kernel(ws_ptr, w_scale_ptr, bias_ptr, out_ptr, MN, N,
                            SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = (sum_s ws[s, m, n]) * w_scale[n] + bias[n] (fixed order: deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    ptrs = ws_ptr + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        ptrs += MN  # pointer steps of MN: no 32-bit product s * MN
        acc += tl.load(ptrs, mask=mask, other=0.0)
    n = offs % N
    out = acc * tl.load(w_scale_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, group, stages, warps):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group),
                         num_stages=stages, num_warps=warps)


# Autotune lists. Every config the pruner keeps (shared memory estimate within the device's
# limit, _common.smem_pruner) is compiled for sm_80 and sm_90 by tests/test_triton_aot.py (see
# aot_cases below), so a config that does not compile or fit is seen without a GPU.
#
# int8 GEMM, M > 64. The 128x256x128 / 256x128x128 tiles are what reach ~1 POPS on H100 (sm_90,
# wgmma); the 128/64-wide ones with more stages suit sm_80.
_INT8_LARGE_M = [
    _cfg(128, 256, 128, 8, 3, 8),
    _cfg(256, 128, 128, 8, 3, 8),
    _cfg(128, 256, 64, 8, 4, 8),
    _cfg(128, 128, 128, 8, 4, 8),
    _cfg(128, 128, 128, 8, 3, 4),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 128, 128, 8, 4, 4),
    _cfg(128, 64, 128, 8, 4, 4),
]
# int8 GEMM, M <= 64 (decode / small batches: weight-bandwidth bound, narrow M tiles).
_INT8_SMALL_M = [
    _cfg(16, 64, 256, 1, 4, 4),
    _cfg(16, 128, 128, 1, 4, 4),
    _cfg(32, 64, 256, 1, 4, 4),
    _cfg(32, 128, 128, 1, 4, 4),
    _cfg(64, 64, 256, 1, 4, 4),
    _cfg(64, 128, 128, 1, 4, 4),
]
# w8a16 with fp16/bf16 x, M > 16 (tensor cores; the int8 weight tile is half the bytes of a bf16 one).
_W8A16_LARGE_M = [
    _cfg(128, 256, 64, 8, 3, 8),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(128, 128, 64, 8, 4, 8),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 64, 128, 8, 4, 4),
]
# w8a16 with fp16/bf16 x, M <= 16 (GEMV-like, split-K chosen on the host): wide K tiles, deep pipelines.
_W8A16_SMALL_M = [
    _cfg(16, 32, 256, 1, 4, 4),
    _cfg(16, 64, 256, 1, 4, 4),
    _cfg(16, 64, 512, 1, 3, 4),
    _cfg(16, 64, 128, 1, 6, 4),
    _cfg(16, 128, 128, 1, 4, 4),
]
# w8a16 with fp32 x: IEEE fp32 products (FMA, no tensor cores), so moderate tiles (their code and
# compile time grow with BLOCK_M * BLOCK_N * BLOCK_K / threads) and fp32 x tiles in shared memory.
_W8A16_FP32_LARGE_M = [
    _cfg(64, 64, 32, 8, 3, 4),
    _cfg(64, 128, 32, 8, 3, 8),
    _cfg(32, 64, 64, 8, 3, 4),
]
_W8A16_FP32_SMALL_M = [
    _cfg(16, 64, 64, 1, 3, 4),
    _cfg(16, 32, 128, 1, 3, 4),
]
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]


def _int8_smem(config, named_args, kwargs) -> int:
    """Shared memory of an int8 GEMM config (the pruner's estimate, checked against Triton's
    allocation by tests/test_triton_aot.py): the pipelined a and b tiles."""
    return tile_smem(config, a=(("BLOCK_M", "BLOCK_K"), 1), b=(("BLOCK_K", "BLOCK_N"), 1))


def _w8a16_smem(config, named_args, kwargs) -> int:
    """Shared memory of a w8a16 config: the pipelined x and int8 weight tiles, and the weight tile
    converted to x's dtype (a dot operand)."""
    xs = dtype_size(named_args["x_ptr"])
    return (tile_smem(config, x=(("BLOCK_M", "BLOCK_K"), xs), w=(("BLOCK_K", "BLOCK_N"), 1))
            + tile_smem(config, 1, w=(("BLOCK_K", "BLOCK_N"), xs)))


_INT8_TUNED = {small: _Tuned(_int8_gemm_kernel, cfgs, _AUTOTUNE_KEY, _int8_smem)
               for small, cfgs in ((True, _INT8_SMALL_M), (False, _INT8_LARGE_M))}
_W8A16_TUNED = {
    (small, fp32): _Tuned(_w8a16_kernel, cfgs, _AUTOTUNE_KEY + (["SPLIT_K"] if small else []), _w8a16_smem)
    for (small, fp32), cfgs in (((True, False), _W8A16_SMALL_M), ((False, False), _W8A16_LARGE_M),
                                ((True, True), _W8A16_FP32_SMALL_M), ((False, True), _W8A16_FP32_LARGE_M))}

# One tiny config under the interpreter: tiles of 16 so that small test shapes span several tiles and K steps.
_INTERP_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
_INTERP_KDIV = 16

INT8_SMALL_M = 64  # int8 GEMMs with M <= this use the narrow-M configs
W8A16_SMALL_M = 16  # w8a16 with M <= this uses the split-K GEMV-like variant
_EPILOGUE_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Host side: validation and launches
# --------------------------------------------------------------------------------------------

_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)


def _check_k(op: str, a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: {a_name} [M, K] and {b_name} [N, K] must share K; got {a_name} "
                         f"{tuple(a.shape)} and {b_name} {tuple(b.shape)}")


def _int8_gemm(op: str, a: Tensor, b: Tensor, out: Tensor, a_scale: Optional[Tensor],
               b_scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return out
    scaled = a_scale is not None
    dummy = _dummy(out.device)
    args = (a, b, out, a_scale if scaled else dummy, b_scale if scaled else dummy,
            bias if bias is not None else dummy, M, N, K, _m_bucket(M), a.stride(0), b.stride(0), out.stride(0))
    tuned = _INT8_TUNED[bool(M <= INT8_SMALL_M)]  # bool: M may be symbolic (traced)
    kdiv = _INTERP_KDIV if _INTERPRET else tuned.kdiv
    flags = dict(SCALED=scaled, HAS_BIAS=bias is not None, EVEN_K=K % kdiv == 0)
    launch_tiled(_int8_gemm_kernel, tuned.kernel, _INTERP_META, M, N, args, flags)
    return out


@triton_op("bigkernels::quantize_per_token_triton", mutates_args=())
def quantize_per_token_triton(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(x_int8 [M, K], x_scale [M] fp32): symmetric per-row absmax int8 quantisation of 2-D x."""
    op = "quantize_per_token_triton"
    _check_tensor(op, "x", x, 2, _FLOAT_IN)
    _check_runnable(op, x.device)
    M, K = x.shape
    if K == 0 and M > 0:
        raise ValueError(f"{op}: x must have at least one column to take a row absmax, got shape {tuple(x.shape)}")
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    scale = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return q, scale
    x = x.contiguous()
    if _INTERPRET:
        block_k, rows, warps = min(triton.next_power_of_2(K), 32), 2, 4
    else:
        block_k = min(triton.next_power_of_2(K), 8192)
        rows = max(1, min(16, 4096 // block_k))
        warps = 4 if block_k * rows <= 2048 else (8 if block_k * rows <= 4096 else 16)
    grid = (triton.cdiv(M, rows),)
    _launch(_quantize_per_token_kernel)[grid](x, q, scale, M, K, x.stride(0), q.stride(0), ROWS=rows,
                                              BLOCK_K=block_k, SINGLE=block_k >= K, num_warps=warps)
    return q, scale


@triton_op("bigkernels::int8_mm_triton", mutates_args=())
def int8_mm_triton(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 ``a [M, K] @ b [N, K].T`` of int8 matrices."""
    op = "int8_mm_triton"
    _check_tensor(op, "a", a, 2, (torch.int8,))
    _check_tensor(op, "b", b, 2, (torch.int8,), a.device)
    _check_k(op, "a", a, "b", b)
    _check_runnable(op, a.device)
    out = torch.empty((a.shape[0], b.shape[0]), device=a.device, dtype=torch.int32)
    return _int8_gemm(op, a.contiguous(), b.contiguous(), out, None, None, None)


@triton_op("bigkernels::int8_scaled_mm_triton", mutates_args=())
def int8_scaled_mm_triton(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, bias: Optional[Tensor],
                          out_dtype: torch.dtype) -> Tensor:
    """``(a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias`` in fp32, cast to ``out_dtype``."""
    op = "int8_scaled_mm_triton"
    _check_tensor(op, "a", a, 2, (torch.int8,))
    _check_tensor(op, "b", b, 2, (torch.int8,), a.device)
    _check_k(op, "a", a, "b", b)
    if out_dtype not in _FLOAT_OUT:
        raise ValueError(f"{op}: out_dtype must be one of {_FLOAT_OUT}, got {out_dtype}")
    M, N = a.shape[0], b.shape[0]
    a_scale = _check_vector(op, "a_scale", a_scale, M, a.device, "one scale per row of a").float()
    b_scale = _check_vector(op, "b_scale", b_scale, N, a.device, "one scale per row of b").float()
    if bias is not None:
        bias = _check_vector(op, "bias", bias, N, a.device, "one per output column")
    _check_runnable(op, a.device)
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    return _int8_gemm(op, a.contiguous(), b.contiguous(), out, a_scale, b_scale, bias)


@triton_op("bigkernels::w8a16_mm_triton", mutates_args=())
def w8a16_mm_triton(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ (w_int8 * w_scale[:, None]).T + bias`` with fp32 accumulation, in x's dtype."""
    op = "w8a16_mm_triton"
    _check_tensor(op, "x", x, 2, _FLOAT_IN)
    _check_tensor(op, "w_int8", w_int8, 2, (torch.int8,), x.device)
    _check_k(op, "x", x, "w_int8", w_int8)
    M, K = x.shape
    N = w_int8.shape[0]
    w_scale = _check_vector(op, "w_scale", w_scale, N, x.device, "one scale per row of w_int8").float()
    if bias is not None:
        bias = _check_vector(op, "bias", bias, N, x.device, "one per output column")
    _check_runnable(op, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    x = x.contiguous()
    w_int8 = w_int8.contiguous()
    small = bool(M <= W8A16_SMALL_M)  # bool: M may be symbolic (traced)
    tuned = _W8A16_TUNED[(small, x.dtype == torch.float32)]
    kdiv = _INTERP_KDIV if _INTERPRET else tuned.kdiv
    split, k_per_split = split_k(N, K, kdiv, x.device) if small else (1, K)
    dummy = _dummy(x.device)
    ws = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else dummy
    args = (x, w_int8, w_scale, bias if bias is not None else dummy, out, ws, M, N, K, _m_bucket(M),
            k_per_split, x.stride(0), w_int8.stride(0), out.stride(0))
    flags = dict(SPLIT_K=split, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                 EVEN_K=K % kdiv == 0 and k_per_split % kdiv == 0)
    launch_tiled(_w8a16_kernel, tuned.kernel, _INTERP_META, M, N, args, flags, splits=split)
    if split > 1:
        _launch(_splitk_epilogue_kernel)[(triton.cdiv(M * N, _EPILOGUE_BLOCK),)](
            ws, w_scale, bias if bias is not None else dummy, out, M * N, N, SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=_EPILOGUE_BLOCK, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# --------------------------------------------------------------------------------------------

def _first_per_arch(cases):
    """The first case of each architecture (dtypes that share another's code shape and sizes)."""
    seen, out = set(), []
    for c in cases:
        if c.arch not in seen:
            seen.add(c.arch)
            out.append(c)
    return out


def aot_cases():
    """The AOT compile cases of this module's kernels (convention: bigkernels/triton/_common.py).

    GEMMs: every config each autotuner's pruner keeps, for bf16 (and fp32 x for w8a16); fp16
    shares bf16's code shape and shared memory, so it compiles the first kept config per target;
    so do the raw int32 and unsplit variants, and the masked-K one (EVEN_K=False, with K and the
    strides not multiples of 16: Triton specialises on that, and a failure can depend on it). Memory-bound kernels (w8a16
    M <= 16 and its split-K epilogue, quantize) must vectorise their hot loads on aligned tensors."""
    import dataclasses

    from bigkernels.triton._common import AOT_TARGETS, AOTCase, tuned_cases

    cases = []
    int8_sig = dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*bf16", a_scale_ptr="*fp32", b_scale_ptr="*fp32",
                    bias_ptr="*fp32")
    gemm_aligned = ("a_ptr", "b_ptr", "c_ptr", "a_scale_ptr", "b_scale_ptr", "bias_ptr", "x_ptr", "w_ptr",
                    "w_scale_ptr", "out_ptr", "ws_ptr", "N", "K", "K_PER_SPLIT", "stride_am", "stride_bn",
                    "stride_cm", "stride_xm", "stride_wn", "stride_om")
    for small, tuned in _INT8_TUNED.items():
        group = f"int8_mm/M{'<=' if small else '>'}{INT8_SMALL_M}"
        flags = dict(SCALED=True, HAS_BIAS=True, EVEN_K=True)
        kw = dict(aligned=tuple(n for n in gemm_aligned if n in _int8_gemm_kernel.arg_names))
        full = tuned_cases(tuned.kernel, int8_sig, flags, group, **kw)
        cases += full
        for c in _first_per_arch(c for c in full if c.arch in AOT_TARGETS):
            cases.append(dataclasses.replace(c, constexprs=dict(c.constexprs, SCALED=False, HAS_BIAS=False),
                                             signature=dict(int8_sig, c_ptr="*i32"), note="int32 out"))
            cases.append(dataclasses.replace(c, constexprs=dict(c.constexprs, EVEN_K=False), aligned=None,
                                             note="masked K, odd K and strides"))

    for (small, fp32), tuned in _W8A16_TUNED.items():
        bucket = f"M{'<=' if small else '>'}{W8A16_SMALL_M}"
        split = 4 if small else 1
        for dt in (("fp32",) if fp32 else ("bf16", "fp16")):
            sig = dict(x_ptr=f"*{dt}", w_ptr="*i8", w_scale_ptr="*fp32", bias_ptr="*fp32", out_ptr=f"*{dt}",
                       ws_ptr="*fp32")
            flags = dict(SPLIT_K=split, HAS_BIAS=True, EVEN_K=True, IEEE=fp32)
            kw = dict(aligned=tuple(n for n in gemm_aligned if n in _w8a16_kernel.arg_names),
                      vector_loads=2 if small else 0)  # GEMV-like: x and the int8 weight stream in vectors
            full = tuned_cases(tuned.kernel, sig, flags, f"w8a16_mm/{dt}/{bucket}", **kw)
            cases += full if dt != "fp16" else _first_per_arch(full)
            if dt != "fp16":
                for c in _first_per_arch(c for c in full if c.arch in AOT_TARGETS):
                    cases.append(dataclasses.replace(c, constexprs=dict(c.constexprs, EVEN_K=False), vector_loads=0,
                                                     aligned=None, note="masked K, odd K and strides"))
                    if small:
                        cases.append(dataclasses.replace(c, constexprs=dict(c.constexprs, SPLIT_K=1), note="no split"))

    for arch in AOT_TARGETS:
        for dt in ("bf16", "fp32"):
            # split-K epilogue: SPLIT_K fp32 partials per output element, read in 16-byte vectors
            cases.append(AOTCase(_splitk_epilogue_kernel, dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=_EPILOGUE_BLOCK),
                                 dict(ws_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*fp32", out_ptr=f"*{dt}"),
                                 arch=arch, aligned=("ws_ptr", "w_scale_ptr", "bias_ptr", "out_ptr", "MN", "N"),
                                 vector_loads=4, group=f"w8a16_mm/splitk_epilogue/{dt}"))
        for dt in ("bf16", "fp32", "fp16"):
            # quantize_per_token's host choices: (BLOCK_K, ROWS, warps) for K = 4096, K > 8192, K = 64
            # (fp16: bf16's shapes; one of them)
            for block_k, rows, warps, single in ((4096, 1, 8, True), (8192, 1, 16, False), (64, 16, 4, True))[
                    :1 if dt == "fp16" else 3]:
                cases.append(AOTCase(_quantize_per_token_kernel, dict(ROWS=rows, BLOCK_K=block_k, SINGLE=single),
                                     dict(x_ptr=f"*{dt}", q_ptr="*i8", s_ptr="*fp32"), num_warps=warps, arch=arch,
                                     aligned=("x_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_qm"),
                                     vector_loads=1, group=f"quantize_per_token/{dt}/K{block_k}",
                                     note=f"K={'>8192' if not single else block_k}"))
    return cases
