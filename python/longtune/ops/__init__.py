"""Typed wrappers over torch.ops.longtune.* plus their fake, autograd and FLOP registrations."""
from . import hadamard, quant  # noqa: F401
