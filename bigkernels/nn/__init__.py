"""Drop-in modules: QuantLinear (int8 weights) and SparseLinear (pruned, compressed) for nn.Linear;
KDLoss and functional.kd_loss / fused_linear_kd_loss (fused knowledge-distillation losses)."""
from bigkernels.nn import functional
from bigkernels.nn.kd_loss import KDLoss
from bigkernels.nn.quant_linear import QuantLinear
from bigkernels.nn.sparse_linear import SparseLinear

__all__ = ["KDLoss", "QuantLinear", "SparseLinear", "functional"]
