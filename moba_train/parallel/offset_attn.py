"""Attention of a rank's local queries against the all-gathered (global) keys: the allgather-CP math.

The local queries are a few contiguous pieces of the global token stream (`Segment`s). Each piece is cut at
document boundaries; a piece of queries at document positions [p0, p1) attends the document's keys [0, p1):
- full attention: causal aligned to the bottom right (SDPA with `causal_lower_right`);
- MoBA: the gate of DESIGN.md evaluated at global positions (block means of the global keys, past blocks
  only, own block always selected, top_k counts it), then softmax attention over the selected blocks.

The MoBA part is plain PyTorch math (dense scores per query tile, tiles recomputed in the backward): exact and
device-agnostic, memory bounded by SCORE_BUDGET, but O(local queries x document length) work. The fast path
needs a fused-kernel entry point that takes the local queries with their global positions and the global K/V:
    moba_attn_q(q [Tq, Hq, D], k, v [T, Hkv, D], cu_seqlens (global), q_pos [Tq] (global token index),
                block_size, top_k, scale) -> out [Tq, Hq, D]   (+ dq, dk, dv in the backward)
i.e. the existing fused layout/gate/routing built from (q_pos, cu_seqlens) instead of assuming q rows == k rows.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from moba_train.ops.gate import block_means

QUERY_CHUNK = 1024  # at most this many queries per dense MoBA score tile
SCORE_BUDGET = 2**27  # and at most this many score entries (queries x keys x heads) per tile


@dataclass(frozen=True)
class Segment:
    """Local rows [local, local + end - start) hold global tokens [start, end)."""

    start: int
    end: int
    local: int


def pieces(segments: list[Segment], cu: list[int]):
    """Yield (local_row, doc_start, q_start, q_end): query runs cut at document boundaries, in local order."""
    for seg in segments:
        t = seg.start
        doc = 0
        while t < seg.end:
            while cu[doc + 1] <= t:
                doc += 1
            end = min(seg.end, cu[doc + 1])
            yield seg.local + t - seg.start, cu[doc], t, end
            t = end


def _full_piece(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [Lq, Hq, D] are the last Lq positions of k, v [Lk, Hkv, D]; causal, bottom-right aligned."""
    lq, lk = q.shape[0], k.shape[0]
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if lq == lk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        if gqa:  # the causal-bias dispatch does not take enable_gqa on every torch we support
            group = q.shape[1] // k.shape[1]
            kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(lq, lk), scale=scale)
    return out.squeeze(0).transpose(0, 1)


@torch.no_grad()
def picked_blocks(q: Tensor, means: Tensor, q_pos: Tensor, block_size: int, top_k: int) -> Tensor:
    """The MoBA gate at global positions: q [L, Hq, D], means [nb, Hkv, D], q_pos [L] (position in document)
    -> [L, Hq, nb] bool of selected blocks (own block + best top_k - 1 blocks entirely in the past)."""
    length, hq, dim = q.shape
    n_blocks, hkv = means.shape[0], means.shape[1]
    scores = torch.einsum("lkgd,nkd->lkgn", q.float().view(length, hkv, hq // hkv, dim), means.float())
    scores = scores.reshape(length, hq, n_blocks)
    own = q_pos // block_size
    blocks = torch.arange(n_blocks, device=q.device)
    scores = scores.masked_fill(~(blocks[None, :] < own[:, None])[:, None, :], float("-inf"))
    picked = torch.zeros(length, hq, n_blocks + 1, dtype=torch.bool, device=q.device)
    n_pick = min(top_k - 1, n_blocks)
    if n_pick > 0:
        val, top = scores.topk(n_pick, dim=-1)
        picked.scatter_(2, torch.where(val > float("-inf"), top, n_blocks), True)
    picked[torch.arange(length, device=q.device), :, own] = True
    return picked[..., :n_blocks]


def _moba_chunk(q: Tensor, k: Tensor, v: Tensor, means: Tensor, first: int, block_size: int, top_k: int,
                scale: float) -> Tensor:
    """Queries q [l, Hq, D] at document positions [first, first + l) against keys k, v [first + l, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    q_pos = torch.arange(first, first + q.shape[0], device=q.device)
    picked = picked_blocks(q, means, q_pos, block_size, top_k)  # [l, Hq, nb]
    key_pos = torch.arange(k.shape[0], device=q.device)
    mask = picked[:, :, key_pos // block_size] & (key_pos[None, None, :] <= q_pos[:, None, None])
    wide = torch.promote_types(q.dtype, torch.float32)
    length, hq, dim = q.shape
    hkv = k.shape[1]
    # GQA without copying K, V: the G query heads of a KV head share one matmul
    qf = q.to(wide).view(length, hkv, group, dim).permute(1, 2, 0, 3).reshape(hkv, group * length, dim)
    kf, vf = k.to(wide).transpose(0, 1), v.to(wide).transpose(0, 1)  # [Hkv, Lk, D]
    scores = ((qf @ kf.transpose(1, 2)) * scale).view(hq, length, -1)  # [Hq, l, Lk], head h = kv * G + g
    probs = scores.masked_fill(~mask.transpose(0, 1), float("-inf")).softmax(-1)
    out = probs.view(hkv, group * length, -1) @ vf  # [Hkv, G * l, D]
    return out.view(hq, length, dim).transpose(0, 1).to(q.dtype)


def _moba_piece(q: Tensor, k: Tensor, v: Tensor, block_size: int, top_k: int, scale: float) -> Tensor:
    """q [Lq, Hq, D] are the last Lq positions of one document's keys k, v [Lk, Hkv, D].

    Query chunks are sized so one score tile stays under SCORE_BUDGET elements; with more than one chunk each
    is recomputed in the backward (checkpoint), so memory stays bounded at any length.
    """
    lq, lk = q.shape[0], k.shape[0]
    means = block_means(k.detach(), block_size)
    first = lk - lq
    rows = max(16, min(QUERY_CHUNK, SCORE_BUDGET // (lk * q.shape[1])))
    if rows >= lq:
        return _moba_chunk(q, k, v, means, first, block_size, top_k, scale)
    outs = []
    for i0 in range(0, lq, rows):
        i1 = min(lq, i0 + rows)
        outs.append(checkpoint(_moba_chunk, q[i0:i1], k[:first + i1], v[:first + i1], means, first + i0,
                               block_size, top_k, scale, use_reentrant=False))
    return torch.cat(outs)


def offset_attn(core, q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cu: list[int]) -> Tensor:
    """Local queries q [T_local, Hq, D] vs global k, v [T, Hkv, D] for `core` (MobaCore or FullCore)."""
    scale = core.softmax_scale if core.softmax_scale is not None else q.shape[-1] ** -0.5
    outs = []
    for local, doc_start, q0, q1 in pieces(segments, cu):
        qp = q[local:local + q1 - q0]
        kp, vp = k[doc_start:q1], v[doc_start:q1]
        if core.kind == "moba":
            outs.append(_moba_piece(qp, kp, vp, core.block_size, core.top_k, scale))
        else:
            outs.append(_full_piece(qp, kp, vp, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
