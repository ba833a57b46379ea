"""Process layout: one DeviceMesh with named axes (dp_replicate, dp_shard, cp) built from ParallelConfig."""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moba_train.errors import ConfigError
from moba_train.parallel.config import ParallelConfig


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    cp_mode: str
    world_size: int
    rank: int
    mesh: Optional[DeviceMesh] = None
    flat: Optional[dict] = None  # flattened sub-meshes kept by name ("dp", "dp_shard_cp", "fsdp")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        if self.mesh is None or self.dp == 1:
            return 0
        return self.flat["dp"].get_local_rank()

    @property
    def cp_rank(self) -> int:
        return 0 if self.mesh is None or self.cp == 1 else self.mesh["cp"].get_local_rank()

    @property
    def cp_group(self):
        return None if self.mesh is None or self.cp == 1 else self.mesh["cp"].get_group()

    @property
    def fsdp_mesh(self) -> Optional[DeviceMesh]:
        """Parameters are sharded over dp_shard x cp (cp ranks hold the same weights) and replicated over
        dp_replicate (HSDP); None in a single process."""
        return None if self.mesh is None else self.flat["fsdp"]

    @property
    def grad_scale(self) -> int:
        """Multiply the loss by this before backward: FSDP2 averages gradients over its mesh (all ranks), we
        want their sum (each rank's loss is already divided by the global token count)."""
        return self.world_size if self.mesh is not None else 1

    @property
    def loss_group(self):
        """Ranks over which loss and metrics are reduced: dp x cp (the whole world)."""
        return None if self.mesh is None else dist.group.WORLD


def resolve_dims(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, cp) whose product is the world size, or one clear ConfigError."""
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        rest = cfg.dp_replicate * cfg.cp
        if world_size % rest:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.cp={cfg.cp} x "
                              f"parallel.dp_replicate={cfg.dp_replicate}")
        dp_shard = world_size // rest
    if cfg.dp_replicate * dp_shard * cfg.cp != world_size:
        raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} x dp_shard={dp_shard} x cp={cfg.cp} != world "
                          f"size {world_size}")
    return cfg.dp_replicate, dp_shard, cfg.cp


def init_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelDims:
    """Start the process group (under torchrun) and build the mesh; a single process needs neither."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp_replicate, dp_shard, cp = resolve_dims(cfg, world_size)
    dims = ParallelDims(dp_replicate, dp_shard, cp, cfg.cp_mode, world_size, int(os.environ.get("RANK", "0")))
    if world_size == 1:
        return dims
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dims.mesh = init_device_mesh(device.type, (dp_replicate, dp_shard, cp),
                                 mesh_dim_names=("dp_replicate", "dp_shard", "cp"))
    mesh = dims.mesh
    dims.flat = {"dp": mesh[("dp_replicate", "dp_shard")]._flatten("dp"),
                 "dp_shard_cp": mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")}
    # FSDP: shard over dp_shard x cp, replicate over dp_replicate (HSDP). Same rank order as the root mesh.
    dims.flat["fsdp"] = dims.flat["dp_shard_cp"] if dp_replicate == 1 else init_device_mesh(
        device.type, (dp_replicate, dp_shard * cp), mesh_dim_names=("dp_replicate", "dp_shard_cp"))
    return dims


def end_parallel() -> None:
    """Tear the process group down after a finished run. Left to the interpreter's exit, gloo's teardown can abort
    a rank (`terminate called without an active exception`) and torchrun then reports a finished run as failed.
    Not on errors: the other ranks may be inside a collective that would never end."""
    if dist.is_initialized():
        dist.destroy_process_group()
