"""Alias of ``longtune.integrations.quant`` (the family's module); kept so existing imports keep
working."""

import sys

from . import quant as _module

sys.modules[__name__] = _module
