"""Drop-in nn.Modules."""
from .quant import RotatedQuantLinear  # noqa: F401

__all__ = ["RotatedQuantLinear"]
