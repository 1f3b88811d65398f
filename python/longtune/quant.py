"""RoSTE quantization-aware fine-tuning at the model level (Hugging Face Llama / Qwen2):
``prepare_roste``, ``search_rotation_config``, ``export`` / ``load_exported``, ``RoSTEConfig``.
The kernels are ``longtune.rotate_fake_quant`` / ``longtune.quantize``."""

from .integrations.quant import (  # noqa: F401
    RoSTEConfig,
    export,
    load_exported,
    prepare_roste,
    search_rotation_config,
)

__all__ = ["RoSTEConfig", "prepare_roste", "search_rotation_config", "export", "load_exported"]
