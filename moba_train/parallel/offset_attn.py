"""Attention of a rank's local queries against the all-gathered (global) keys: the allgather-CP math.

The local queries are a few contiguous pieces of the global token stream (`Segment`s).
- full attention: each piece, cut at document boundaries, is the last queries of its document's keys: causal
  SDPA aligned to the bottom right (`causal_lower_right`), flash / efficient kernels on GPU.
- MoBA: the single-GPU op (any backend, the fused kernels on GPU) on the global stream with the local queries
  in their global rows and zeros elsewhere. Every query routes and attends on its own, so the local rows are
  exact; the other rows get a zero output gradient, and a row with dO = 0 adds exactly nothing to dK and dV
  (dV += P^T dO, dS = P (dP - rowsum(dO O))). The price is cp x the sparse attention work of the local rows,
  still O(T x top_k x block_size), never a dense T x T.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from moba_train.ops.flash import SDPA_NO_CUDNN
from moba_train.ops.offsets import host_offsets


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


def _moba_local(core, q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cu_seqlens: Tensor,
                max_seqlen: int) -> Tensor:
    rows = torch.cat([torch.arange(seg.start, seg.end, device=q.device) for seg in segments])
    q_all = q.new_zeros((k.shape[0], *q.shape[1:])).index_copy(0, rows, q)
    return core(q_all, k, v, cu_seqlens, max_seqlen)[rows]


def offset_attn(core, q: Tensor, k: Tensor, v: Tensor, segments: list[Segment], cu_seqlens: Tensor,
                max_seqlen: int) -> Tensor:
    """Local queries q [T_local, Hq, D] vs global k, v [T, Hkv, D] for `core` (MobaCore or FullCore)."""
    if core.kind == "moba":
        return _moba_local(core, q, k, v, segments, cu_seqlens, max_seqlen)
    scale = core.softmax_scale if core.softmax_scale is not None else q.shape[-1] ** -0.5
    offsets = host_offsets(cu_seqlens)
    # several documents: piece lengths change from step to step, and cuDNN would plan each new one (ops/flash.py)
    backends = sdpa_kernel(SDPA_NO_CUDNN) if len(offsets) > 2 else nullcontext()
    outs = []
    with backends:
        for local, doc_start, q0, q1 in pieces(segments, offsets):
            outs.append(_full_piece(q[local:local + q1 - q0], k[doc_start:q1], v[doc_start:q1], scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
