"""bigkernels: drop-in fused optimizers, int8 quantised and sparse linear layers for PyTorch.

    import bigkernels as bk
    opt = bk.optim.FusedAdamW(model.parameters(), lr=1e-3)   # instead of torch.optim.AdamW
    bk.quantize_(model, mode="w8a8")                         # nn.Linear -> int8 QuantLinear
    bk.info()                                                # versions, CPU features, kernels per op
"""
from bigkernels import ops  # noqa: F401  (defines every torch.ops.bigkernels.* op, loads _C)
from bigkernels import nn, optim, quant, sparse
from bigkernels._info import info
from bigkernels.quant import quantize_
from bigkernels.sparse import prune_
from bigkernels import integrations as _integrations

_integrations.install()  # save_pretrained / from_pretrained of compressed HF models (transformers not imported here)

__version__ = "0.1.0"
__all__ = ["info", "nn", "optim", "ops", "prune_", "quant", "quantize_", "sparse", "__version__"]
