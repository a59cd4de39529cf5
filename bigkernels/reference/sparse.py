"""Pure-PyTorch references of the sparse linear ops, and the compressed formats they read.

All compute ``out [M, N] = x [M, K] @ Wᵀ + bias`` for a pruned weight ``W [N, K]`` (rows are
output features), accumulating in fp32 and returning x's dtype, without storing W densely:

``csr_linear(x, crow, col, values, bias)``
    unstructured: CSR by output row. ``crow [N+1]`` int64 offsets, ``col [nnz]`` int32 input
    indices (ascending within a row), ``values [nnz]`` in the weight dtype.
``bsr_linear(x, crow, col, blocks, bias)``
    block-sparse: square ``B x B`` blocks, CSR over block rows. ``crow [N/B+1]`` int64,
    ``col [nnzb]`` int32 block-column indices (ascending), ``blocks [nnzb, B, B]``.
``sparse24_linear(x, values, meta, bias)``
    2:4: in every group of 4 consecutive inputs of a row, 2 weights are kept. ``values [N, K/2]``
    holds them in order; ``meta [N, K/4]`` uint8 holds their positions in the group, the first in
    bits 0-1 and the second in bits 2-3 (first < second).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _finish(out: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


# ----- formats ---------------------------------------------------------------------------------
def to_csr(w: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(crow int64, col int32, values) of the non-zeros of ``w [N, K]``."""
    nz = w != 0
    counts = nz.sum(dim=1)
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.cumsum(counts, 0)
    rows, cols = nz.nonzero(as_tuple=True)
    return crow, cols.to(torch.int32), w[rows, cols].contiguous()


def from_csr(crow: Tensor, col: Tensor, values: Tensor, k: int) -> Tensor:
    n = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:] - crow[:-1])
    w = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    w[rows, col.long()] = values
    return w


def to_bsr(w: Tensor, block: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(crow int64, col int32, blocks [nnzb, B, B]) of the non-zero ``block x block`` blocks."""
    n, k = w.shape
    if n % block or k % block:
        raise ValueError(f"to_bsr: block_size {block} must divide the weight shape {tuple(w.shape)}")
    tiles = w.reshape(n // block, block, k // block, block).transpose(1, 2)  # [nb, kb, B, B]
    nz = tiles.ne(0).flatten(2).any(dim=2)
    crow = torch.zeros(n // block + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.cumsum(nz.sum(dim=1), 0)
    rows, cols = nz.nonzero(as_tuple=True)
    return crow, cols.to(torch.int32), tiles[rows, cols].contiguous()


def from_bsr(crow: Tensor, col: Tensor, blocks: Tensor, k: int) -> Tensor:
    nb, b = crow.numel() - 1, blocks.shape[-1]
    rows = torch.repeat_interleave(torch.arange(nb, device=crow.device), crow[1:] - crow[:-1])
    tiles = torch.zeros(nb, k // b, b, b, dtype=blocks.dtype, device=blocks.device)
    tiles[rows, col.long()] = blocks
    return tiles.transpose(1, 2).reshape(nb * b, k)


def to_sparse24(w: Tensor) -> Tuple[Tensor, Tensor]:
    """(values [N, K/2], meta [N, K/4] uint8) of a weight with at most 2 non-zeros per group of 4
    (groups with fewer keep zeros at the lowest free positions)."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"to_sparse24: in_features must be a multiple of 4 for 2:4, got {k}")
    g = w.reshape(n, k // 4, 4)
    nonzero = g.ne(0)
    if int(nonzero.sum(dim=2).max()) > 2 if g.numel() else False:
        raise ValueError("to_sparse24: the weight has more than 2 non-zeros in a group of 4")
    # rank positions: non-zeros first (stable), then zeros; keep the first two, sorted by position
    order = torch.argsort((~nonzero).to(torch.int8) * 4 + torch.arange(4, device=w.device), dim=2)[..., :2]
    idx, _ = order.sort(dim=2)
    values = torch.gather(g, 2, idx).reshape(n, k // 2).contiguous()
    meta = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8).contiguous()
    return values, meta


def from_sparse24(values: Tensor, meta: Tensor) -> Tensor:
    n, half = values.shape
    idx = torch.stack(((meta & 3).long(), ((meta >> 2) & 3).long()), dim=2)  # [N, K/4, 2]
    g = torch.zeros(n, half // 2, 4, dtype=values.dtype, device=values.device)
    g.scatter_(2, idx, values.reshape(n, half // 2, 2))
    return g.reshape(n, half * 2)


# ----- ops -------------------------------------------------------------------------------------
def csr_linear(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = from_csr(crow, col, values, x.shape[1]).float()
    return _finish(x.float() @ w.T, bias, x.dtype)


def bsr_linear(x: Tensor, crow: Tensor, col: Tensor, blocks: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = from_bsr(crow, col, blocks, x.shape[1]).float()
    return _finish(x.float() @ w.T, bias, x.dtype)


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = from_sparse24(values, meta).float()
    return _finish(x.float() @ w.T, bias, x.dtype)
