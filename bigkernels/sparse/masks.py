"""Pruning masks: scores (magnitude, Wanda) and patterns (unstructured, N:M, square blocks).

A mask is a bool tensor shaped like the weight [out, in]; True keeps the weight. Every pattern
prunes an exact amount: ``round(sparsity * count)`` elements (unstructured) or blocks (block);
N:M keeps exactly N of every M consecutive inputs of a row.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

PATTERNS = ("unstructured", "block")  # plus "N:M" strings such as "2:4"
METHODS = ("magnitude", "wanda")


def parse_nm(pattern: str):
    """(n, m) for an "N:M" pattern string, else None."""
    if ":" not in pattern:
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r}: expected 'N:M' with integers, e.g. '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: expected 0 < N < M")
    return n, m


def check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS and parse_nm(pattern) is None:
        raise ValueError(f"pattern must be 'unstructured', 'block' or 'N:M' such as '2:4', got {pattern!r}")


def misfit(pattern: str, block_size: int, out_features: int, in_features: int) -> Optional[str]:
    """Why a layer of this shape cannot be pruned with ``pattern`` (None if it can)."""
    nm = parse_nm(pattern)
    if nm is not None and in_features % nm[1]:
        return f"{pattern} needs in_features divisible by {nm[1]}, got {in_features}"
    if pattern == "block" and (out_features % block_size or in_features % block_size):
        return f"block_size {block_size} does not divide the weight shape ({out_features}, {in_features})"
    return None


def sparse_format(pattern: str) -> str:
    """The SparseLinear format a weight pruned with ``pattern`` fits: "2:4" for N:M patterns that
    keep at most 2 of every aligned 4 inputs (1:2, 1:4, 2:4, 2:8, ...), "block" for block,
    "unstructured" (CSR) for everything else."""
    nm = parse_nm(pattern)
    if nm is None:
        return pattern
    n, m = nm
    if (4 % m == 0 and n * (4 // m) <= 2) or (m % 4 == 0 and n <= 2):
        return "2:4"
    return "unstructured"


def check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def score(weight: Tensor, method: str = "magnitude", act_norm: Optional[Tensor] = None) -> Tensor:
    """|W| (magnitude) or |W| * ||X_j|| (Wanda: the L2 norm of input feature j over calibration tokens)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s = weight.detach().float().abs()
    if method == "wanda":
        if act_norm is None:
            raise ValueError("method='wanda' needs the input activation norms (pass calibration_data)")
        s = s * act_norm.float().to(s.device).unsqueeze(0)
    return s


def _keep_top(scores: Tensor, n_prune: int) -> Tensor:
    """Mask keeping all but the n_prune lowest scores (ties broken by position)."""
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(flat, n_prune, largest=False, sorted=False).indices] = False
    return keep.view_as(scores)


def unstructured_mask(scores: Tensor, sparsity: float) -> Tensor:
    check_sparsity(sparsity)
    return _keep_top(scores, round(sparsity * scores.numel()))


def nm_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep the n highest of every m consecutive inputs of each row (in_features % m == 0)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def block_mask(scores: Tensor, sparsity: float, block_size: int) -> Tensor:
    """Prune the round(sparsity * blocks) square blocks with the lowest summed score."""
    check_sparsity(sparsity)
    rows, cols = scores.shape
    if block_size <= 0 or rows % block_size or cols % block_size:
        raise ValueError(f"block_size {block_size} must divide the weight shape ({rows}, {cols})")
    b = block_size
    block_scores = scores.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))
    keep = _keep_top(block_scores, round(sparsity * block_scores.numel()))
    return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)


def make_mask(scores: Tensor, pattern: str, sparsity: float, block_size: int = 64) -> Tensor:
    check_pattern(pattern)
    nm = parse_nm(pattern)
    if nm is not None:
        return nm_mask(scores, *nm)
    if pattern == "block":
        return block_mask(scores, sparsity, block_size)
    return unstructured_mask(scores, sparsity)


def global_unstructured_masks(scores: Dict[str, Tensor], sparsity: float) -> Dict[str, Tensor]:
    """One threshold over all layers' scores: exactly round(sparsity * total) weights pruned overall."""
    check_sparsity(sparsity)
    names = list(scores)
    flat = torch.cat([scores[n].flatten().cpu() for n in names])
    keep = _keep_top(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view_as(scores[n]).to(scores[n].device)
        start += size
    return out
