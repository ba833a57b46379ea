"""Differentiable collectives over the context-parallel group (NCCL on GPU, gloo on CPU).

- `gather_seq`: all-gather along tokens (dim 0) in rank order; backward reduce-scatters (sums) the gradient.
- `seq_to_heads` / `heads_to_seq`: Ulysses all-to-alls between [T_local, H, D] and [T_local * cp, H / cp, D];
  each one's backward is the other.

`CommTimer` measures the time the compute stream waits on these collectives (benchmarks only).
"""

import torch
import torch.distributed as dist
from torch import Tensor


class CommTimer:
    """Collects (start, end) CUDA events around every CP collective while enabled; `seconds()` sums them."""

    def __init__(self):
        self.enabled = False
        self.events: list = []

    def reset(self) -> None:
        self.events = []

    def seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1000.0

    def start(self, x: Tensor):
        if not (self.enabled and x.is_cuda):
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))


TIMER = CommTimer()


def _nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def all_gather_tokens(x: Tensor, group) -> Tensor:
    """[n, ...] per rank -> [n * world, ...] in rank order (no autograd)."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    mark = TIMER.start(x)
    if _nccl(group):
        out = x.new_empty((x.shape[0] * world,) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        out = torch.cat(parts)
    TIMER.stop(mark)
    return out


def reduce_scatter_tokens(x: Tensor, group) -> Tensor:
    """[n * world, ...] per rank -> this rank's [n, ...] slice of the sum over ranks (no autograd)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    mark = TIMER.start(x)
    if _nccl(group):
        out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
    else:  # gloo has no reduce-scatter of tensors: all-reduce and keep our slice
        x = x.clone()
        dist.all_reduce(x, group=group)
        out = x.chunk(world)[rank].contiguous()
    TIMER.stop(mark)
    return out


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_tokens(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_tokens(grad, ctx.group), None


def gather_seq(x: Tensor, group) -> Tensor:
    return _GatherSeq.apply(x, group)


def _all_to_all(x: Tensor, group) -> Tensor:
    """x [world, ...]: row r goes to rank r; returns [world, ...] with row r from rank r."""
    x = x.contiguous()
    out = torch.empty_like(x)
    mark = TIMER.start(x)
    dist.all_to_all_single(out, x, group=group)
    TIMER.stop(mark)
    return out


def _seq_to_heads(x: Tensor, group) -> Tensor:
    world = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    parts = x.reshape(tokens, world, heads // world, dim).transpose(0, 1)  # [world, T_l, H/w, D]
    return _all_to_all(parts, group).reshape(world * tokens, heads // world, dim)


def _heads_to_seq(x: Tensor, group) -> Tensor:
    world = dist.get_world_size(group)
    total, heads, dim = x.shape
    parts = x.reshape(world, total // world, heads, dim)  # row r: the tokens of rank r
    out = _all_to_all(parts, group)  # row r: head group r of our tokens
    return out.transpose(0, 1).reshape(total // world, world * heads, dim)


class _Reshard(torch.autograd.Function):
    """Sequence-sharded <-> head-sharded; the backward is the opposite all-to-all."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def seq_to_heads(x: Tensor, group) -> Tensor:
    """[T_local, H, D] sequence-sharded (contiguous layout) -> [T, H / cp, D] head-sharded, global order."""
    return _Reshard.apply(x, group, True)


def heads_to_seq(x: Tensor, group) -> Tensor:
    """Inverse of `seq_to_heads`."""
    return _Reshard.apply(x, group, False)


__all__ = ["TIMER", "CommTimer", "gather_seq", "heads_to_seq", "seq_to_heads"]
