"""Drop-in nn.Modules."""

from .attention import S2Attention, SparseQueryAttention  # noqa: F401
from .cross_entropy import ChunkedLMHead  # noqa: F401
from .quant import RotatedQuantLinear  # noqa: F401
from .s2ft import S2FTMLP, S2FTLinear  # noqa: F401
from .sparse_delta import SparseDeltaLinear  # noqa: F401

__all__ = [
    "S2Attention",
    "SparseQueryAttention",
    "ChunkedLMHead",
    "RotatedQuantLinear",
    "SparseDeltaLinear",
    "S2FTLinear",
    "S2FTMLP",
]
