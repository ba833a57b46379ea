from moba_train.model.config import AttentionConfig, ModelConfig, layer_kinds
from moba_train.model.llama import IGNORE_INDEX, Llama

__all__ = ["AttentionConfig", "IGNORE_INDEX", "Llama", "ModelConfig", "layer_kinds"]
