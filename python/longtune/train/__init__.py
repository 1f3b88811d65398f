"""Training-time helpers (SpIEL sparse deltas; more families to come)."""
from .sparse import SparseAdamW, sparsify  # noqa: F401
