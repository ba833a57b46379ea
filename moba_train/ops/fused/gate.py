"""Fused gate: scores against past block means, causal candidate mask and top-k, never a score tensor.

One program per (query tile, query head). Tiles never straddle blocks, so every row of a tile has the same
candidates (blocks 0..b-1 of its document); the program streams their means in chunks and keeps a running
top-(k-1) per row in registers: merged chunk by chunk in rounds, or for top_k <= 3 per column ("lane") of the
chunk, elementwise, and merged once at the end. Scores keep fp32 semantics so selections match the reference: for bf16
queries each fp32 mean comes as three bf16 parts that add up to it exactly, made once per call by `block_means`
(split inside every program that reads them, the gate took 13% longer), and the three products run on the tensor
cores with fp32 accumulation, since a bf16 x bf16 product is exact in fp32. fp16 queries are two bf16 parts each
(exact: 11 mantissa bits), so six products; fp32 queries take the fp32 `ieee` dot (FMA units, several times
slower).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.layout import Layout, own_tile
from moba_train.ops.fused.means import bf16_split, block_means


@triton.jit
def empty_top(slot, ROWS: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr):
    """Running top-(k-1) of ROWS rows before any score: -inf in the k-1 live slots, +inf past them (never the
    worst entry, so never replaced or selected); blocks -1."""
    top_v = tl.where(slot[None, :] < TOPK - 1, float("-inf"), float("inf")) + tl.zeros([ROWS, KP], tl.float32)
    return top_v, tl.full([ROWS, KP], -1, tl.int32)


@triton.jit
def update_top(s, top_v, top_i, c0, col, slot, TOPK: tl.constexpr, BLOCK_B: tl.constexpr, KP: tl.constexpr):
    """Merge a chunk of scores s [rows, BLOCK_B] (blocks c0 + col, -inf where none) into each row's running
    top-(k-1) (top_v, top_i [rows, KP]; slots past k-1 hold +inf). The order is (score desc, block asc): a row's
    best remaining score (its lowest block on ties) replaces the row's worst entry, the lowest score and among
    equal ones the highest block, if strictly larger (chunks come in ascending blocks, so an equal score is a
    higher block). Rounds: at most the largest count, over rows, of scores above the row's worst entry."""
    above = tl.sum((s > tl.min(top_v, 1)[:, None]).to(tl.int32), 1)
    for _ in range(0, tl.minimum(tl.max(above, 0), TOPK - 1)):
        # positions by equality then min/max: plain reductions, cheaper than argmax/argmin's (value, index) pairs
        best = tl.max(s, 1)
        arg = tl.min(tl.where(s == best[:, None], col[None, :], BLOCK_B), 1)
        low = tl.min(top_v, 1)
        # unique per slot (empty slots hold block -1); the evicted one is the highest among the tied lowest
        key = tl.where(top_v == low[:, None], top_i * KP + slot[None, :], -(1 << 30))
        evict = tl.max(key, 1)
        put = (best > low)[:, None] & (key == evict[:, None])
        top_v = tl.where(put, best[:, None], top_v)
        top_i = tl.where(put, (c0 + arg)[:, None], top_i)
        s = tl.where(col[None, :] == arg[:, None], float("-inf"), s)
    return top_v, top_i


@triton.jit
def chunk_scores(q, q_lo, Means, first, b, c0, hk, part_stride, col, offs_d,
                 HKV: tl.constexpr, D: tl.constexpr, Q_PARTS: tl.constexpr):
    """Scores [rows, BLOCK_B] of the tile's rows against past blocks c0 + col, -inf past block b - 1."""
    offs_b = c0 + col
    mask_b = offs_b < b
    ptrs = Means + ((first + offs_b)[:, None] * HKV + hk) * D + offs_d[None, :]
    if Q_PARTS == 1:  # Means holds the parts hi, mid, lo part_stride apart; smallest first
        s = tl.dot(q, tl.trans(tl.load(ptrs + 2 * part_stride, mask=mask_b[:, None], other=0.0)))
        s = tl.dot(q, tl.trans(tl.load(ptrs + part_stride, mask=mask_b[:, None], other=0.0)), s)
        s = tl.dot(q, tl.trans(tl.load(ptrs, mask=mask_b[:, None], other=0.0)), s)
    elif Q_PARTS == 2:  # both query parts times the three mean parts, smallest products first
        lo = tl.load(ptrs + 2 * part_stride, mask=mask_b[:, None], other=0.0)
        mid = tl.load(ptrs + part_stride, mask=mask_b[:, None], other=0.0)
        s = tl.dot(q_lo, tl.trans(lo))
        s = tl.dot(q_lo, tl.trans(mid), s)
        s = tl.dot(q, tl.trans(lo), s)
        hi = tl.load(ptrs, mask=mask_b[:, None], other=0.0)
        s = tl.dot(q_lo, tl.trans(hi), s)
        s = tl.dot(q, tl.trans(mid), s)
        s = tl.dot(q, tl.trans(hi), s)
    else:
        s = tl.dot(q, tl.trans(tl.load(ptrs, mask=mask_b[:, None], other=0.0)), input_precision="ieee")
    return tl.where(mask_b[None, :], s, float("-inf"))


