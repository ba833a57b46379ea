"""dQ, query-major over the forward's tiles: each tile of rows recomputes its scores against one block.

Past pass: one launch per slot, like the forward's; the tiles of rows routed to (block, KV head), gathered by
index (at blocks <= 128 several tiles per program, the block's K and V held), start from the rows' past sum
(`state.py`: fp16 with a row scale for bf16/fp16 inputs), accumulate the block's part in registers over its
keys and write the sum back: no atomics, so dQ is deterministic. Slot 0 starts from zero (no zero fill).
Own-block pass: contiguous causal tiles; it adds the past sum, scales and writes dQ in q's dtype.
"""

import triton
import triton.language as tl

from moba_train.ops.fused.layout import block_chunk, entry_rows, own_tile, past_item, past_tile
from moba_train.ops.fused.rows import row_load, tile_load
from moba_train.ops.fused.state import load_rows_sum, store_rows_sum


@triton.jit
def _dq_chunk(q, do, lse, delta, dq, Kd, Vd, key0, live, hk, D: tl.constexpr, scale_log2, PREC: tl.constexpr):
    """`_dq_update` over the chunk of keys from token key0 (TMA: rows past T are zeros, rows past the block are
    masked by `live`)."""
    return _dq_update(q, do, lse, delta, dq, Kd.load([key0, hk * D]), Vd.load([key0, hk * D]), live, scale_log2,
                      PREC)


