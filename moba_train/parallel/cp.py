"""Context parallelism: shard a micro-batch along the sequence, and attention runners that see the whole of it.

Layout. A micro-batch [B, S] is flattened into one stream of T = B * S tokens (the varlen layout the model
uses) and split over the cp ranks:
- `allgather` mode: zigzag, 2 x cp equal chunks, rank r holds chunks r and 2cp-1-r (causal load balance);
- `ulysses` mode: contiguous, rank r holds chunk r (the all-to-all then yields global order directly).
Every rank keeps the global `cu_seqlens` and gets the global positions of its tokens, so RoPE and MoBA gating
see global positions and document boundaries wherever the shard boundaries fall.

Runners (installed on every `Attention.runner` by `apply_cp`):
- allgather: all-gather K and V (one collective), attend local queries to global keys (offset_attn: bottom-right
  causal SDPA for full layers, the single-GPU MoBA op over the global stream for MoBA), the backward
  reduce-scatters dK, dV;
- ulysses: all-to-all q, k, v from sequence- to head-sharded, the unchanged single-GPU core (any backend) on
  the whole sequence, all-to-all back.
"""

from typing import Optional

import torch
from torch import Tensor

from moba_train.model.llama import positions_from_cu_seqlens, rows_cu_seqlens
from moba_train.ops.offsets import host_offsets
from moba_train.parallel.comm import gather_seq, heads_to_seq, seq_to_heads
from moba_train.parallel.offset_attn import Segment, offset_attn


def layout_segments(total: int, cp: int, rank: int, mode: str) -> list[Segment]:
    """The global token ranges rank `rank` holds, in local order."""
    if mode == "ulysses":
        n = total // cp
        return [Segment(rank * n, (rank + 1) * n, 0)]
    n = total // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return [Segment(first * n, (first + 1) * n, 0), Segment(second * n, (second + 1) * n, n)]


def local_index(total: int, cp: int, rank: int, mode: str, device=None) -> Tensor:
    """Global token indices of this rank's tokens, in local order."""
    return torch.cat([torch.arange(s.start, s.end, device=device) for s in layout_segments(total, cp, rank, mode)])


def check_divisible(total: int, cp: int, mode: str) -> None:
    parts = 2 * cp if mode == "allgather" else cp
    if total % parts:
        raise ValueError(f"context parallel ({mode}, cp={cp}) needs the tokens of a micro-batch ({total}) to be "
                         f"divisible by {parts}")


def shard_batch(batch: dict[str, Tensor], cp: int, rank: int, mode: str) -> dict[str, Tensor]:
    """A micro-batch {input_ids, labels [B, S], cu_seqlens?, positions?} -> this cp rank's share, shaped [1, T/cp].

    cu_seqlens stays global (over the flattened batch); positions become the global positions of the local
    tokens (restarting per document, as the model would derive them).
    """
    input_ids = batch["input_ids"]
    rows, seq = input_ids.shape
    total = rows * seq
    device = input_ids.device
    cu = batch.get("cu_seqlens")
    if cu is None:
        cu = rows_cu_seqlens(input_ids)
    positions = batch.get("positions")
    positions = positions_from_cu_seqlens(cu, total) if positions is None else positions.reshape(total)
    check_divisible(total, cp, mode)
    idx = local_index(total, cp, rank, mode, device)
    out = {key: value.reshape(total)[idx].unsqueeze(0) for key, value in batch.items()
           if key not in ("cu_seqlens", "positions")}
    out["positions"] = positions[idx].unsqueeze(0)
    out["cu_seqlens"] = cu
    return out


class CPRunner:
    """Attention runner for one cp group; the mode picks the algorithm (see the module docstring)."""

    def __init__(self, group, cp: int, rank: int, mode: str):
        self.group, self.cp, self.rank, self.mode = group, cp, rank, mode

    def __call__(self, core, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        total = q.shape[0] * self.cp
        end = host_offsets(cu_seqlens)[-1] if cu_seqlens.numel() >= 2 else None
        if end != total:
            raise ValueError(f"context parallel expects global cu_seqlens over {total} tokens; got {end} "
                             "(shard the micro-batch with parallel.cp.shard_batch)")
        if self.mode == "ulysses":
            qh, kh, vh = (seq_to_heads(x, self.group) for x in (q, k, v))
            return heads_to_seq(core(qh, kh, vh, cu_seqlens, max_seqlen), self.group)
        kv = gather_seq(torch.stack((k, v), 1), self.group)  # [cp * T_l, 2, Hkv, D], rank order
        kv = kv[self._inverse(total, kv.device)]  # global order
        segments = layout_segments(total, self.cp, self.rank, self.mode)
        return offset_attn(core, q, kv[:, 0], kv[:, 1], segments, cu_seqlens, max_seqlen)

    def _inverse(self, total: int, device) -> Tensor:
        """Permutation taking the rank-order concatenation of all shards to global token order."""
        key = (total, str(device))
        if getattr(self, "_inv_key", None) != key:
            order = torch.cat([local_index(total, self.cp, r, self.mode) for r in range(self.cp)])
            inv = torch.empty_like(order)
            inv[order] = torch.arange(total)
            self._inv, self._inv_key = inv.to(device), key
        return self._inv


def apply_cp(model: torch.nn.Module, group, cp: int, rank: int, mode: str) -> torch.nn.Module:
    """Install a CP runner on every attention module of `model` (identified by its `runner` hook)."""
    runner: Optional[CPRunner] = CPRunner(group, cp, rank, mode) if cp > 1 else None
    for module in model.modules():
        if hasattr(module, "runner") and hasattr(module, "core"):
            module.runner = runner
    return model