@triton.jit
def lane_push(s, blk, v0, i0, v1, i1, DEPTH: tl.constexpr):
    """Insert a chunk of scores s (blocks blk) into each column's ("lane's") own sorted list v0 >= v1 of DEPTH
    entries: elementwise, no cross-thread step. Chunks come in ascending blocks, so a score equal to a kept one
    ranks below it (order: score desc, block asc). A row's best DEPTH are among its lanes' best DEPTH."""
    g0 = s > v0
    if DEPTH == 2:
        g1 = s > v1
        v1 = tl.where(g0, v0, tl.where(g1, s, v1))
        i1 = tl.where(g0, i0, tl.where(g1, blk, i1))
    return tl.where(g0, s, v0), tl.where(g0, blk, i0), v1, i1


@triton.jit
def lane_merge(v0, i0, v1, i1, slot, ROWS: tl.constexpr, KP: tl.constexpr, DEPTH: tl.constexpr):
    """The best DEPTH of the lanes' lists per row, as blocks in slots 0..DEPTH-1 (-1 where a row has fewer
    candidates)."""
    top_i = tl.full([ROWS, KP], -1, tl.int32)
    for r in tl.static_range(DEPTH):
        best = tl.max(v0, 1)
        if DEPTH == 2:
            best = tl.maximum(best, tl.max(v1, 1))
        arg = tl.min(tl.where(v0 == best[:, None], i0, 1 << 30), 1)
        if DEPTH == 2:
            arg = tl.minimum(arg, tl.min(tl.where(v1 == best[:, None], i1, 1 << 30), 1))
        top_i = tl.where(slot[None, :] == r, tl.where(best > float("-inf"), arg, -1)[:, None], top_i)
        v0 = tl.where(i0 == arg[:, None], float("-inf"), v0)
        v1 = tl.where(i1 == arg[:, None], float("-inf"), v1)
    return top_i


@triton.jit
def rounds_top(q, q_lo, Means, first, b, hk, part_stride, col, offs_d, slot, HKV: tl.constexpr, D: tl.constexpr,
               Q_PARTS: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_B: tl.constexpr):
    """A running top-(k-1) per row merged chunk by chunk (`update_top`): exact for any k."""
    top_v, top_i = empty_top(slot, BLOCK_M, TOPK, KP)
    for c0 in range(0, b, BLOCK_B):
        s = chunk_scores(q, q_lo, Means, first, b, c0, hk, part_stride, col, offs_d, HKV, D, Q_PARTS)
        top_v, top_i = update_top(s, top_v, top_i, c0, col, slot, TOPK, BLOCK_B, KP)
    return top_i


