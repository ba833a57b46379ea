"""MoBA inside Hugging Face transformers: `register_moba()`, then `attn_implementation="moba"`."""

from moba_train.hf.register import NAMES, MobaSettings, register_moba

__all__ = ["MobaSettings", "NAMES", "register_moba"]
