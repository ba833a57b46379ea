from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class SFTDataConfig:
    """SFT chat data (see moba_train/data/sft.py)."""

    tokenizer: Optional[str] = "byte"  # byte (built-in template, 260-token vocab) | a local HF tokenizer dir
    overlength: str = "drop"  # conversations longer than data.seq_len: drop | truncate
    pack: bool = True  # several conversations per row, separated by cu_seqlens
    shuffle: bool = True  # conversation order before packing (seeded by train.seed)
    num_synthetic: int = 512  # conversations of data.path=builtin:long_qa


@dataclass
class MegatronDataConfig:
    """Megatron indexed datasets (see moba_train/data/megatron.py); data.path holds the prefix or blend."""

    tokenizer: str = "byte"  # the one the data was prepared with: byte | path to a local HF tokenizer dir
    split: str = "100,0,0"  # train,valid,test document fractions (megatron-core); training reads train
    eod_mask_loss: bool = False  # no loss on targets after an end-of-document token
    cache_dir: Optional[str] = None  # index cache root, a subdir per data version; default <prefix dir>/index_cache
    mid_level_surplus: float = 0.005  # extra samples built per blended prefix (megatron-core)


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | megatron | sft
    seq_len: int = 2048  # tokens per sequence fed to the model
    batch_size: int = 4  # sequences per micro-batch per data-parallel rank
    path: Optional[str] = None  # dataset path / prefix (megatron, sft)
    # synthetic needle-retrieval task (see moba_train/data/synthetic.py)
    num_needles: int = 16  # groups: a document hides one needle of up to this many groups, asks them all at its end
    needle_values: int = 8  # values per group: chance loss is ln(needle_values)
    needle_run: int = 16  # each needle is written this many times in a row (salient enough to learn fast)
    min_doc_len: int = 0  # > 0: pack documents of log-uniform lengths in [min_doc_len, seq_len] per row
    # (a document of L tokens holds min(num_needles, L // (2 * (needle_run + 3))) needles)
    # staged sequence lengths: [{at: 0.0, seq_len: 32768}, ...] by fraction of train.steps; each divides seq_len
    # (see moba_train/train/seq_stages.py)
    seq_len_schedule: list[dict[str, Any]] = field(default_factory=list)
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    reset_at_eod: bool = False  # megatron: documents -> cu_seqlens (no attention across them), positions restart
    megatron: MegatronDataConfig = field(default_factory=MegatronDataConfig)