@triton.jit
def _gate_kernel(Q, Means, Out, QTiles, BlkStart, BlkLen, BlkLocal, part_stride,
                 HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, Q_PARTS: tl.constexpr, DEPTH: tl.constexpr):
    hk, t0, gb, k_start, t_end, offs_m, mask_m, rows = own_tile(QTiles, BlkStart, BlkLen, HQ, HKV, BLOCK_M)
    b = tl.load(BlkLocal + gb)
    first = gb - b  # global index of the document's block 0
    offs_d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    # Q_PARTS: 0 fp32 queries (the `ieee` dot over fp32 means), 1 bf16 queries, 2 fp16 queries as two bf16 parts
    # that add up to them exactly (11 mantissa bits); 1 and 2 read the means' three bf16 parts
    q_lo = q
    if Q_PARTS == 0:
        q = q.to(tl.float32)
    elif Q_PARTS == 2:
        q, q_lo = bf16_split(q.to(tl.float32))
        q_lo = q_lo.to(tl.bfloat16)

    slot = tl.arange(0, KP)
    col = tl.arange(0, BLOCK_B)
    top_i = tl.full([BLOCK_M, KP], -1, tl.int32)
    if DEPTH > 0:  # lanes: exact only when they hold all k-1 picks
        tl.static_assert(DEPTH == TOPK - 1 and DEPTH <= 2)
        v0 = tl.full([BLOCK_M, BLOCK_B], float("-inf"), tl.float32)
        i0 = tl.full([BLOCK_M, BLOCK_B], -1, tl.int32)
        v1, i1 = v0, i0
        for c0 in range(0, b, BLOCK_B):
            s = chunk_scores(q, q_lo, Means, first, b, c0, hk, part_stride, col, offs_d, HKV, D, Q_PARTS)
            v0, i0, v1, i1 = lane_push(s, (c0 + col)[None, :] + tl.zeros_like(i0), v0, i0, v1, i1, DEPTH)
        top_i = lane_merge(v0, i0, v1, i1, slot, BLOCK_M, KP, DEPTH)
    elif TOPK > 1:
        top_i = rounds_top(q, q_lo, Means, first, b, hk, part_stride, col, offs_d, slot, HKV, D, Q_PARTS, TOPK, KP,
                           BLOCK_M, BLOCK_B)

    # canonical order: ascending past blocks, then the own block, then -1
    big = 1 << 30
    key = tl.sort(tl.where(top_i < 0, big, top_i), 1)
    n_past = tl.sum((top_i >= 0).to(tl.int32), 1)
    sel = tl.where(slot[None, :] < n_past[:, None], key, tl.where(slot[None, :] == n_past[:, None], b, -1))
    tl.store(Out + rows[:, None] * TOPK + slot[None, :], sel, mask=mask_m[:, None] & (slot[None, :] < TOPK))


def gate_config(top_k: int, max_doc_blocks: int, dim: int) -> dict:
    """Launch config of the gate. Lanes (DEPTH = k - 1) for top_k <= 3 where rows meet many chunks of means:
    on an H100 at 256 blocks (c:128K) 1.81 -> 1.52 ms at head_dim 128 (eight warps keep the lanes in registers)
    and 1.43 -> 0.98 at head_dim 64 (four warps, 16-mean chunks); at 512 blocks 6.21 -> 4.38 (head_dim 128); at
    64-128 blocks the rounds are as fast. (A batch whose longest document first passes 128 blocks compiles the
    lane variant once.) Deeper lanes lost to the rounds (top_k 8: 8.4 -> 12.8 ms at b:128K;
    docs/kernels.md item 44)."""
    if top_k <= 3 and max_doc_blocks > 128:
        return {"BLOCK_B": 16, "num_warps": 4, "DEPTH": top_k - 1} if dim <= 64 else \
            {"BLOCK_B": 32, "num_warps": 8, "DEPTH": top_k - 1}
    return {"BLOCK_B": 32, "num_warps": 4, "DEPTH": 0}


def select(q: Tensor, k: Tensor, layout: Layout, top_k: int, cfg: dict | None = None) -> Tensor:
    """q [T, Hq, D], k [T, Hkv, D] contiguous -> [T, Hq, top_k] int32 canonical selection."""
    tokens, hq, dim = q.shape
    out = torch.empty(tokens, hq, top_k, device=q.device, dtype=torch.int32)
    # bf16 parts on the GPU only: the interpreter's bf16 dot is inexact
    q_parts = {torch.bfloat16: 1, torch.float16: 2}.get(q.dtype, 0) if q.is_cuda else 0
    means = block_means(k, layout, parts=q_parts > 0)
    grid = (layout.q_tiles.shape[0], hq)
    _gate_kernel[grid](q, means, out, layout.q_tiles, layout.blk_start, layout.blk_len, layout.blk_local,
                       means[0].numel() if q_parts else 0, HQ=hq, HKV=k.shape[1], D=dim, TOPK=top_k,
                       KP=triton.next_power_of_2(top_k), BLOCK_M=layout.tile_m, Q_PARTS=q_parts,
                       **(cfg or gate_config(top_k, layout.max_doc_blocks, dim)))
    return out
