from typing import Optional

from moba_train.data.config import DataConfig
from moba_train.data.loader import Loader, collate


def build_dataset(cfg: DataConfig, seed: int, vocab_size: Optional[int] = None):
    """The dataset named by data.name: an indexable of {input_ids, labels[, doc_lens]}.

    Documents (doc_lens -> cu_seqlens) restart positions; the model derives them, so samples carry none.
    Finite datasets (megatron, sft) hold one pass over their data; the Loader takes further epochs.
    vocab_size: the model's, checked against the data's tokenizer.
    """
    if cfg.name == "megatron":
        from moba_train.data.megatron import MegatronData

        return MegatronData(cfg, seed, vocab_size)
    if cfg.name == "sft":
        from moba_train.data.sft import SFTDataset

        return SFTDataset(cfg, seed, vocab_size)
    if cfg.name == "synthetic":
        from moba_train.data.synthetic import NeedleRetrieval

        return NeedleRetrieval(cfg, seed)
    raise NotImplementedError(f"data.name={cfg.name!r} is not available in this build")


__all__ = ["DataConfig", "Loader", "build_dataset", "collate"]