@triton.jit
def _dq_update(q, do, lse, delta, dq, k, v, live, scale_log2, PREC: tl.constexpr):
    """dq + dS K over one chunk of keys k, v; `live` masks them (None: every key is live)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    p = tl.math.exp2(s - lse[:, None])
    if live is not None:  # rows past the end are never stored, so only key tails and causality mask
        p = tl.where(live, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def load_rows(Q, DO, Lse, Delta, rows, rec, mask_m, D: tl.constexpr):
    """q, dO, lse (base 2, as `bwd.row_records` keeps it) and delta of the rows (mask_m None: every row is real);
    `rec` indexes Lse and Delta (rows times the record's width, or positions in dK/dV's routing-order copies)."""
    ptrs = rows[:, None] * D + tl.arange(0, D)[None, :]
    return (tile_load(Q + ptrs, mask_m, 0.0), tile_load(DO + ptrs, mask_m, 0.0), row_load(Lse + rec, mask_m, 0.0),
            row_load(Delta + rec, mask_m, 0.0))


@triton.jit
def _past_sum(DQsum, DQscale, rows, mask_m, D: tl.constexpr, BLOCK_M: tl.constexpr, FIRST: tl.constexpr,
              SCALED: tl.constexpr, REC: tl.constexpr):
    """dQ's past sum of the rows before this slot, as the forward's `_load_state`: zero at slot 0 (no zero fill),
    else what the earlier slots wrote (every row routed to a later slot met an earlier one)."""
    if FIRST:
        return tl.zeros([BLOCK_M, D], tl.float32)
    return load_rows_sum(DQsum, DQscale, rows, mask_m, D, SCALED, REC)


@triton.jit(do_not_specialize=["tile0", "NB"])
def dq_past_kernel(Q, Kd, Vd, DO, Lse, Delta, DQsum, DQscale, Rows, Tiles, tile0, BlkStart, BlkLen, scale_log2, NB,
                   D: tl.constexpr, FIRST: tl.constexpr, SCALED: tl.constexpr, REC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tile0 + tl.program_id(0)
    hk, k_start, k_len, mask_m, rows = past_tile(Tiles, Rows, BlkStart, BlkLen, tile, NB, BLOCK_M)
    q, do, lse, delta = load_rows(Q, DO, Lse, Delta, rows, rows * REC, mask_m, D)
    dq = _past_sum(DQsum, DQscale, rows, mask_m, D, BLOCK_M, FIRST, SCALED, REC)  # up front: overlaps the keys'
    full = k_len - k_len % BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        dq = _dq_chunk(q, do, lse, delta, dq, Kd, Vd, k_start + n0, None, hk, D, scale_log2, PREC)
    if full < k_len:
        offs = full + tl.arange(0, BLOCK_N)
        dq = _dq_chunk(q, do, lse, delta, dq, Kd, Vd, k_start + full, (offs < k_len)[None, :], hk, D, scale_log2,
                       PREC)
    store_rows_sum(DQsum, DQscale, rows, mask_m, dq, D, SCALED, REC)


@triton.jit(do_not_specialize=["tile0", "NB"])
def dq_past_block_kernel(Q, Kd, Vd, DO, Lse, Delta, DQsum, DQscale, Rows, Tiles, tile0, BlkStart, BlkLen, scale_log2,
                         NB, D: tl.constexpr, FIRST: tl.constexpr, SCALED: tl.constexpr, REC: tl.constexpr,
                         PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """Blocks of at most CHUNKS (1 or 2) chunks of BLOCK_N keys, as the forward's `_past_block_kernel`: the
    block's K and V loaded once, the entry's rows walked in tiles of BLOCK_M. Kept in chunks of 64 keys, not one
    128-key tile, so the score tiles leave room for two programs per SM."""
    r0, n_rows, hk, k_start, k_len = past_item(Tiles, BlkStart, BlkLen, tile0 + tl.program_id(0), NB)
    if n_rows == 0:  # a reserved, unused entry: no K/V load
        return
    k0, v0, live0 = block_chunk(Kd, Vd, k_start, 0, k_len, hk, D, BLOCK_N)
    if CHUNKS == 2:
        k1, v1, live1 = block_chunk(Kd, Vd, k_start, BLOCK_N, k_len, hk, D, BLOCK_N)
    for m0 in range(0, n_rows, BLOCK_M):
        mask_m, rows = entry_rows(Rows, r0, m0, n_rows, BLOCK_M)
        q, do, lse, delta = load_rows(Q, DO, Lse, Delta, rows, rows * REC, mask_m, D)
        dq = _past_sum(DQsum, DQscale, rows, mask_m, D, BLOCK_M, FIRST, SCALED, REC)
        dq = _dq_update(q, do, lse, delta, dq, k0, v0, live0, scale_log2, PREC)
        if CHUNKS == 2:
            dq = _dq_update(q, do, lse, delta, dq, k1, v1, live1, scale_log2, PREC)
        store_rows_sum(DQsum, DQscale, rows, mask_m, dq, D, SCALED, REC)


@triton.jit
def dq_own_kernel(Q, Kd, Vd, DO, Lse, Delta, DQsum, DQscale, DQ, QTiles, BlkStart, BlkLen, BlkLocal, scale,
                  HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_PAST: tl.constexpr, SCALED: tl.constexpr,
                  REC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    hk, t0, gb, k_start, t_end, offs_m, mask_m, rows = own_tile(QTiles, BlkStart, BlkLen, HQ, HKV, BLOCK_M)
    q, do, lse, delta = load_rows(Q, DO, Lse, Delta, rows, rows * REC, mask_m, D)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    scale_log2 = scale * 1.4426950408889634
    for n0 in range(k_start, t0, BLOCK_N):  # keys before the tile (tile_m % BLOCK_N == 0)
        dq = _dq_chunk(q, do, lse, delta, dq, Kd, Vd, n0, None, hk, D, scale_log2, PREC)
    hi = tl.minimum(t0 + BLOCK_M, t_end)
    for n0 in range(t0, hi, BLOCK_N):  # the diagonal
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dq = _dq_chunk(q, do, lse, delta, dq, Kd, Vd, n0, offs_n[None, :] <= offs_m[:, None], hk, D, scale_log2,
                       PREC)
    if HAS_PAST:  # rows of a document's first block have no past part (DQsum never written there)
        # compared as a vector: a scalar condition broadcast into the mask fails in the interpreter
        live = mask_m & (tl.zeros([BLOCK_M], tl.int32) < tl.load(BlkLocal + gb))
        dq += load_rows_sum(DQsum, DQscale, rows, live, D, SCALED, REC)
    ptrs = rows[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(DQ + ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])
