from moba_train.data.config import DataConfig
from moba_train.data.loader import Loader, collate


def build_dataset(cfg: DataConfig, seed: int):
    """The dataset named by data.name: an indexable of {input_ids, labels[, doc_lens, positions]}."""
    if cfg.name == "synthetic":
        from moba_train.data.synthetic import NeedleRetrieval

        return NeedleRetrieval(cfg, seed)
    raise NotImplementedError(f"data.name={cfg.name!r} is not available in this build")


__all__ = ["DataConfig", "Loader", "build_dataset", "collate"]
