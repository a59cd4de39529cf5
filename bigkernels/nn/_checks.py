"""Input checks shared by the drop-in linear modules (the errors nn.Linear users expect)."""
import torch
from torch import Tensor

# Float dtypes the compressed layers' kernels compute in (float64 has no kernel: keep such
# layers as they are, or cast the model to float32 first).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_weight_dtype(owner: str, dtype: torch.dtype) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{owner}: weights of dtype {str(dtype).replace('torch.', '')} are not supported "
                        f"(expected {_names(KERNEL_DTYPES)}); cast the layer (e.g. model.float()) first")


def check_linear_input(owner: str, x, in_features: int) -> None:
    # (one test for the usual case: this runs on every call of layers that take ~100 us at M = 1)
    if isinstance(x, Tensor) and x.dtype in KERNEL_DTYPES and x.dim() and x.shape[-1] == in_features:
        return
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{owner}: expected a floating-point input tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{owner}: expected an input of dtype {_names(KERNEL_DTYPES)}, got "
                        f"{str(x.dtype).replace('torch.', '')}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{owner}: expected input with last dimension in_features={in_features}, "
                         f"got shape {tuple(x.shape)}")
