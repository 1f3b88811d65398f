"""Training-time helpers (SpIEL sparse deltas; more families to come)."""
from .sparse import SparseAdamW, SpIELScheduler, sparsify  # noqa: F401
