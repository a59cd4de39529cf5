"""Pure-PyTorch references of the codebook (weight-sharing) ops: the semantics every kernel
reproduces, and the fallback where no compiled kernel exists.

Format of a weight-shared linear layer ``W [N, K]`` (N = out_features, K = in_features):

- ``centroids [G, C]`` (float; C = 2**bits, bits in {2, 3, 4, 8}): group ``g`` holds the codebook
  of output rows ``[g * group_size, (g + 1) * group_size)``; G = ceil(N / group_size) (the last
  group may be shorter). One codebook per layer is ``group_size = N``.
- ``indices [N, P]`` uint8: row ``n`` is a little-endian bit stream in which the index of
  ``W[n, k]`` occupies bits ``[bits * k, bits * (k + 1))`` (bit i of byte j is stream bit 8j + i),
  padded with zero bits to whole units:

  ====  ===================  ================================================  =====================
  bits  unit                 layout                                            P (bytes per row)
  ====  ===================  ================================================  =====================
  8     1 index, 1 byte      byte k = index k                                  K
  4     2 indices, 1 byte    low nibble = index 2j, high nibble = index 2j+1   ceil(K / 2)
  2     4 indices, 1 byte    bits 2t..2t+1 of byte j = index 4j + t            ceil(K / 4)
  3     8 indices, 3 bytes   bits 3t..3t+2 of the 24-bit little-endian word    3 * ceil(K / 8)
                             b[3j] | b[3j+1] << 8 | b[3j+2] << 16 = index 8j+t
  ====  ===================  ================================================  =====================

  so 3-bit weights take exactly 3 bits each (8 indices in 3 bytes), never a padded nibble.
- ``W[n, k] = centroids[n // group_size, index(n, k)]``.

Ops: ``codebook_dequantize(indices, centroids, in_features, group_size) -> W [N, K]`` (centroids'
dtype), ``codebook_mm(x [M, K], indices, centroids, bias, group_size) -> [M, N]``: ``x @ W.T +
bias`` with fp32 accumulation, in x's dtype, ``codebook_quantize(weight, centroids, group_size)
-> indices`` (each weight's nearest centroid: the number of midpoints ``(c[j] + c[j+1]) / 2``,
computed in fp32, strictly below the weight; centroids ascending per codebook) and
``codebook_centroid_grad(grad_w, indices, centroids, group_size) -> [G, C]`` (the sum of
``grad_w`` over the weights tied to each centroid).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

BITS = (2, 3, 4, 8)
# bits -> (indices per unit, bytes per unit)
_UNIT = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}


def bits_of(centroids: Tensor) -> int:
    """The index width of a codebook [G, 2**bits]; ValueError if it has another size."""
    c = centroids.shape[-1] if centroids.dim() == 2 else -1
    for b in BITS:
        if c == 1 << b:
            return b
    raise ValueError(f"centroids must have shape [groups, 2**bits] with bits in {BITS} "
                     f"(4, 8, 16 or 256 columns), got shape {tuple(centroids.shape)}")


def packed_cols(in_features: int, bits: int) -> int:
    """Bytes per packed row of ``in_features`` indices of ``bits`` bits."""
    if bits not in _UNIT:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    per, nbytes = _UNIT[bits]
    return -(-in_features // per) * nbytes


def num_groups(out_features: int, group_size: int) -> int:
    return max(1, -(-out_features // group_size)) if out_features else 1


def pack_indices(idx: Tensor, bits: int) -> Tensor:
    """Pack integer indices ``idx [N, K]`` (values < 2**bits) into ``[N, packed_cols(K, bits)]`` uint8."""
    n, k = idx.shape
    per, nbytes = _UNIT[bits]
    units = -(-k // per)
    full = torch.zeros((n, units * per), dtype=torch.int32, device=idx.device)
    full[:, :k] = idx.to(torch.int32)
    full = full.reshape(n, units, per)
    shifts = torch.arange(per, device=idx.device, dtype=torch.int32) * bits
    word = (full << shifts).sum(dim=-1, dtype=torch.int32)  # disjoint bit fields: sum == or
    if nbytes == 1:
        return word.to(torch.uint8)
    byte_shifts = torch.arange(nbytes, device=idx.device, dtype=torch.int32) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, units * nbytes)


def unpack_indices(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """The inverse of :func:`pack_indices`: ``[N, in_features]`` int64 indices."""
    n = packed.shape[0]
    per, nbytes = _UNIT[bits]
    units = packed.shape[1] // nbytes
    p = packed.to(torch.int32)
    if nbytes > 1:
        p = p.reshape(n, units, nbytes)
        p = (p << (torch.arange(nbytes, device=p.device, dtype=torch.int32) * 8)).sum(dim=-1, dtype=torch.int32)
    shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
    idx = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return idx.reshape(n, units * per)[:, :in_features].long()


def group_of_rows(out_features: int, group_size: int, device) -> Tensor:
    return torch.arange(out_features, device=device) // group_size


def codebook_dequantize(indices: Tensor, centroids: Tensor, in_features: int, group_size: int) -> Tensor:
    """The dense weight ``[N, in_features]`` in centroids' dtype."""
    bits = bits_of(centroids)
    idx = unpack_indices(indices, bits, in_features)
    rows = centroids.index_select(0, group_of_rows(indices.shape[0], group_size, centroids.device))
    return torch.gather(rows, 1, idx)


def midpoints(centroids: Tensor) -> Tensor:
    """fp32 midpoints [G, C - 1] between consecutive centroids; ValueError unless they ascend."""
    c = centroids.float()
    if bool((c[:, 1:] < c[:, :-1]).any()) or bool(torch.isnan(c).any()):
        raise ValueError("codebook_quantize: the centroids of each codebook must be sorted ascending (and not NaN)")
    return (c[:, :-1] + c[:, 1:]) * 0.5


def codebook_quantize(weight: Tensor, centroids: Tensor, group_size: int) -> Tensor:
    """Packed indices [N, packed] uint8 of each weight's nearest centroid in its row's codebook."""
    bits = bits_of(centroids)
    mids = midpoints(centroids)
    rows = mids.index_select(0, group_of_rows(weight.shape[0], group_size, mids.device))
    idx = torch.searchsorted(rows.contiguous(), weight.float().contiguous())
    return pack_indices(idx, bits)


def codebook_mm(x: Tensor, indices: Tensor, centroids: Tensor, bias: Optional[Tensor], group_size: int) -> Tensor:
    """``x @ W.T + bias`` for the codebook weight W, fp32 accumulation, in x's dtype."""
    w = codebook_dequantize(indices, centroids, x.shape[1], group_size).float()
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)


def centroid_grad(grad_w: Tensor, indices: Tensor, centroids: Tensor, group_size: int) -> Tensor:
    """d loss / d centroids from the gradient of the dense weight ``grad_w [N, K]``: the sum of
    grad_w over the weights that share each centroid (fp32 sums), in centroids' dtype."""
    bits = bits_of(centroids)
    g, c = centroids.shape
    idx = unpack_indices(indices, bits, grad_w.shape[1])
    slot = idx + (group_of_rows(grad_w.shape[0], group_size, idx.device) * c).unsqueeze(1)
    out = torch.zeros(g * c, dtype=torch.float32, device=grad_w.device)
    out.index_add_(0, slot.reshape(-1), grad_w.float().reshape(-1))
    return out.reshape(g, c).to(centroids.dtype)
