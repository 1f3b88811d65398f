"""Drop-in nn.Modules."""
from .quant import RotatedQuantLinear  # noqa: F401
from .s2ft import S2FTLinear  # noqa: F401
from .sparse_delta import SparseDeltaLinear  # noqa: F401

__all__ = ["RotatedQuantLinear", "SparseDeltaLinear", "S2FTLinear"]
