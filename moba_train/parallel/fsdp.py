"""FSDP2: `fully_shard` per transformer block and at the root; gradient norm over sharded (DTensor) grads.

Gradients must be summed, not averaged, over ranks: the trainer divides every rank's loss by the global
real-token count, so the sum over dp x cp ranks is the gradient of the global mean loss. FSDP2 averages over
its mesh (a custom divide factor needs NCCL's PreMulSum, which gloo lacks), so the backward runs on the loss
times `ParallelDims.grad_scale` (the FSDP mesh size, a power of two in practice: exact).
"""

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard every block of `model.layers`, then the root (embeddings, final norm, head)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = list(model.layers)
    for i, block in enumerate(layers):
        # the last block's parameters are needed again right away by the root's backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to the norm of the full (unsharded) gradient; returns that norm as a plain tensor."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
