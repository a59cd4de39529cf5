"""Triton kernels of the codebook (weight-sharing) ops, registered with ``torch.library.triton_op``.

Ops (``bigkernels`` namespace; same schemas and semantics as their namesakes in
``bigkernels.ops.codebook``, exact semantics and the bit layout in ``bigkernels.reference.codebook``):

``codebook_mm_triton(x, indices, centroids, bias, group_size) -> [M, N]``
    Lookup-table GEMM: each program loads a [BLOCK_K, BLOCK_N] tile of packed indices (the bytes
    holding them; the ``bits``-bit field of entry k starts at stream bit ``bits * k``), extracts
    the indices with shifts and masks in registers, looks the centroids up from the codebook
    (2**bits values per group: a few hundred bytes that stay in L1) and feeds the tile, converted
    to x's dtype, to ``tl.dot`` with fp32 accumulation (IEEE fp32 products for fp32 x). No dense
    weight is ever written to memory. For M <= 16 (memory bound: the packed weight is read once)
    a split-K variant with narrow-M tiles spreads the weight over enough programs to fill the
    GPU; its fp32 partials are summed in a fixed order by a second small kernel that adds the bias.
``codebook_dequantize_triton(indices, centroids, in_features, group_size) -> W [N, K]``
    The dense weight in the centroids' dtype (training's backward and the dense fallback paths).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with one small fixed config. On a GPU,
``codebook_mm`` is autotuned (small-M and large-M config lists for sm_80 / sm_90; configs that do
not fit a device's shared memory are pruned before any launch: ``_common.smem_pruner``).
:func:`aot_cases` lists what tests/test_triton_aot.py compiles ahead of time for sm_80 / sm_90.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from bigkernels.reference import codebook as ref
from bigkernels.triton._common import (_INTERPRET, _Tuned, _check_runnable, _check_tensor, _check_vector, _dummy,
                                       _m_bucket, dtype_size, launch_tiled, launcher, split_k, tile_smem)
# Shared with the int8 kernels: grouped tile order, the config constructor.
from bigkernels.triton.quant import _cfg, _tile_ids

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _lookup(idx_ptr, cent_ptr, offs_k, offs_n, k_mask, stride_in, GROUP_SIZE, BITS: tl.constexpr):
    """W[n, k] for the [BLOCK_K, BLOCK_N] tile (k along axis 0): the packed bits of each entry,
    then its centroid in its row's codebook (fp32 compute of the gather address; value in the
    centroids' dtype)."""
    bit = offs_k.to(tl.int64)[:, None] * BITS
    row = idx_ptr + offs_n.to(tl.int64)[None, :] * stride_in
    byte = bit >> 3
    shift = (bit & 7).to(tl.int32)
    lo = tl.load(row + byte, mask=k_mask, other=0).to(tl.int32)
    if BITS == 3:  # a 3-bit field may continue into the next byte of its 3-byte unit
        spans = k_mask & (shift > 5)
        lo = lo | (tl.load(row + byte + 1, mask=spans, other=0).to(tl.int32) << 8)
    idx = (lo >> shift) & ((1 << BITS) - 1)
    group = (offs_n // GROUP_SIZE).to(tl.int64)
    return tl.load(cent_ptr + group[None, :] * (1 << BITS) + idx, mask=k_mask, other=0.0)


@triton.jit
def _codebook_mm_kernel(x_ptr, idx_ptr, cent_ptr, bias_ptr, out_ptr, ws_ptr,
                        M, N, K, M_BUCKET, K_PER_SPLIT, GROUP_SIZE, stride_xm, stride_in, stride_om,
                        BITS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x [M, K] @ W.T + bias with W looked up tile by tile from the codebook. With SPLIT_K > 1,
    program (tile, s) sums K slice s into fp32 partials ws [SPLIT_K, M, N]; _splitk_bias_kernel
    finishes."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_xm = (offs_m % M).to(tl.int64)  # rows / columns past the edge wrap: never stored
    offs_wn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        ks = k + offs_k
        k_ok = ks < k_end
        xt = tl.load(x_ptr + offs_xm[:, None] * stride_xm + ks[None, :], mask=k_ok[None, :], other=0.0)
        wt = _lookup(idx_ptr, cent_ptr, ks, offs_wn, k_ok[:, None], stride_in, GROUP_SIZE, BITS)
        wt = wt.to(x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(xt, wt, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc=acc)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        out = acc
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=mask)


@triton.jit
def _splitk_bias_kernel(ws_ptr, bias_ptr, out_ptr, MN, N,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum_s ws[s, m, n] + bias[n] (fixed order: deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    ptrs = ws_ptr + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        ptrs += MN
        acc += tl.load(ptrs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(idx_ptr, cent_ptr, out_ptr, N, K, GROUP_SIZE, stride_in, stride_on,
                       BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = centroids[n // GROUP_SIZE, index(n, k)] for one [BLOCK_N, BLOCK_K] tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    w = _lookup(idx_ptr, cent_ptr, offs_k, offs_n, mask, stride_in, GROUP_SIZE, BITS)  # [BLOCK_K, BLOCK_N]
    ptrs = out_ptr + offs_n.to(tl.int64)[None, :] * stride_on + offs_k[:, None]
    tl.store(ptrs, w, mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


# M <= 16 (decode): the packed weight dominates the traffic; narrow M tiles, wide K tiles, split-K.
_SMALL_M = [
    _cfg(16, 32, 128, 1, 4, 4),
    _cfg(16, 64, 128, 1, 4, 4),
    _cfg(16, 64, 256, 1, 3, 4),
    _cfg(16, 128, 128, 1, 3, 4),
    _cfg(16, 128, 64, 1, 4, 4),
]
# M > 16: tensor-core tiles (the looked-up tile is built in registers, so moderate BLOCK_K).
_LARGE_M = [
    _cfg(128, 128, 32, 8, 3, 8),
    _cfg(128, 128, 64, 8, 3, 8),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
    _cfg(32, 64, 128, 8, 4, 4),
]
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]


def _mm_smem(config, named_args, kwargs) -> int:
    """Shared memory of a codebook_mm config (the pruner's estimate, checked against Triton's
    allocation by tests/test_triton_aot.py), an upper bound: the pipelined x tiles and index bytes
    (two loads per entry for 3 bits), the looked-up weight tile in x's dtype (a dot operand), or
    the fp32 accumulator's layout conversion at the store if that is larger."""
    xs = dtype_size(named_args["x_ptr"])
    idx_loads = 2 if kwargs.get("BITS") == 3 else 1
    pipelined = tile_smem(config, x=(("BLOCK_M", "BLOCK_K"), xs), idx=(("BLOCK_K", "BLOCK_N"), idx_loads))
    # fp32 x (IEEE dot): Triton 3.8 allocates up to one more operand-sized buffer than that
    # (measured by the AOT test: +8-28 KB over the other terms on sm_80/sm_90)
    operand = tile_smem(config, 1, w=(("BLOCK_K", "BLOCK_N"), xs)) * (2 if xs == 4 else 1)
    return max(pipelined + operand, tile_smem(config, 1, acc=(("BLOCK_M", "BLOCK_N"), 4)))


SMALL_M = 16  # M <= this: the split-K GEMV-like variant
_EPILOGUE_BLOCK = 1024
_DEQ_BLOCK = dict(BLOCK_N=32, BLOCK_K=128)

# The autotuned GEMM by M bucket (True: M <= SMALL_M, the split-K variant).
_MM_TUNED = {True: _Tuned(_codebook_mm_kernel, _SMALL_M, _AUTOTUNE_KEY + ["SPLIT_K", "BITS"], _mm_smem),
             False: _Tuned(_codebook_mm_kernel, _LARGE_M, _AUTOTUNE_KEY + ["BITS"], _mm_smem)}
# One tiny config under the interpreter: tiles of 16 so that small test shapes span several tiles and K steps.
_INTERP_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
_INTERP_KDIV = 16
if _INTERPRET:
    _DEQ_BLOCK = dict(BLOCK_N=16, BLOCK_K=16)


# --------------------------------------------------------------------------------------------
# Host side: validation and launches
# --------------------------------------------------------------------------------------------

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def _check_format(op: str, indices: Tensor, centroids: Tensor, in_features: int, group_size: int,
                  device: torch.device) -> int:
    _check_tensor(op, "indices", indices, 2, (torch.uint8,), device)
    _check_tensor(op, "centroids", centroids, 2, _FLOAT, device)
    bits = ref.bits_of(centroids)
    if group_size <= 0:
        raise ValueError(f"{op}: group_size must be positive, got {group_size}")
    if indices.shape[1] != ref.packed_cols(in_features, bits):
        raise ValueError(f"{op}: indices of {in_features} {bits}-bit entries per row need "
                         f"{ref.packed_cols(in_features, bits)} bytes per row, got shape {tuple(indices.shape)}")
    groups = ref.num_groups(indices.shape[0], group_size)
    if centroids.shape[0] != groups:
        raise ValueError(f"{op}: {indices.shape[0]} output rows in groups of {group_size} need {groups} codebooks, "
                         f"got centroids of shape {tuple(centroids.shape)}")
    return bits


@triton_op("bigkernels::codebook_mm_triton", mutates_args=())
def codebook_mm_triton(x: Tensor, indices: Tensor, centroids: Tensor, bias: Optional[Tensor],
                       group_size: int) -> Tensor:
    """``x @ W.T + bias`` with W looked up from the codebook inside the kernel, fp32 accumulation, in x's dtype."""
    op = "codebook_mm_triton"
    _check_tensor(op, "x", x, 2, _FLOAT)
    M, K = x.shape
    bits = _check_format(op, indices, centroids, K, group_size, x.device)
    N = indices.shape[0]
    if bias is not None:
        bias = _check_vector(op, "bias", bias, N, x.device, "one per output row")
    _check_runnable(op, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    x = x.contiguous()
    indices = indices.contiguous()
    centroids = centroids.contiguous()
    small = bool(M <= SMALL_M)  # bool: M may be symbolic (traced)
    tuned = _MM_TUNED[small]
    kdiv = _INTERP_KDIV if _INTERPRET else tuned.kdiv
    split, k_per_split = split_k(N, K, kdiv, x.device) if small else (1, K)
    dummy = _dummy(x.device)
    ws = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else dummy
    args = (x, indices, centroids, bias if bias is not None else dummy, out, ws, M, N, K, _m_bucket(M), k_per_split,
            group_size, x.stride(0), indices.stride(0), out.stride(0))
    flags = dict(BITS=bits, SPLIT_K=split, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32)
    launch_tiled(_codebook_mm_kernel, tuned.kernel, _INTERP_META, M, N, args, flags, splits=split)
    if split > 1:
        launcher(_splitk_bias_kernel)[(triton.cdiv(M * N, _EPILOGUE_BLOCK),)](
            ws, bias if bias is not None else dummy, out, M * N, N, SPLIT_K=split, HAS_BIAS=bias is not None,
            BLOCK=_EPILOGUE_BLOCK, num_warps=4)
    return out


@triton_op("bigkernels::codebook_dequantize_triton", mutates_args=())
def codebook_dequantize_triton(indices: Tensor, centroids: Tensor, in_features: int, group_size: int) -> Tensor:
    """The dense weight [N, in_features] in the centroids' dtype."""
    op = "codebook_dequantize_triton"
    if not isinstance(centroids, Tensor):
        raise TypeError(f"{op}: centroids must be a Tensor, got {type(centroids).__name__}")
    bits = _check_format(op, indices, centroids, in_features, group_size, centroids.device)
    _check_runnable(op, centroids.device)
    N = indices.shape[0]
    out = torch.empty((N, in_features), device=centroids.device, dtype=centroids.dtype)
    if N == 0 or in_features == 0:
        return out
    indices = indices.contiguous()
    centroids = centroids.contiguous()
    grid = (triton.cdiv(N, _DEQ_BLOCK["BLOCK_N"]), triton.cdiv(in_features, _DEQ_BLOCK["BLOCK_K"]))
    launcher(_dequantize_kernel)[grid](indices, centroids, out, N, in_features, group_size, indices.stride(0),
                                      out.stride(0), BITS=bits, num_warps=4, **_DEQ_BLOCK)
    return out


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (convention: bigkernels/triton/_common.py)
# --------------------------------------------------------------------------------------------


def aot_cases():
    """The AOT compile cases of this module's kernels: for each autotuner (M <= 16 split-K, M > 16),
    every config its pruner keeps per target, in bf16 and fp32, for 4 bits and for 3 bits (whose
    fields may span two bytes: a second load, more shared memory); 2 and 8 bits (other shifts
    and masks only) and fp16 (bf16's code shape and shared memory) compile the first kept config
    per target. Plus the split-K epilogue (fp32 partials read in vectors) and the dequantiser."""
    import dataclasses

    from bigkernels.triton._common import AOT_TARGETS, AOTCase, tuned_cases

    def first_per_arch(cs):
        seen, out = set(), []
        for c in cs:
            if c.arch not in seen:
                seen.add(c.arch)
                out.append(c)
        return out

    cases = []
    aligned = ("x_ptr", "idx_ptr", "cent_ptr", "bias_ptr", "out_ptr", "ws_ptr", "N", "K", "K_PER_SPLIT",
               "stride_xm", "stride_in", "stride_om")
    for small in (True, False):
        tuner = _MM_TUNED[small].kernel
        bucket = f"M{'<=' if small else '>'}{SMALL_M}"
        for dt in ("bf16", "fp32", "fp16"):
            sig = dict(x_ptr=f"*{dt}", idx_ptr="*u8", cent_ptr=f"*{dt}", bias_ptr=f"*{dt}", out_ptr=f"*{dt}",
                       ws_ptr="*fp32")
            for bits in ref.BITS:
                flags = dict(BITS=bits, SPLIT_K=4 if small else 1, HAS_BIAS=True, IEEE=dt == "fp32")
                full = tuned_cases(tuner, sig, flags, f"codebook_mm/{dt}/{bucket}/{bits}-bit", aligned=aligned)
                cases += full if dt != "fp16" and bits in (3, 4) else first_per_arch(full)
                if small and dt == "bf16" and bits == 4:
                    c0 = next(c for c in full if c.arch in AOT_TARGETS)
                    cases.append(dataclasses.replace(c0, constexprs=dict(c0.constexprs, SPLIT_K=1, HAS_BIAS=False),
                                                     aligned=None, note="no split, no bias, odd K and strides"))
    for arch in AOT_TARGETS:
        for dt in ("bf16", "fp32"):
            cases.append(AOTCase(_splitk_bias_kernel, dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=_EPILOGUE_BLOCK),
                                 dict(ws_ptr="*fp32", bias_ptr=f"*{dt}", out_ptr=f"*{dt}"), arch=arch,
                                 aligned=("ws_ptr", "bias_ptr", "out_ptr", "MN", "N"), vector_loads=4,
                                 group=f"codebook_mm/splitk_epilogue/{dt}"))
            for bits in ref.BITS:
                cases.append(AOTCase(_dequantize_kernel, dict(BITS=bits, BLOCK_N=32, BLOCK_K=128),
                                     dict(idx_ptr="*u8", cent_ptr=f"*{dt}", out_ptr=f"*{dt}"), arch=arch,
                                     group=f"codebook_dequantize/{dt}/{bits}-bit"))
    return cases
