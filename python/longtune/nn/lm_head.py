"""Alias of ``longtune.nn.cross_entropy`` (the family's module); kept so existing imports keep
working."""

import sys

from . import cross_entropy as _module

sys.modules[__name__] = _module
