"""dK, dV, KV-major: one program per (key chunk, KV head) owns that chunk's dK, dV in registers.

It walks every query row that attends to the chunk: first the causal rows of its own block (contiguous, each
query head of the group), then the rows routed to the block from later blocks (gathered by index, all slots
of segment (kv head, block) are contiguous in the routing; where a block spans several key chunks, their lse
and delta come from copies in routing order, `bwd.routed_records`, so each chunk loads them contiguously).
Whole row tiles go unmasked. Scores are formed transposed ([keys, rows]) so every matrix product takes its
register operand as is; dQ is left to bwd_q (no atomics here).
"""

import triton
import triton.language as tl

from moba_train.ops.fused.bwd_q import load_rows
from moba_train.ops.fused.rows import row_load


@triton.jit
def _kv_step(q, do, lse, delta, tok, k, v, dk, dv, offs_n, scale_log2, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2  # [keys, rows]
    # rows past the end load q = dO = 0 and add nothing; keys past the end are never stored: only causality masks
    p_t = tl.math.exp2(s_t - lse[None, :])
    if CAUSAL:
        p_t = tl.where(offs_n[:, None] <= tok[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _kv_rows(Q, DO, Lse, Delta, Rows, offs, mask, head, k, v, dk, dv, offs_n, scale_log2, HQ: tl.constexpr,
             D: tl.constexpr, REC: tl.constexpr, PREC: tl.constexpr, GATHER: tl.constexpr, ROUTED: tl.constexpr):
    """`_kv_step` over one tile of rows, no causal mask (mask None: a whole tile). GATHER: routed rows at positions
    offs of Rows (ROUTED: Lse, Delta are the routing-order copies); else tokens offs of query head `head`. Lse and
    Delta are otherwise fields of the per-row record."""
    if GATHER:
        rows = row_load(Rows + offs, mask, 0).to(tl.int64)
        rec = offs if ROUTED else rows * REC
    else:
        rows = offs.to(tl.int64) * HQ + head
        rec = rows * REC
    q, do, lse, delta = load_rows(Q, DO, Lse, Delta, rows, rec, mask, D)
    return _kv_step(q, do, lse, delta, offs, k, v, dk, dv, offs_n, scale_log2, False, PREC)


@triton.jit
def _kv_walk(Q, DO, Lse, Delta, Rows, lo, hi, head, k, v, dk, dv, offs_n, scale_log2, HQ: tl.constexpr,
             D: tl.constexpr, REC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, GATHER: tl.constexpr,
             ROUTED: tl.constexpr):
    """`_kv_rows` over rows lo .. hi: whole tiles unmasked, then the short tail."""
    full = lo + tl.maximum(hi - lo, 0) // BLOCK_M * BLOCK_M
    for r0 in range(lo, full, BLOCK_M):
        dk, dv = _kv_rows(Q, DO, Lse, Delta, Rows, r0 + tl.arange(0, BLOCK_M), None, head, k, v, dk, dv, offs_n,
                          scale_log2, HQ, D, REC, PREC, GATHER, ROUTED)
    if full < hi:
        offs = full + tl.arange(0, BLOCK_M)
        dk, dv = _kv_rows(Q, DO, Lse, Delta, Rows, offs, offs < hi, head, k, v, dk, dv, offs_n, scale_log2, HQ, D,
                          REC, PREC, GATHER, ROUTED)
    return dk, dv


@triton.jit(do_not_specialize=["NB"])
def kv_kernel(Q, Kd, Vd, DO, Lse, Delta, RLse, RDelta, DK, DV, Rows, SegStart, Chunks, BlkStart, BlkLen, scale, NB,
              N_SLOTS, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, REC: tl.constexpr, PREC: tl.constexpr,
              ROUTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    chunk = tl.program_id(0)
    hk = tl.program_id(1)
    group: tl.constexpr = HQ // HKV
    gb = tl.load(Chunks + 2 * chunk)
    n0 = tl.load(Chunks + 2 * chunk + 1)
    t_end = tl.load(BlkStart + gb) + tl.load(BlkLen + gb)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < t_end
    offs_d = tl.arange(0, D)
    kv_off = (offs_n.to(tl.int64)[:, None] * HKV + hk) * D + offs_d[None, :]
    # TMA: K and V land in shared memory, where the products read them, instead of taking registers
    k = Kd.load([n0, hk * D])
    v = Vd.load([n0, hk * D])
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    scale_log2 = scale * 1.4426950408889634

    # own block: queries at or after the chunk start; the causal mask only matters for the first BLOCK_N rows
    diag: tl.constexpr = (BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    for g in range(group):
        head = hk * group + g
        for m0 in range(n0, n0 + diag, BLOCK_M):
            tok = m0 + tl.arange(0, BLOCK_M)
            rows = tok.to(tl.int64) * HQ + head
            q, do, lse, delta = load_rows(Q, DO, Lse, Delta, rows, rows * REC, tok < t_end, D)
            dk, dv = _kv_step(q, do, lse, delta, tok, k, v, dk, dv, offs_n, scale_log2, True, PREC)
        dk, dv = _kv_walk(Q, DO, Lse, Delta, Rows, n0 + diag, t_end, head, k, v, dk, dv, offs_n, scale_log2, HQ, D,
                          REC, PREC, BLOCK_M, False, False)
    # later blocks that selected this one
    lo = tl.load(SegStart + (hk * NB + gb) * N_SLOTS)
    hi = tl.load(SegStart + (hk * NB + gb + 1) * N_SLOTS)
    dk, dv = _kv_walk(Q, DO, RLse, RDelta, Rows, lo, hi, 0, k, v, dk, dv, offs_n, scale_log2, HQ, D, REC, PREC,
                      BLOCK_M, True, ROUTED)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
