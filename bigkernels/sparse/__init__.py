"""Pruning: masks (magnitude, Wanda; unstructured, N:M, block), prune_(), GradualPruner."""
from bigkernels.sparse.masks import block_mask, make_mask, nm_mask, score, unstructured_mask
from bigkernels.sparse.prune import GradualPruner, prune_, sparsify_

__all__ = ["GradualPruner", "block_mask", "make_mask", "nm_mask", "prune_", "score", "sparsify_", "unstructured_mask"]
