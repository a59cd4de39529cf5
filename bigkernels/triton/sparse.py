"""Triton kernels of the sparse linear ops, registered with ``torch.library.triton_op``.

Ops (``bigkernels`` namespace; same schemas and semantics as the kernel ops of
``bigkernels.ops.sparse``, formats and exact semantics in ``bigkernels.reference.sparse``), all
``out [M, N] = x [M, K] @ Wᵀ + bias`` with fp32 accumulation, returned in x's dtype:

``bsr_mm_triton(x, crow, col, blocks, bias)``  (the main one)
    Block-sparse GEMM that visits only the stored ``B x B`` blocks (B in 16, 32, 64, 128). A
    program owns one ``BLOCK_M x BLOCK_N`` output tile inside one block row of W (BLOCK_N = B, or a
    slice of it); it walks that block row's stored blocks (``crow`` / ``col``), loads the x tile at
    each block column and the block (K-major), and ``tl.dot``-s them into an fp32 accumulator; the
    epilogue adds the bias and casts. Programs are visited in grouped order (GROUP_M M tiles sweep
    the block rows together) so x tiles and blocks are reused from L2. Empty block rows give the
    bias (or 0). Autotuned on GPU per M bucket / N / density bucket (configs pruned by their
    estimated shared memory; fp32 / mixed dtypes have their own lists); some large-M configs take two
    stored blocks per step (PAIR: one dot of depth 2B over an x tile gathered from both block
    columns). For M <= 16 (decode) a variant with BLOCK_M = 16 splits every block row over N
    (BLOCK_N in 16..128, at most B), so
    each block row's weights are streamed by several programs and the GPU is filled; no reduction
    pass is needed since the split is over outputs.
``sparse24_mm_triton(x, values, meta, bias)``
    2:4 weights expanded tile by tile (each weight of a ``[BLOCK_K, BLOCK_N]`` tile is one masked
    gather from ``values`` at the position ``meta`` gives, 0 where pruned) and fed to a dense ``tl.dot``. It does the
    dense amount of maths (no sparse tensor cores, ``mma.sp``): a correctness / fallback path, not a
    fast one; the speed-up of 2:4 comes from the CUDA C++ (cuSPARSELt-style) kernels.
``csr_mm_triton(x, crow, col, values, bias)``
    Unstructured CSR: one program per (M tile, block of output rows) -- M tiles on grid axis 0 (up
    to 2^31 - 1), row blocks on axis 1 (65,535; more rows per program when N needs it); for each
    of its rows it gathers the x columns named by ``col`` and reduces in fp32 on CUDA cores. A
    fallback path.

Precision: when x and the weights share a dtype the tiles go to ``tl.dot`` as they are (fp32 with
``input_precision="ieee"``, so no TF32); when they differ both tiles are converted to fp32 (IEEE)
so that no weight precision is lost. Offsets into the formats are int64.

Index checks: shapes, dtypes and devices are always validated (``ValueError`` naming the argument,
what was expected and what was given). The *values* of ``crow`` / ``col`` (monotone offsets, block
columns in range) are checked on CPU tensors (interpreter) only: on a GPU that would cost a device
synchronisation per call; the formats built by ``bigkernels.reference.sparse`` are valid by
construction.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with one small fixed config (no
autotuning) chosen so that tiny test shapes cover several tiles, K remainders and the N-split path.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

# The shared launcher (_common.launcher: device guard, tracing wrapper) and host helpers.
from bigkernels.triton._common import (_INTERPRET, _Tuned, _check_runnable, _check_tensor, _check_vector, _dummy,
                                       _m_bucket, dtype_size, launch_tiled, tile_smem)
from bigkernels.triton._common import _traced as _launch
from bigkernels.triton.quant import _tile_ids

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot_acc(xt, wt, acc, TO_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + xt @ wt in fp32 (both tiles in fp32 with TO_FP32; IEEE fp32 products, no TF32)."""
    if TO_FP32:
        xt = xt.to(tl.float32)
        wt = wt.to(tl.float32)
    if IEEE:
        return tl.dot(xt, wt, acc=acc, input_precision="ieee")
    return tl.dot(xt, wt, acc=acc)


