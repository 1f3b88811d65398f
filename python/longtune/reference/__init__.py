"""Pure-PyTorch references: the executable spec every kernel is tested against."""

from . import (
    attention,  # noqa: F401,E402
    quant,  # noqa: F401
)
from .hadamard import hadamard_matrix, hadamard_transform  # noqa: F401
