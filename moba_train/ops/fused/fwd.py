"""Forward: selected past blocks key-block-major, then the causal own block query-major, one online softmax.

Past pass: one launch per slot; a program takes an entry of rows routed to one (block, KV head), gathers their
queries by index and continues each row's running softmax state (acc, max, sum) from the previous slot: one
tile whose block's keys stream in chunks (`_past_kernel`), or, for blocks of at most 128 keys, the whole block
held while the entry's rows pass in tiles (`_past_block_kernel`). Within a launch a row appears once, so the
update needs no atomics. Own-block pass: contiguous query tiles per query head, causal inside the block,
starting from the rows' running state; it normalises and writes out and the LSE (natural log) the backward
needs. Between launches acc lives in memory as `state.py` keeps it (fp16 with a row scale for bf16/fp16
inputs); max, sum and the scale are one fp32 record per row.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.layout import Layout, block_chunk, entry_rows, own_tile, past_item, past_tile
from moba_train.ops.fused.routing import Routes
from moba_train.ops.fused.state import is_scaled, load_rows_sum, state_dtype, store_rows_sum
from moba_train.ops.fused.tiles import kv_desc, past_launch, tiles

LOG2E = 1.4426950408889634
STATE_REC = 4  # fields per row of the running state's record: max, sum, acc scale, padding to 16 bytes


@triton.jit
def _update(q, k, v, live, m_i, l_i, acc, scale_log2, PREC: tl.constexpr):
    """Online softmax over one chunk of keys k, v; `live` masks scores (None: every key is live)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if live is not None:
        s = tl.where(live, s, float("-inf"))
    # the max of the raw scores, scaled once per row (scaling is monotonic); the scale folds into the exp's FMA
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _step(q, Kd, Vd, key0, live, hk, m_i, l_i, acc, scale_log2, D: tl.constexpr, PREC: tl.constexpr):
    """`_update` over the chunk of keys from token key0 (TMA loads)."""
    return _update(q, Kd.load([key0, hk * D]), Vd.load([key0, hk * D]), live, m_i, l_i, acc, scale_log2, PREC)


@triton.jit
def _load_state(Acc, Scale, M, L, rows, mask_m, D: tl.constexpr, BLOCK_M: tl.constexpr, FIRST: tl.constexpr,
                SCALED: tl.constexpr, REC: tl.constexpr):
    """A past slot's starting state of its rows: empty at slot 0, else the previous slot's (finite: every row
    routed here met an earlier slot)."""
    if FIRST:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
    else:
        m_i = tl.load(M + rows * REC, mask=mask_m, other=0.0)
        l_i = tl.load(L + rows * REC, mask=mask_m, other=0.0)
        acc = load_rows_sum(Acc, Scale, rows, mask_m, D, SCALED, REC)
    return m_i, l_i, acc


@triton.jit
def _store_state(Acc, Scale, M, L, rows, mask_m, m_i, l_i, acc, D: tl.constexpr, SCALED: tl.constexpr,
                 REC: tl.constexpr):
    store_rows_sum(Acc, Scale, rows, mask_m, acc, D, SCALED, REC)
    tl.store(M + rows * REC, m_i, mask=mask_m)
    tl.store(L + rows * REC, l_i, mask=mask_m)


