"""Training-time helpers: SpIEL sparse deltas and S²FT structured selection."""
from . import s2ft  # noqa: F401
from .sparse import SparseAdamW, SpIELScheduler, sparsify  # noqa: F401
from .chunkwise import seco_backward, seco_train_step  # noqa: F401
