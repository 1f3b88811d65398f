"""longtune: hand-written C++/CUDA kernels for long-context and parameter-efficient fine-tuning.

Importing the package loads the compiled ops into ``torch.ops.longtune`` and registers their
fake (meta) kernels, autograd formulas and FLOP counters.
"""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

import torch  # noqa: F401  (must be imported before the extension)

from . import (  # noqa: F401
    _C,  # noqa: F401  (registers torch.ops.longtune.*)
    compat,  # noqa: E402,F401
    config,  # noqa: E402,F401
    nn,  # noqa: E402,F401
    ops,
    quant,  # noqa: E402,F401
    recipes,  # noqa: E402,F401
    reference,
    train,  # noqa: E402,F401
)
from .integrations.apply import apply  # noqa: E402,F401
from .integrations.hf import convert_to_sqa, patch, unpatch  # noqa: E402,F401
from .ops.attention import sparse_attention
from .ops.cross_entropy import LinearCrossEntropyOutput, linear_cross_entropy
from .ops.hadamard import hadamard_matrix, hadamard_transform
from .ops.mask import AttentionMask
from .ops.quant import dequantize, quantize, quantize_weight, rotate_fake_quant
from .train.sparse_delta import sparsify  # noqa: E402,F401

__all__ = [
    "sparse_attention",
    "AttentionMask",
    "linear_cross_entropy",
    "LinearCrossEntropyOutput",
    "hadamard_transform",
    "hadamard_matrix",
    "rotate_fake_quant",
    "quantize",
    "dequantize",
    "quantize_weight",
    "nn",
    "quant",
    "train",
    "sparsify",
    "ops",
    "reference",
    "has_cuda_kernels",
    "has_emulator",
    "patch",
    "unpatch",
    "convert_to_sqa",
    "recipes",
    "compat",
    "config",
    "apply",
]


def has_cuda_kernels() -> bool:
    """True when this build registered CUDA kernels (compiled with nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("longtune::hadamard_transform", "CUDA")


def has_emulator() -> bool:
    """True when this build carries the CPU emulator of the CUDA kernels
    (torch.ops.longtune_emu)."""
    return hasattr(torch.ops, "longtune_emu") and hasattr(
        torch.ops.longtune_emu, "hadamard_transform"
    )
