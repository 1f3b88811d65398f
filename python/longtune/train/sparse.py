"""Alias of ``longtune.train.sparse_delta`` (the family's module); kept so existing imports keep
working."""

import sys

from . import sparse_delta as _module

sys.modules[__name__] = _module
