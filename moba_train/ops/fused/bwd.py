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
from moba_train.ops.fused.bwd_q import dq_own_kernel, dq_past_block_kernel, dq_past_kernel
from moba_train.ops.fused.layout import Layout
from moba_train.ops.fused.routing import Routes
from moba_train.ops.fused.state import is_scaled, state_dtype
from moba_train.ops.fused.tiles import kv_desc, past_launch, tiles

LOG2E = 1.4426950408889634


# fields per row of the backward's record: lse (base 2), delta = rowsum(dO * O), dQ's past-sum scale, padding
ROW_REC = 4


@triton.jit
def _rows_kernel(Out, DOut, Lse, Rec, n_rows, D: tl.constexpr, BLOCK: tl.constexpr, REC: tl.constexpr):
    """Each row's record: lse in base 2 (the kernels' exponent base: converted once here, not per key chunk) and
    delta; the scale field is dQ's past pass's to write."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < n_rows
    ptrs = offs[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(Out + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOut + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(Rec + offs * REC, tl.load(Lse + offs, mask=mask) * 1.4426950408889634, mask=mask)
    tl.store(Rec + offs * REC + 1, tl.sum(o * do, 1), mask=mask)


@triton.jit
def _routed_records_kernel(Rows, Lse, Delta, RLse, RDelta, n, REC: tl.constexpr, BLOCK: tl.constexpr):
    """Copies of the record's lse and delta of the routed rows, by position in Rows."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = tl.load(Rows + offs, mask=mask, other=0).to(tl.int64)
    tl.store(RLse + offs, tl.load(Lse + rows * REC, mask=mask), mask=mask)
    tl.store(RDelta + offs, tl.load(Delta + rows * REC, mask=mask), mask=mask)


def row_records(out: Tensor, do: Tensor, lse: Tensor) -> Tensor:
    """[T, Hq, ROW_REC] fp32: what the backward reads per row, in one 16-byte record (a gathered row then costs
    one 32-byte sector, not one per field)."""
    tokens, hq, dim = out.shape
    record = torch.empty(tokens, hq, ROW_REC, device=out.device, dtype=torch.float32)
    _rows_kernel[(triton.cdiv(tokens * hq, 64),)](out, do, lse, record, tokens * hq, D=dim, BLOCK=64, REC=ROW_REC)
    return record


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: Layout, routes: Routes,
             scale: float, interpret: bool, cfg: dict | None = None,
             sum_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv. sum_dtype: dQ's past sum between slots (default: `state.state_dtype` of q's)."""
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cfg = cfg or tiles(layout.block_size, q.shape[-1], q.element_size(), interpret)
    sum_dtype = sum_dtype or state_dtype(q.dtype)
    record = row_records(out, do, lse)
    dk, dv = dkv(do, q, k, v, record, layout, routes, scale, prec, cfg)
    dq_sum = dq_past(do, q, k, v, record, layout, routes, scale, prec, cfg, sum_dtype)
    dq = dq_own(do, q, k, v, record, dq_sum, layout, routes, scale, prec, cfg, sum_dtype)
    return dq, dk, dv


def dkv(do: Tensor, q: Tensor, k: Tensor, v: Tensor, record: Tensor, layout: Layout, routes: Routes, scale: float,
        prec: str, cfg: dict) -> tuple[Tensor, Tensor]:
    """dK, dV: one program per (key chunk, KV head) over the chunk's own-block rows and the rows routed to it."""
    hq, dim = q.shape[1:]
    hkv = k.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    chunks = layout.key_chunks(cfg["kv"]["BLOCK_N"])
    # without past slots the placeholder seg_start (one zero) with N_SLOTS = 0 gives every block no routed rows
    kv_k, kv_v = kv_desc(k, cfg["kv"]["BLOCK_N"]), kv_desc(v, cfg["kv"]["BLOCK_N"])
    routed = uses_routed_records(layout.block_size, cfg)
    r_lse, r_delta = routed_records(record, routes) if routed else (record[..., 0], record[..., 1])
    kv_kernel[(chunks.shape[0], hkv)](q, kv_k, kv_v, do, record[..., 0], record[..., 1], r_lse, r_delta, dk, dv,
                                      routes.rows, routes.seg_start, chunks, layout.blk_start, layout.blk_len, scale,
                                      layout.n_blocks, routes.n_slots, HQ=hq, HKV=hkv, D=dim, REC=ROW_REC, PREC=prec,
                                      ROUTED=routed, **cfg["kv"])
    return dk, dv


