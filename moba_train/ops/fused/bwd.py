"""Backward: delta = rowsum(dO * O), then dK/dV KV-major (bwd_kv) and dQ query-major (bwd_q).

Two passes recompute the scores (7 matrix products instead of 5), but neither scatters per key chunk: a single
kernel that also accumulated dQ by atomics per (row tile, key chunk) spilled registers and ran 1.25x slower
(docs/kernels.md). dQ's past part is a per-row sum [T, Hq, D] (`state.py`) met once per (row, selected block).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.bwd_kv import kv_kernel
from moba_train.ops.fused.bwd_q import dq_own_kernel, dq_past_kernel
from moba_train.ops.fused.layout import Layout
from moba_train.ops.fused.routing import Routes
from moba_train.ops.fused.state import is_scaled, row_sums, state_dtype
from moba_train.ops.fused.tiles import kv_desc, tiles

LOG2E = 1.4426950408889634


@triton.jit
def _delta_kernel(Out, DOut, Delta, n_rows, D: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    ptrs = offs.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(Out + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOut + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + offs, tl.sum(o * do, 1), mask=mask)


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: Layout, routes: Routes,
             scale: float, interpret: bool, cfg: dict | None = None,
             sum_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv. sum_dtype: dQ's past sum between slots (default: `state.state_dtype` of q's)."""
    tokens, hq, dim = q.shape
    hkv = k.shape[1]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cfg = cfg or tiles(layout.block_size, dim, q.element_size(), interpret)
    delta = torch.empty(tokens, hq, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(tokens * hq, 64),)](out, do, delta, tokens * hq, D=dim, BLOCK=64)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    chunks = layout.key_chunks(cfg["kv"]["BLOCK_N"])
    # without past slots the placeholder seg_start (one zero) with N_SLOTS = 0 gives every block no routed rows
    kv_k, kv_v = kv_desc(k, cfg["kv"]["BLOCK_N"]), kv_desc(v, cfg["kv"]["BLOCK_N"])
    kv_kernel[(chunks.shape[0], hkv)](q, kv_k, kv_v, do, lse, delta, dk, dv, routes.rows, routes.seg_start,
                                      chunks, layout.blk_start, layout.blk_len, scale, layout.n_blocks,
                                      routes.n_slots, HQ=hq, HKV=hkv, D=dim, PREC=prec, **cfg["kv"])
    has_past = routes.n_slots > 0
    sum_dtype = sum_dtype or state_dtype(q.dtype)
    dq_sum, dq_scale = dq_past(do, q, k, v, lse, delta, layout, routes, scale, prec, cfg["dq_past"], sum_dtype)
    dq = torch.empty_like(q)
    own_cfg = {**cfg["dq_own"], "BLOCK_N": min(cfg["dq_own"]["BLOCK_N"], layout.tile_m)}  # tile_m % BLOCK_N == 0
    own_k, own_v = kv_desc(k, own_cfg["BLOCK_N"]), kv_desc(v, own_cfg["BLOCK_N"])
    dq_own_kernel[(layout.q_tiles.shape[0], hq)](q, own_k, own_v, do, lse, delta, dq_sum, dq_scale, dq,
                                                 layout.q_tiles, layout.blk_start, layout.blk_len, layout.blk_local,
                                                 scale, HQ=hq, HKV=hkv, D=dim, HAS_PAST=has_past,
                                                 SCALED=has_past and is_scaled(sum_dtype), PREC=prec,
                                                 BLOCK_M=layout.tile_m, **own_cfg)
    return dq, dk, dv


def dq_past(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, layout: Layout, routes: Routes,
            scale: float, prec: str, launch: dict, sum_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """dQ's past part before the softmax scale, one launch per slot -> (sums, row scales); unread placeholders
    without past slots."""
    if routes.n_slots == 0:
        return delta, delta
    dq_sum, dq_scale = row_sums(*q.shape, sum_dtype, q.device)
    past_k, past_v = kv_desc(k, launch["BLOCK_N"]), kv_desc(v, launch["BLOCK_N"])
    for slot in range(routes.n_slots):
        tile0, n_tiles = routes.dq.slot(slot)
        dq_past_kernel[(n_tiles,)](q, past_k, past_v, do, lse, delta, dq_sum, dq_scale, routes.rows, routes.dq.table,
                                   tile0, layout.blk_start, layout.blk_len, scale * LOG2E, layout.n_blocks,
                                   D=q.shape[-1], FIRST=slot == 0, SCALED=is_scaled(sum_dtype), PREC=prec,
                                   BLOCK_M=routes.dq.rows, **launch)
    return dq_sum, dq_scale