@triton.jit
def _bsr_kernel(x_ptr, crow_ptr, col_ptr, blk_ptr, bias_ptr, out_ptr,
                M, N, M_BUCKET, DENSITY, stride_xm, stride_om,
                HAS_BIAS: tl.constexpr, TO_FP32: tl.constexpr, IEEE: tl.constexpr, B: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, PAIR: tl.constexpr):
    """out[:, n0:n0+BLOCK_N] for one M tile: sum over the stored blocks (r, c) of block row
    r = n0 // B of x[:, c*B:(c+1)*B] @ block[p0:p0+BLOCK_N, :].T (p0 = n0 % B).

    With PAIR, two consecutive stored blocks go into one dot of depth 2B (the x tile gathered from
    their two block columns; the blocks are adjacent in memory), then an odd last block alone."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n0 = pid_n * BLOCK_N
    r = n0 // B
    p0 = n0 - r * B
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, B)
    offs_p = p0 + tl.arange(0, BLOCK_N)
    # Rows past the edge wrap (their results are never stored): x loads need no mask.
    offs_xm = (offs_m % M).to(tl.int64)
    start = tl.load(crow_ptr + r).to(tl.int64)
    count = (tl.load(crow_ptr + r + 1).to(tl.int64) - start).to(tl.int32)
    c_ptr = col_ptr + start
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PAIR:
        offs_k2 = tl.arange(0, 2 * B)
        hi = offs_k2 >= B  # second block of the pair
        kk = offs_k2 % B
        x_rows = x_ptr + offs_xm[:, None] * stride_xm + kk[None, :]  # [BLOCK_M, 2B] at block column 0
        w_ptrs = (blk_ptr + start * (B * B) + offs_p[None, :] * B + kk[:, None]
                  + hi.to(tl.int32)[:, None] * (B * B))  # [2B, BLOCK_N]: blocks i and i + 1, K-major
        for _ in range(0, count // 2):
            c0 = tl.load(c_ptr).to(tl.int64)
            c1 = tl.load(c_ptr + 1).to(tl.int64)
            xt = tl.load(x_rows + (tl.where(hi, c1, c0) * B)[None, :])
            wt = tl.load(w_ptrs)
            acc = _dot_acc(xt, wt, acc, TO_FP32, IEEE)
            c_ptr += 2
            w_ptrs += 2 * B * B
        if count % 2 == 1:
            c0 = tl.load(c_ptr).to(tl.int64)
            xt = tl.load(x_rows + c0 * B, mask=(offs_k2 < B)[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=(offs_k2 < B)[:, None], other=0.0)
            acc = _dot_acc(xt, wt, acc, TO_FP32, IEEE)
    else:
        x_rows = x_ptr + offs_xm[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, B] at block column 0
        w_ptrs = blk_ptr + start * (B * B) + offs_p[None, :] * B + offs_k[:, None]  # [B, BLOCK_N], K-major
        for _ in range(0, count):
            c = tl.load(c_ptr).to(tl.int64)
            xt = tl.load(x_rows + c * B)
            wt = tl.load(w_ptrs)
            acc = _dot_acc(xt, wt, acc, TO_FP32, IEEE)
            c_ptr += 1
            w_ptrs += B * B
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


@triton.jit
def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, bias_ptr, out_ptr,
                     M, N, K, M_BUCKET, stride_xm, stride_vn, stride_mn, stride_om,
                     HAS_BIAS: tl.constexpr, TO_FP32: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """out = x @ Wᵀ with W's [BLOCK_K, BLOCK_N] tiles rebuilt from values [N, K/2] + meta [N, K/4]."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_xm = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)
    group = offs_k // 4
    pos = (offs_k % 4)[:, None]  # position of each k inside its group of 4
    x_ptrs = x_ptr + offs_xm[:, None] * stride_xm + offs_k[None, :]
    m_ptrs = meta_ptr + offs_wn[None, :] * stride_mn + group[:, None]  # [BLOCK_K, BLOCK_N]
    v_ptrs = v_ptr + offs_wn[None, :] * stride_vn + 2 * group[:, None]  # first kept value of the group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Each weight of the tile is ONE masked gather: values[2 * group + (pos is the second kept
        # position)] where pos is kept, 0 elsewhere. The selection lives in the load's mask, so the
        # loaded tile goes to the dot as it is (no boolean select on dot operands, which Triton
        # 3.8 cannot lower for sm_8x: i1 tiles in shared memory) and it is half the loads of
        # reading both kept values everywhere.
        if EVEN_K:
            xt = tl.load(x_ptrs)
            mt = tl.load(m_ptrs).to(tl.int32)
            second = pos == ((mt >> 2) & 3)
            wt = tl.load(v_ptrs + second.to(tl.int32), mask=(pos == (mt & 3)) | second, other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            mt = tl.load(m_ptrs, mask=k_mask[:, None], other=0).to(tl.int32)
            second = pos == ((mt >> 2) & 3)
            wt = tl.load(v_ptrs + second.to(tl.int32), mask=((pos == (mt & 3)) | second) & k_mask[:, None],
                         other=0.0)
        acc = _dot_acc(xt, wt, acc, TO_FP32, IEEE)
        x_ptrs += BLOCK_K
        m_ptrs += BLOCK_K // 4
        v_ptrs += BLOCK_K // 2
    n_mask = offs_n < N
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _csr_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, bias_ptr, out_ptr, M, N, rows, stride_xm, stride_om,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m tile, n] for the ``rows`` output rows n of this program: gather x[:, col] and reduce.
    M tiles on grid axis 0 (up to 2^31 - 1 programs), row blocks on axis 1 (see _csr_grid)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_rows = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    o_rows = out_ptr + offs_m.to(tl.int64) * stride_om
    offs_k = tl.arange(0, BLOCK_K)
    n_start = pid_n * rows
    n_end = tl.minimum(n_start + rows, N)
    for n in range(n_start, n_end):
        start = tl.load(crow_ptr + n).to(tl.int64)
        nnz = (tl.load(crow_ptr + n + 1).to(tl.int64) - start).to(tl.int32)
        c_ptrs = col_ptr + start + offs_k
        v_ptrs = v_ptr + start + offs_k
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for j in range(0, nnz, BLOCK_K):
            k_mask = offs_k < nnz - j
            cols = tl.load(c_ptrs, mask=k_mask, other=0).to(tl.int64)
            vals = tl.load(v_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            xt = tl.load(x_rows + cols[None, :], mask=k_mask[None, :], other=0.0).to(tl.float32)
            acc += xt * vals[None, :]
            c_ptrs += BLOCK_K
            v_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + n).to(tl.float32)
        tl.store(o_rows + n, out.to(out_ptr.dtype.element_ty), mask=m_mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

BSR_BLOCK_SIZES = (16, 32, 64, 128)
BSR_SMALL_M = 16  # bsr_mm with M <= this splits block rows over N with 16-row M tiles
SPARSE24_SMALL_M = 16


def _cfg(stages, warps, **meta):
    return triton.Config(meta, num_stages=stages, num_warps=warps)


# Autotune lists. Every config the pruner keeps (shared-memory estimate within the device's
# limit, _common.smem_pruner) is compiled for sm_80 and sm_90 by tests/test_triton_aot.py (see
# aot_cases below). fp32 (and mixed-dtype) products are IEEE fp32 FMAs, not tensor cores: their
# lists hold moderate tiles (code size and compile time grow with the tile volume per thread,
# and fp32 tiles take twice the shared memory).
#
# bsr_mm, M > 16, 16-bit: BLOCK_N = B (one block row per program), (BLOCK_M, warps, stages, GROUP_M,
# PAIR). The 128/256-row tiles are the tensor-core ones for prefill, PAIR doubling the depth of
# each dot (2 blocks); 32/64 rows for medium batches; 2 stages for B = 128 on sm_80.
_BSR_LARGE_M = [(128, 4, 3, 8, False), (128, 8, 3, 8, False), (256, 8, 3, 8, False), (128, 8, 3, 8, True),
                (64, 4, 4, 8, False), (32, 4, 4, 8, False), (128, 4, 2, 8, False)]
# bsr_mm, M <= 16, 16-bit: (BLOCK_N, warps, stages); BLOCK_M = 16, BLOCK_N <= B.
_BSR_SMALL_M = [(16, 4, 4), (32, 4, 4), (64, 4, 4), (64, 4, 6), (128, 4, 4)]
# bsr_mm, fp32 / mixed: (BLOCK_M, BLOCK_N, warps, stages), BLOCK_N <= B (at most 64: a slice of the block).
_BSR_FP32_LARGE_M = [(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
_BSR_FP32_SMALL_M = [(16, 64, 4, 2), (16, 32, 4, 3)]
_BSR_KEY = ["M_BUCKET", "N", "DENSITY"]

_SPARSE24_LARGE_M = [
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(3, 8, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
]
_SPARSE24_SMALL_M = [
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1),
]
_SPARSE24_FP32_LARGE_M = [
    _cfg(3, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(3, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
]
_SPARSE24_FP32_SMALL_M = [
    _cfg(3, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1),
]
_SPARSE24_KEY = ["M_BUCKET", "N", "K"]


def _operand_size(named_args, kwargs, a: str, b: str) -> int:
    """Bytes per element of the dot operands: fp32 when converted (TO_FP32), else the larger input."""
    if kwargs.get("TO_FP32"):
        return 4
    return max(dtype_size(named_args[a]), dtype_size(named_args[b]))


def _sparse24_smem(config, named_args, kwargs) -> int:
    """Shared memory of a sparse24_mm config (the pruner's estimate, checked against Triton's
    allocation by tests/test_triton_aot.py): per stage the x, gathered weight and meta tiles, plus
    one weight tile as a dot operand."""
    size = _operand_size(named_args, kwargs, "x_ptr", "v_ptr")
    return (tile_smem(config, x=(("BLOCK_M", "BLOCK_K"), size), w=(("BLOCK_K", "BLOCK_N"), size),
                      meta=(("BLOCK_K", "BLOCK_N"), 1))
            + tile_smem(config, 1, w=(("BLOCK_K", "BLOCK_N"), size)))


def _bsr_smem(config, named_args, kwargs) -> int:
    """Shared memory of a bsr_mm config: per stage the x tile and the block slice (twice as deep
    with PAIR), plus one block slice as a dot operand."""
    size = _operand_size(named_args, kwargs, "x_ptr", "blk_ptr")
    depth = kwargs["B"] * (2 if config.kwargs.get("PAIR") else 1)
    return (tile_smem(config, x=(("BLOCK_M", depth), size), w=((depth, "BLOCK_N"), size))
            + tile_smem(config, 1, w=((depth, "BLOCK_N"), size)))


_SPARSE24_TUNED = {
    (small, fp32): _Tuned(_sparse24_kernel, cfgs, _SPARSE24_KEY, _sparse24_smem)
    for (small, fp32), cfgs in (((True, False), _SPARSE24_SMALL_M), ((False, False), _SPARSE24_LARGE_M),
                                ((True, True), _SPARSE24_FP32_SMALL_M), ((False, True), _SPARSE24_FP32_LARGE_M))}


@functools.lru_cache(maxsize=None)
def _bsr_tuned(block: int, small: bool, fp32: bool) -> _Tuned:
    """The autotuned bsr kernel for block size ``block`` (configs with BLOCK_N <= B only)."""
    if fp32:
        configs = [_cfg(s, w, BLOCK_M=bm, BLOCK_N=min(bn, block), GROUP_M=1 if small else 8, PAIR=False)
                   for bm, bn, w, s in (_BSR_FP32_SMALL_M if small else _BSR_FP32_LARGE_M)]
        configs = list({str(c): c for c in configs}.values())  # min(bn, B) can repeat a config
    elif small:
        configs = [_cfg(s, w, BLOCK_M=16, BLOCK_N=bn, GROUP_M=1, PAIR=False) for bn, w, s in _BSR_SMALL_M
                   if bn <= block]
    else:
        configs = [_cfg(s, w, BLOCK_M=bm, BLOCK_N=block, GROUP_M=g, PAIR=pair) for bm, w, s, g, pair in _BSR_LARGE_M]
    return _Tuned(_bsr_kernel, configs, _BSR_KEY, _bsr_smem)


if _INTERPRET:
    # One tiny config per op: 16-row tiles, and for small M an N split of 16 so B = 32 spans 2 programs.
    _BSR_INTERP = dict(BLOCK_M=16, GROUP_M=2)
    _BSR_INTERP_SMALL_N = 16
    _SPARSE24_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    _CSR_INTERP = dict(BLOCK_M=16, BLOCK_K=8)
    _CSR_INTERP_ROWS = 2
else:
    _SPARSE24_INTERP = None


# --------------------------------------------------------------------------------------------
# Host side: validation and launches
# --------------------------------------------------------------------------------------------

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_INDEX = (torch.int32, torch.int64)


def _concrete(t: Tensor) -> bool:
    """A real CPU tensor whose values can be read without a device sync (not fake/functional)."""
    return type(t) is torch.Tensor and t.device.type == "cpu"


def _check_crow(op: str, crow: Tensor, col: Tensor, n_rows: int, n_cols: int, what: str) -> None:
    """crow[0] == 0, non-decreasing, crow[-1] == len(col), 0 <= col < n_cols (CPU tensors only)."""
    if not (_concrete(crow) and _concrete(col)):
        return
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel():
        raise ValueError(f"{op}: crow must start at 0 and end at len(col) = {col.numel()}, got crow[0] = "
                         f"{int(crow[0])}, crow[-1] = {int(crow[-1])}")
    if n_rows and bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"{op}: crow must be non-decreasing (row offsets)")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        raise ValueError(f"{op}: col must hold {what} in [0, {n_cols}), got values in "
                         f"[{int(col.min())}, {int(col.max())}]")


def _check_common(op: str, x: Tensor, crow: Tensor, col: Tensor) -> None:
    _check_tensor(op, "x", x, 2, _FLOAT)
    _check_tensor(op, "crow", crow, 1, _INDEX, x.device)
    _check_tensor(op, "col", col, 1, _INDEX, x.device)
    if crow.numel() < 1:
        raise ValueError(f"{op}: crow must have at least 1 element (rows + 1 offsets), got 0")


def _compute_flags(x: Tensor, w: Tensor) -> dict:
    """Same dtypes: tl.dot on the tiles as they are; different: both in fp32. fp32 dots are IEEE."""
    to_fp32 = x.dtype != w.dtype
    return dict(TO_FP32=to_fp32, IEEE=to_fp32 or x.dtype == torch.float32)


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op("bigkernels::bsr_mm_triton", mutates_args=())
def bsr_mm_triton(x: Tensor, crow: Tensor, col: Tensor, blocks: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x [M, K] @ Wᵀ + bias`` for a block-sparse ``W [N, K]`` stored as BSR with ``B x B`` blocks."""
    op = "bsr_mm_triton"
    _check_common(op, x, crow, col)
    _check_tensor(op, "blocks", blocks, 3, _FLOAT, x.device)
    nnzb, b = blocks.shape[0], blocks.shape[-1]
    if blocks.shape[1] != b or b not in BSR_BLOCK_SIZES:
        raise ValueError(f"{op}: blocks must have shape [nnzb, B, B] with B in {BSR_BLOCK_SIZES}, "
                         f"got {tuple(blocks.shape)}")
    if col.numel() != nnzb:
        raise ValueError(f"{op}: col must have one entry per stored block ({nnzb}), got {col.numel()}")
    M, K = x.shape
    if K % b:
        raise ValueError(f"{op}: x's K = {K} must be a multiple of the block size {b}")
    n_block_rows = crow.numel() - 1
    N = n_block_rows * b
    if bias is not None:
        bias = _check_vector(op, "bias", bias, N, x.device, "one per output feature")
    _check_crow(op, crow, col, n_block_rows, K // b, "block columns")
    _check_runnable(op, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0 or nnzb == 0:  # nothing stored: only the bias
        out.copy_(bias.to(x.dtype).expand(M, N) if bias is not None else torch.zeros_like(out))
        return out
    x = _row_major(x)
    crow, col, blocks = crow.contiguous(), col.contiguous(), blocks.contiguous()
    dummy = _dummy(x.device)
    density = (16 * nnzb) // max(1, n_block_rows * (K // b))  # autotune key: sixteenths of density
    args = (x, crow, col, blocks, bias if bias is not None else dummy, out, M, N, _m_bucket(M), density,
            x.stride(0), out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, B=b, **_compute_flags(x, blocks))
    small = bool(M <= BSR_SMALL_M)  # bool: M may be symbolic (traced)
    fp32 = flags["IEEE"]
    if _INTERPRET:
        block_n = min(b, _BSR_INTERP_SMALL_N) if small else b
        grid = (triton.cdiv(M, _BSR_INTERP["BLOCK_M"]) * (N // block_n),)
        # M > 16 takes the paired-blocks loop and M <= 16 the single-block one, so both are tested.
        _launch(_bsr_kernel)[grid](*args, **flags, **_BSR_INTERP, BLOCK_N=block_n, PAIR=not small, num_warps=4)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * (N // meta["BLOCK_N"]),)

        _launch(_bsr_tuned(b, small, fp32).kernel)[grid](*args, **flags)
    return out


@triton_op("bigkernels::sparse24_mm_triton", mutates_args=())
def sparse24_mm_triton(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x [M, K] @ Wᵀ + bias`` for a 2:4 ``W [N, K]`` (values [N, K/2], meta [N, K/4] uint8).
    Dense maths on expanded tiles: a correctness / fallback path (no sparse tensor cores)."""
    op = "sparse24_mm_triton"
    _check_tensor(op, "x", x, 2, _FLOAT)
    _check_tensor(op, "values", values, 2, _FLOAT, x.device)
    _check_tensor(op, "meta", meta, 2, (torch.uint8,), x.device)
    M, K = x.shape
    N = values.shape[0]
    if K % 4:
        raise ValueError(f"{op}: x's K = {K} must be a multiple of 4 for 2:4 sparsity")
    if values.shape[1] * 2 != K:
        raise ValueError(f"{op}: values must have shape [N, K/2] = [{N}, {K // 2}], got {tuple(values.shape)}")
    if tuple(meta.shape) != (N, K // 4):
        raise ValueError(f"{op}: meta must have shape [N, K/4] = ({N}, {K // 4}), got {tuple(meta.shape)}")
    if bias is not None:
        bias = _check_vector(op, "bias", bias, N, x.device, "one per output feature")
    _check_runnable(op, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.copy_(bias.to(x.dtype).expand(M, N) if bias is not None else torch.zeros_like(out))
        return out
    x, values, meta = _row_major(x), _row_major(values), _row_major(meta)
    dummy = _dummy(x.device)
    args = (x, values, meta, bias if bias is not None else dummy, out, M, N, K, _m_bucket(M),
            x.stride(0), values.stride(0), meta.stride(0), out.stride(0))
    compute = _compute_flags(x, values)
    tuned = _SPARSE24_TUNED[(bool(M <= SPARSE24_SMALL_M), compute["IEEE"])]  # bool: M may be symbolic
    kdiv = _SPARSE24_INTERP["BLOCK_K"] if _INTERPRET else tuned.kdiv
    flags = dict(HAS_BIAS=bias is not None, EVEN_K=K % kdiv == 0, **compute)
    launch_tiled(_sparse24_kernel, tuned.kernel, _SPARSE24_INTERP, M, N, args, flags)
    return out


@triton_op("bigkernels::csr_mm_triton", mutates_args=())
def csr_mm_triton(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x [M, K] @ Wᵀ + bias`` for an unstructured ``W [N, K]`` in CSR by output row (fallback path)."""
    op = "csr_mm_triton"
    _check_common(op, x, crow, col)
    _check_tensor(op, "values", values, 1, _FLOAT, x.device)
    if values.numel() != col.numel():
        raise ValueError(f"{op}: values must have one entry per col entry ({col.numel()}), got {values.numel()}")
    M, K = x.shape
    N = crow.numel() - 1
    if bias is not None:
        bias = _check_vector(op, "bias", bias, N, x.device, "one per output feature")
    _check_crow(op, crow, col, N, K, "input columns")
    _check_runnable(op, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    x = _row_major(x)
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()
    dummy = _dummy(x.device)
    if _INTERPRET:
        meta, rows = dict(_CSR_INTERP), _CSR_INTERP_ROWS
    else:
        meta, rows = _csr_meta(M, col.numel() // N)
    grid, rows = _csr_grid(M, N, meta["BLOCK_M"], rows)
    _launch(_csr_kernel)[grid](x, crow, col, values, bias if bias is not None else dummy, out, M, N, rows,
                               x.stride(0), out.stride(0), HAS_BIAS=bias is not None, **meta, num_warps=4)
    return out


def _csr_meta(M: int, avg_nnz: int):
    """(BLOCK_M / BLOCK_K meta, output rows per program) of csr_mm on a GPU."""
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(M))), BLOCK_K=32 if avg_nnz <= 32 else 64), 4


_GRID_Y_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2^31 - 1)


def _csr_grid(M: int, N: int, block_m: int, rows: int):
    """((grid axis 0, grid axis 1), rows per program): M tiles on axis 0, blocks of output rows on
    axis 1, with more rows per program when N / rows would exceed axis 1's limit."""
    rows = max(rows, triton.cdiv(N, _GRID_Y_MAX))
    return (triton.cdiv(M, block_m), triton.cdiv(N, rows)), rows


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# --------------------------------------------------------------------------------------------

def aot_cases():
    """The AOT compile cases of this module's kernels (convention: bigkernels/triton/_common.py).

    Every config each autotuner's pruner keeps: bf16 and fp32 for sparse24_mm, bf16 and fp32 for
    bsr_mm at B = 128 (the block size whose tiles and shared memory are largest); the other block
    sizes compile the first kept config per target, and so do fp16 (bf16's code shape and sizes),
    mixed dtypes (at B = 128) and masked K. csr_mm: the host's BLOCK_M / BLOCK_K choices."""
    import dataclasses

    from bigkernels.triton._common import AOT_TARGETS, AOTCase, tuned_cases
    from bigkernels.triton.quant import _first_per_arch

    cases = []
    s24_aligned = ("x_ptr", "v_ptr", "meta_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_xm", "stride_vn",
                   "stride_mn", "stride_om")
    for (small, fp32), tuned in _SPARSE24_TUNED.items():
        bucket = f"M{'<=' if small else '>'}{SPARSE24_SMALL_M}"
        combos = ((("fp32", "fp32"), ("bf16", "fp32"), ("fp32", "fp16")) if fp32 else
                  (("bf16", "bf16"), ("fp16", "fp16")))
        for i, (xt, vt) in enumerate(combos):
            sig = dict(x_ptr=f"*{xt}", v_ptr=f"*{vt}", meta_ptr="*u8", bias_ptr="*fp32", out_ptr=f"*{xt}")
            flags = dict(HAS_BIAS=True, TO_FP32=xt != vt, IEEE=fp32, EVEN_K=True)
            full = tuned_cases(tuned.kernel, sig, flags, f"sparse24_mm/{xt}x{vt}/{bucket}", aligned=s24_aligned)
            cases += full if i == 0 else _first_per_arch(full)
            if i == 0:
                cases += [dataclasses.replace(c, constexprs=dict(c.constexprs, EVEN_K=False), aligned=None,
                                             note="masked K, odd K and strides")
                          for c in _first_per_arch(c for c in full if c.arch in AOT_TARGETS)]

    bsr_aligned = ("x_ptr", "crow_ptr", "col_ptr", "blk_ptr", "bias_ptr", "out_ptr", "N", "stride_xm", "stride_om")
    for b in BSR_BLOCK_SIZES:
        for small in (True, False):
            bucket = f"M{'<=' if small else '>'}{BSR_SMALL_M}"
            for fp32 in (False, True):
                tuned = _bsr_tuned(b, small, fp32)
                combos = (("fp32", "fp32"), ("bf16", "fp32")) if fp32 else (("bf16", "bf16"), ("fp16", "fp16"))
                if b != max(BSR_BLOCK_SIZES):
                    combos = combos[:1]
                for i, (xt, wt) in enumerate(combos):
                    sig = dict(x_ptr=f"*{xt}", crow_ptr="*i64", col_ptr="*i64", blk_ptr=f"*{wt}", bias_ptr="*fp32",
                               out_ptr=f"*{xt}")
                    flags = dict(HAS_BIAS=True, TO_FP32=xt != wt, IEEE=fp32, B=b)
                    full = tuned_cases(tuned.kernel, sig, flags, f"bsr_mm/B{b}/{xt}x{wt}/{bucket}",
                                       aligned=bsr_aligned)
                    every = i == 0 and b == max(BSR_BLOCK_SIZES)
                    cases += full if every else _first_per_arch(full)

    for arch in AOT_TARGETS:
        for xt, vt in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
            for block_m, block_k in ((64, 64), (16, 32)):
                cases.append(AOTCase(_csr_kernel, dict(HAS_BIAS=True, BLOCK_M=block_m, BLOCK_K=block_k),
                                     dict(x_ptr=f"*{xt}", crow_ptr="*i64", col_ptr="*i64", v_ptr=f"*{vt}",
                                          bias_ptr="*fp32", out_ptr=f"*{xt}"),
                                     arch=arch, group=f"csr_mm/{xt}x{vt}"))
    return cases
