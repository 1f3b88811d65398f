"""Compatibility layers that reproduce other libraries' exact numerical contracts on longtune's
kernels.

``longtune.compat.fast_hadamard_transform``: the Python interface of the ``fast-hadamard-transform``
package (``hadamard_transform`` and ``hadamard_transform_12N / _20N / _28N / _40N``) with its
defaults, its fixed factor matrices and its composition order.
"""

from . import fast_hadamard_transform  # noqa: F401

__all__ = ["fast_hadamard_transform"]
