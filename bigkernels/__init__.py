"""bigkernels: drop-in fused optimizers, int8 quantised and sparse linear layers for PyTorch.

    import bigkernels as bk
    opt = bk.optim.FusedAdamW(model.parameters(), lr=1e-3)   # instead of torch.optim.AdamW
    bk.quantize_(model, mode="w8a8")                         # nn.Linear -> int8 QuantLinear
    bk.share_weights_(model, bits=4)                         # nn.Linear -> 4-bit CodebookLinear (k-means)
    bk.info()                                                # versions, CPU features, kernels per op
"""
from bigkernels import ops  # noqa: F401  (defines every torch.ops.bigkernels.* op, loads _C)
from bigkernels import distributed, nn, optim, quant, sparse
from bigkernels._info import info
from bigkernels.quant import quantize_, share_weights_
from bigkernels.sparse import prune_
from bigkernels import integrations as _integrations

_integrations.install()  # save_pretrained / from_pretrained of compressed HF models (transformers not imported here)

__version__ = "0.1.0"
__all__ = ["distributed", "info", "nn", "optim", "ops", "prune_", "quant", "quantize_", "share_weights_", "sparse",
           "__version__"]
