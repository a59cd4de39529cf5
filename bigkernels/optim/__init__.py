"""Fused optimizers: drop-in replacements for torch.optim.Adam, AdamW and SGD."""
from bigkernels.optim.adam import FusedAdam, FusedAdamW
from bigkernels.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD"]
