"""Input checks shared by the drop-in linear modules (the errors nn.Linear users expect)."""
from torch import Tensor


def check_linear_input(owner: str, x, in_features: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{owner}: expected a floating-point input tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{owner}: expected input with last dimension in_features={in_features}, "
                         f"got shape {tuple(x.shape)}")
