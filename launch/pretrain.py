"""Pretraining entry point: `torchrun --nproc_per_node=N launch/pretrain.py +exp=tiny [key=value ...]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from moba_train.config import refuse_bad_out_dir, register_configs, to_config  # noqa: E402
from moba_train.errors import one_line_errors  # noqa: E402
from moba_train.parallel.dims import end_parallel  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from moba_train.train.trainer import Trainer

    with one_line_errors():
        Trainer(to_config(cfg)).train()
    end_parallel()


if __name__ == "__main__":
    refuse_bad_out_dir(sys.argv[1:])
    main()
