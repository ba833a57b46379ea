from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | megatron | sft
    seq_len: int = 2048  # tokens per sequence fed to the model
    batch_size: int = 4  # sequences per micro-batch per data-parallel rank
    path: Optional[str] = None  # dataset path / prefix (megatron, sft)
    # synthetic key-value retrieval task (see moba_train/data/synthetic.py)
    num_pairs: int = 32
    num_keys: int = 64
    num_values: int = 64
    num_queries: int = 32
