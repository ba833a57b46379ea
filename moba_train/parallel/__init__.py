"""Parallelism applied to a plain model by functions; the model itself never sees process groups."""

import torch.nn as nn

from typing import TYPE_CHECKING
from moba_train.parallel.dims import ParallelDims, init_parallel

if TYPE_CHECKING:
    from moba_train.config import Config


def parallelize(model: nn.Module, cfg: "Config", dims: ParallelDims) -> nn.Module:
    """Context parallel, activation checkpointing, compile, FSDP2 — in that order."""
    if dims.world_size > 1:
        raise NotImplementedError("multi-process training lands with the distributed issue")
    return model


__all__ = ["ParallelDims", "init_parallel", "parallelize"]
