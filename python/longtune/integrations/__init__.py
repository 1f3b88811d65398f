"""Glue to Hugging Face transformers / peft: attention patching (hf), LM-Infinite generation
(lm_infinite), RoSTE quantization-aware training (quant; alias roste)."""