def uses_routed_records(block_size: int, cfg: dict) -> bool:
    """Whether dK/dV reads the routed rows' lse and delta from copies in routing order (`routed_records`). A
    routed row meets every key chunk of its block: where there are several, the copy (a gather per routed row)
    makes every chunk's loads of them contiguous; with one chunk per block it would cost what it saves."""
    return block_size > cfg["kv"]["BLOCK_N"]


def routed_records(record: Tensor, routes: Routes) -> tuple[Tensor, Tensor]:
    """lse and delta of every routed row in routing order, [T * Hq * n_slots] fp32 each: dK/dV then reads them
    contiguously by position instead of gathering two record fields per row (fewer loads and address computations
    in its main loop, docs/kernels.md item 36)."""
    n = routes.rows.numel()
    r_lse = torch.empty(n, device=record.device, dtype=torch.float32)
    r_delta = torch.empty_like(r_lse)
    _routed_records_kernel[(triton.cdiv(n, 1024),)](routes.rows, record[..., 0], record[..., 1], r_lse, r_delta, n,
                                                    REC=ROW_REC, BLOCK=1024)
    return r_lse, r_delta


def dq_own(do: Tensor, q: Tensor, k: Tensor, v: Tensor, record: Tensor, dq_sum: Tensor, layout: Layout,
           routes: Routes, scale: float, prec: str, cfg: dict, sum_dtype: torch.dtype) -> Tensor:
    """dQ: the own block's causal part plus the past sum, scaled, in q's dtype."""
    hq, dim = q.shape[1:]
    has_past = routes.n_slots > 0
    dq = torch.empty_like(q)
    own_cfg = {**cfg["dq_own"], "BLOCK_N": min(cfg["dq_own"]["BLOCK_N"], layout.tile_m)}  # tile_m % BLOCK_N == 0
    own_k, own_v = kv_desc(k, own_cfg["BLOCK_N"]), kv_desc(v, own_cfg["BLOCK_N"])
    dq_own_kernel[(layout.q_tiles.shape[0], hq)](q, own_k, own_v, do, record[..., 0], record[..., 1], dq_sum,
                                                 record[..., 2], dq, layout.q_tiles, layout.blk_start, layout.blk_len,
                                                 layout.blk_local, scale, HQ=hq, HKV=k.shape[1], D=dim,
                                                 HAS_PAST=has_past, SCALED=has_past and is_scaled(sum_dtype),
                                                 REC=ROW_REC, PREC=prec, BLOCK_M=layout.tile_m, **own_cfg)
    return dq


def dq_past(do: Tensor, q: Tensor, k: Tensor, v: Tensor, record: Tensor, layout: Layout, routes: Routes,
            scale: float, prec: str, cfg: dict, sum_dtype: torch.dtype) -> Tensor:
    """dQ's past part before the softmax scale, one launch per slot -> the sums (their row scales go to the
    records' third field); an unread placeholder without past slots."""
    if routes.n_slots == 0:
        return record
    dq_sum = torch.empty(q.shape, device=q.device, dtype=sum_dtype)
    kernel, launch = past_launch(dq_past_block_kernel, dq_past_kernel, cfg, "dq_past", routes.tile_m)
    past_k, past_v = kv_desc(k, launch["BLOCK_N"]), kv_desc(v, launch["BLOCK_N"])
    for slot in range(routes.n_slots):
        tile0, n_tiles = routes.slot(slot)
        kernel[(n_tiles,)](q, past_k, past_v, do, record[..., 0], record[..., 1], dq_sum, record[..., 2],
                           routes.rows, routes.tiles, tile0, layout.blk_start, layout.blk_len, scale * LOG2E,
                           layout.n_blocks, D=q.shape[-1], FIRST=slot == 0, SCALED=is_scaled(sum_dtype), REC=ROW_REC,
                           PREC=prec, **launch)
    return dq_sum
