"""Parallelism applied to a plain model by functions; the model itself never sees process groups."""

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from moba_train.parallel.ac import apply_ac
from moba_train.parallel.compile import apply_compile
from moba_train.parallel.cp import apply_cp, shard_batch
from moba_train.parallel.dims import ParallelDims, init_parallel
from moba_train.parallel.fsdp import apply_fsdp, clip_grad_norm

if TYPE_CHECKING:
    from moba_train.config import Config


def parallelize(model: nn.Module, cfg: "Config", dims: ParallelDims) -> nn.Module:
    """Context parallel, activation checkpointing, compile, FSDP2 — in that order.

    FSDP2 shards over dp_shard x cp (HSDP over dp_replicate); on GPU parameters compute in bf16 and gradients
    reduce in fp32.
    """
    if dims.cp > 1:
        apply_cp(model, dims.cp_group, dims.cp, dims.cp_rank, dims.cp_mode)
    apply_ac(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(model)
    if dims.world_size > 1:
        on_gpu = next(model.parameters()).is_cuda
        apply_fsdp(model, dims.fsdp_mesh, torch.bfloat16 if on_gpu else None, torch.float32 if on_gpu else None)
    return model


def shard_micro_batch(batch: dict, dims: ParallelDims) -> dict:
    """This rank's share of a micro-batch along the sequence (global cu_seqlens and positions kept)."""
    if dims.cp == 1:
        return batch
    return shard_batch(batch, dims.cp, dims.cp_rank, dims.cp_mode)


__all__ = ["ParallelDims", "apply_ac", "apply_compile", "apply_cp", "apply_fsdp", "clip_grad_norm",
           "init_parallel", "parallelize", "shard_micro_batch"]
