"""Drop-in modules: QuantLinear (int8 weights) and SparseLinear (pruned, compressed) for nn.Linear."""
from bigkernels.nn.quant_linear import QuantLinear
from bigkernels.nn.sparse_linear import SparseLinear

__all__ = ["QuantLinear", "SparseLinear"]