# tile0 and NB change with the batch's packing: unspecialised, a later step never compiles another variant
@triton.jit(do_not_specialize=["tile0", "NB"])
def _past_kernel(Q, Kd, Vd, Acc, Scale, M, L, Rows, Tiles, tile0, BlkStart, BlkLen, scale_log2, NB,
                 D: tl.constexpr, FIRST: tl.constexpr, SCALED: tl.constexpr, REC: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of rows, the block's keys streamed in chunks of BLOCK_N."""
    hk, k_start, k_len, mask_m, rows = past_tile(Tiles, Rows, BlkStart, BlkLen, tile0 + tl.program_id(0), NB,
                                                 BLOCK_M)
    q = tl.load(Q + rows[:, None] * D + tl.arange(0, D)[None, :], mask=mask_m[:, None], other=0.0)
    # the state loads go out before the key loop, where they overlap the key chunks' loads and products
    m_i, l_i, acc = _load_state(Acc, Scale, M, L, rows, mask_m, D, BLOCK_M, FIRST, SCALED, REC)
    full = k_len - k_len % BLOCK_N
    for n0 in range(0, full, BLOCK_N):  # whole chunks: no mask
        m_i, l_i, acc = _step(q, Kd, Vd, k_start + n0, None, hk, m_i, l_i, acc, scale_log2, D, PREC)
    if full < k_len:  # the short tail of a document's last block
        offs_n = full + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _step(q, Kd, Vd, k_start + full, (offs_n < k_len)[None, :], hk, m_i, l_i, acc, scale_log2,
                              D, PREC)
    _store_state(Acc, Scale, M, L, rows, mask_m, m_i, l_i, acc, D, SCALED, REC)


@triton.jit(do_not_specialize=["tile0", "NB"])
def _past_block_kernel(Q, Kd, Vd, Acc, Scale, M, L, Rows, Tiles, tile0, BlkStart, BlkLen, scale_log2, NB,
                       D: tl.constexpr, FIRST: tl.constexpr, SCALED: tl.constexpr, REC: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Blocks of at most BLOCK_N keys: the block's K and V are loaded once, then the entry's rows are walked in
    tiles of BLOCK_M, so the loop pipeliner fetches the next tile's gathered rows while this one computes."""
    r0, n_rows, hk, k_start, k_len = past_item(Tiles, BlkStart, BlkLen, tile0 + tl.program_id(0), NB)
    if n_rows == 0:  # a reserved, unused entry: no K/V load
        return
    k, v, live = block_chunk(Kd, Vd, k_start, 0, k_len, hk, D, BLOCK_N)
    for m0 in range(0, n_rows, BLOCK_M):
        mask_m, rows = entry_rows(Rows, r0, m0, n_rows, BLOCK_M)
        q = tl.load(Q + rows[:, None] * D + tl.arange(0, D)[None, :], mask=mask_m[:, None], other=0.0)
        m_i, l_i, acc = _load_state(Acc, Scale, M, L, rows, mask_m, D, BLOCK_M, FIRST, SCALED, REC)
        m_i, l_i, acc = _update(q, k, v, live, m_i, l_i, acc, scale_log2, PREC)
        _store_state(Acc, Scale, M, L, rows, mask_m, m_i, l_i, acc, D, SCALED, REC)


@triton.jit
def _own_kernel(Q, Kd, Vd, Acc, Scale, M, L, Out, Lse, QTiles, BlkStart, BlkLen, scale_log2,
                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_PAST: tl.constexpr, SCALED: tl.constexpr,
                REC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    hk, t0, gb, k_start, t_end, offs_m, mask_m, rows = own_tile(QTiles, BlkStart, BlkLen, HQ, HKV, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=mask_m[:, None], other=0.0)

    if HAS_PAST:  # start from the past blocks' state; rows with none kept M = -inf (acc, L never written)
        m_i = tl.load(M + rows * REC, mask=mask_m, other=float("-inf"))
        has = m_i > float("-inf")
        l_i = tl.load(L + rows * REC, mask=mask_m & has, other=0.0)
        acc = load_rows_sum(Acc, Scale, rows, mask_m & has, D, SCALED, REC)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(k_start, t0, BLOCK_N):  # keys before the tile: visible to every row (tile_m % BLOCK_N == 0)
        m_i, l_i, acc = _step(q, Kd, Vd, n0, None, hk, m_i, l_i, acc, scale_log2, D, PREC)
    hi = tl.minimum(t0 + BLOCK_M, t_end)
    for n0 in range(t0, hi, BLOCK_N):  # the diagonal: causal mask
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _step(q, Kd, Vd, n0, offs_n[None, :] <= offs_m[:, None], hk, m_i, l_i, acc, scale_log2, D,
                              PREC)

    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + rows, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=mask_m)


def forward(q: Tensor, k: Tensor, v: Tensor, layout: Layout, routes: Routes, scale: float,
            interpret: bool, cfg: dict | None = None, acc_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """-> out [T, Hq, D] (q's dtype), lse [T, Hq] fp32 (natural log). acc_dtype: the running acc between slots
    (default: `state.state_dtype` of q's)."""
    tokens, hq, dim = q.shape
    hkv = k.shape[1]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cfg = cfg or tiles(layout.block_size, dim, q.element_size(), interpret)
    out = torch.empty_like(q)
    lse = torch.empty(tokens, hq, device=q.device, dtype=torch.float32)
    has_past = routes.n_slots > 0
    acc_dtype = acc_dtype or state_dtype(q.dtype)
    scaled = is_scaled(acc_dtype)
    if has_past:
        acc = torch.empty(tokens, hq, dim, device=q.device, dtype=acc_dtype)
        # a row's max, sum and acc scale in one 16-byte record: one 32-byte sector per row moved, not three
        # (rows are gathered, so their fields never share a sector with the next row's)
        record = torch.full((tokens, hq, STATE_REC), float("-inf"), device=q.device, dtype=torch.float32)
        m, l_sum, acc_scale = record[..., 0], record[..., 1], record[..., 2]
        kernel, launch = past_launch(_past_block_kernel, _past_kernel, cfg, "past", routes.tile_m)
        past_k, past_v = kv_desc(k, launch["BLOCK_N"]), kv_desc(v, launch["BLOCK_N"])
        for slot in range(routes.n_slots):
            tile0, n_tiles = routes.slot(slot)
            kernel[(n_tiles,)](q, past_k, past_v, acc, acc_scale, m, l_sum, routes.rows, routes.tiles, tile0,
                               layout.blk_start, layout.blk_len, scale * LOG2E, layout.n_blocks, D=dim,
                               FIRST=slot == 0, SCALED=scaled, REC=STATE_REC, PREC=prec, **launch)
    else:
        acc = acc_scale = m = l_sum = lse  # unread placeholders
    own_cfg = {**cfg["own"], "BLOCK_N": min(cfg["own"]["BLOCK_N"], layout.tile_m)}  # tile_m % BLOCK_N == 0
    own_k, own_v = kv_desc(k, own_cfg["BLOCK_N"]), kv_desc(v, own_cfg["BLOCK_N"])
    _own_kernel[(layout.q_tiles.shape[0], hq)](q, own_k, own_v, acc, acc_scale, m, l_sum, out, lse, layout.q_tiles,
                                               layout.blk_start, layout.blk_len, scale * LOG2E, HQ=hq, HKV=hkv, D=dim,
                                               HAS_PAST=has_past, SCALED=scaled and has_past, REC=STATE_REC,
                                               PREC=prec, BLOCK_M=layout.tile_m, **own_cfg)
    return out, lse
