"""dK, dV, KV-major: one program per (key chunk, KV head) owns that chunk's dK, dV in registers.

It walks every query row that attends to the chunk: first the causal rows of its own block (contiguous, each
query head of the group), then the rows routed to the block from later blocks (gathered by index, all slots
of segment (kv head, block) are contiguous in the routing). Scores are formed transposed ([keys, rows]) so
every matrix product takes its register operand as is; dQ is left to bwd_q (no atomics here).
"""

import triton
import triton.language as tl

from moba_train.ops.fused.bwd_q import load_rows


@triton.jit
def _kv_step(Q, DO, Lse, Delta, rows, mask_m, tok, k, v, dk, dv, offs_n, scale_log2,
             D: tl.constexpr, REC: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    q, do, lse, delta = load_rows(Q, DO, Lse, Delta, rows, mask_m, D, REC)
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


@triton.jit(do_not_specialize=["NB"])
def kv_kernel(Q, Kd, Vd, DO, Lse, Delta, DK, DV, Rows, SegStart, Chunks, BlkStart, BlkLen, scale, NB, N_SLOTS,
              HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, REC: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
            mask_m = tok < t_end
            dk, dv = _kv_step(Q, DO, Lse, Delta, tok.to(tl.int64) * HQ + head, mask_m, tok, k, v, dk, dv, offs_n,
                              scale_log2, D, REC, True, PREC)
        for m0 in range(n0 + diag, t_end, BLOCK_M):
            tok = m0 + tl.arange(0, BLOCK_M)
            mask_m = tok < t_end
            dk, dv = _kv_step(Q, DO, Lse, Delta, tok.to(tl.int64) * HQ + head, mask_m, tok, k, v, dk, dv, offs_n,
                              scale_log2, D, REC, False, PREC)
    # later blocks that selected this one
    lo = tl.load(SegStart + (hk * NB + gb) * N_SLOTS)
    hi = tl.load(SegStart + (hk * NB + gb + 1) * N_SLOTS)
    for r0 in range(lo, hi, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_r < hi
        rows = tl.load(Rows + offs_r, mask=mask_m, other=0).to(tl.int64)
        dk, dv = _kv_step(Q, DO, Lse, Delta, rows, mask_m, offs_r, k, v, dk, dv, offs_n, scale_log2, D, REC,
                          False, PREC)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
