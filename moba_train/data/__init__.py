from typing import Optional

from moba_train.data.config import DataConfig
from moba_train.data.loader import Loader, collate


def build_dataset(cfg: DataConfig, seed: int, num_samples: Optional[int] = None, vocab_size: Optional[int] = None):
    """The dataset named by data.name: an indexable of {input_ids, labels[, doc_lens]}.

    Documents (doc_lens -> cu_seqlens) restart positions; the model derives them, so samples carry none.

    num_samples: global samples the run will draw (steps x global batch); finite datasets (megatron) build
    their sample index for that many. vocab_size: the model's, checked against the data's tokenizer.
    """
    if cfg.name == "megatron":
        from moba_train.data.megatron import MegatronData

        return MegatronData(cfg, seed, num_samples, vocab_size)
    if cfg.name == "sft":
        from moba_train.data.sft import SFTDataset

        return SFTDataset(cfg, seed, vocab_size)
    if cfg.name == "synthetic":
        from moba_train.data.synthetic import NeedleRetrieval

        return NeedleRetrieval(cfg, seed)
    raise NotImplementedError(f"data.name={cfg.name!r} is not available in this build")


__all__ = ["DataConfig", "Loader", "build_dataset", "collate"]
