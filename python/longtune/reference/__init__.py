"""Pure-PyTorch references: the executable spec every kernel is tested against."""
from .hadamard import hadamard_matrix, hadamard_transform  # noqa: F401
