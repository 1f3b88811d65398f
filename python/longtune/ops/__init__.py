"""Typed wrappers over torch.ops.longtune.* plus their fake, autograd and FLOP registrations."""
from . import hadamard, quant, sparse_delta  # noqa: F401
