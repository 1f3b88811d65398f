"""Training-time helpers: SpIEL sparse deltas and S²FT structured selection."""

from . import (
    s2ft,  # noqa: F401
    sparse,  # noqa: F401,E402  (alias of sparse_delta)
)
from .adapters import load_sparse_adapter, merge_and_unload, save_sparse_adapter  # noqa: F401,E402
from .chunkwise import seco_backward, seco_train_step  # noqa: F401
from .sparse_delta import SparseAdamW, SpIELScheduler, sparsify  # noqa: F401


def __getattr__(name):  # transformers is imported only when the Trainer callback is asked for
    if name in ("SpIELCallback", "LongtuneTrainer", "LongtuneSFTTrainer"):
        from ..integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
