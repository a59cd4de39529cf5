"""Fused optimizers: drop-in replacements for torch.optim.Adam, AdamW, SGD, RMSprop and Adafactor,
a fused Lion, and AdamW8bit (AdamW with 8-bit blockwise-quantised moments)."""
from bigkernels.optim.adafactor import FusedAdafactor
from bigkernels.optim.adam import FusedAdam, FusedAdamW
from bigkernels.optim.adamw8bit import AdamW8bit
from bigkernels.optim.lion import FusedLion
from bigkernels.optim.rmsprop import FusedRMSprop
from bigkernels.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "FusedRMSprop", "FusedAdafactor", "FusedLion",
           "AdamW8bit"]
