"""Typed wrappers over torch.ops.longtune.* plus their fake, autograd and FLOP registrations."""

from . import attention, cross_entropy, hadamard, quant, sparse_delta  # noqa: F401
