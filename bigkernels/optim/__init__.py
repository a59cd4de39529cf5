"""Fused optimizers: drop-in replacements for torch.optim.Adam, AdamW and SGD, and AdamW8bit."""
from bigkernels.optim.adam import FusedAdam, FusedAdamW
from bigkernels.optim.adamw8bit import AdamW8bit
from bigkernels.optim.sgd import FusedSGD

__all__ = ["AdamW8bit", "FusedAdam", "FusedAdamW", "FusedSGD"]
