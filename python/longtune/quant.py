"""RoSTE quantization-aware fine-tuning at the model level (Hugging Face Llama / Qwen2):
``prepare_roste``, ``search_rotation_config``, ``export`` / ``load_exported``, ``RoSTEConfig``.
The kernels are ``longtune.rotate_fake_quant`` / ``longtune.quantize``."""

from .config import RoSTEConfig  # noqa: F401
from .integrations.quant import (  # noqa: F401
    export,
    load_exported,
    prepare_roste,
    search_rotation_config,
)

__all__ = ["RoSTEConfig", "prepare_roste", "search_rotation_config", "export", "load_exported"]
