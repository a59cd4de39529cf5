"""Drop-in modules: QuantLinear (int8 weights) for nn.Linear."""
from bigkernels.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
