from moba_train.model.config import AttentionConfig, ModelConfig, layer_kinds
from moba_train.model.llama import IGNORE_INDEX, Llama
from moba_train.model.hf import from_hf, to_hf
from moba_train.model.pretrained import load_pretrained

__all__ = ["AttentionConfig", "IGNORE_INDEX", "Llama", "ModelConfig", "from_hf", "layer_kinds", "load_pretrained",
           "to_hf"]
