"""Drop-in modules: QuantLinear (int8 weights), SparseLinear (pruned, compressed) and CodebookLinear
(weight-shared) for nn.Linear."""
from bigkernels.nn.codebook_linear import CodebookLinear
from bigkernels.nn.quant_linear import QuantLinear
from bigkernels.nn.sparse_linear import SparseLinear

__all__ = ["CodebookLinear", "QuantLinear", "SparseLinear"]
