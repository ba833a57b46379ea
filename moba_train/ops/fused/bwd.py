"""Backward, KV-major: one program per (key chunk, KV head) owns that chunk's dK, dV.

It walks every query row that attends to the chunk: first the causal rows of its own block (contiguous, each
query head of the group), then the rows routed to the block from later blocks (gathered by index from the
routing). dK, dV stay in registers and are written once; dQ contributions go to an fp32 buffer [T, Hq, D] by
atomic adds, one per (row, chunk), so no per-selection copy of anything exists.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.layout import Layout
from moba_train.ops.fused.routing import Routes

LOG2E = 1.4426950408889634


@triton.jit
def _delta_kernel(Out, DOut, Delta, n_rows, D: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    ptrs = offs.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(Out + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOut + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + offs, tl.sum(o * do, 1), mask=mask)


@triton.jit
def _rows_step(Q, DO, Lse, Delta, DQ, rows, mask_m, tok, k, v, dk, dv, offs_n, mask_n, scale, scale_log2,
               D: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One tile of query rows against the program's key chunk: accumulate dK, dV; scatter-add dQ."""
    offs_d = tl.arange(0, D)
    ptrs = rows[:, None] * D + offs_d[None, :]
    q = tl.load(Q + ptrs, mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + ptrs, mask=mask_m[:, None], other=0.0)
    lse = tl.load(Lse + rows, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + rows, mask=mask_m, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    live = mask_m[:, None] & mask_n[None, :]
    if CAUSAL:
        live = live & (offs_n[None, :] <= tok[:, None])
    p = tl.where(live, tl.math.exp2(s - lse[:, None]), 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    dq = tl.dot(ds, k, input_precision=PREC) * scale
    tl.atomic_add(DQ + ptrs, dq, mask=mask_m[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _kv_kernel(Q, K, V, DO, Lse, Delta, DQ, DK, DV, Rows, SegStart, Chunks, BlkStart, BlkLen, scale, NB, N_SLOTS,
               HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
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
    k = tl.load(K + kv_off, mask=mask_n[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=mask_n[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    scale_log2 = scale * 1.4426950408889634

    # own block: queries at or after the chunk start, causal
    for g in range(group):
        for m0 in range(n0, t_end, BLOCK_M):
            tok = m0 + tl.arange(0, BLOCK_M)
            mask_m = tok < t_end
            rows = tok.to(tl.int64) * HQ + hk * group + g
            dk, dv = _rows_step(Q, DO, Lse, Delta, DQ, rows, mask_m, tok, k, v, dk, dv, offs_n, mask_n, scale,
                                scale_log2, D, True, PREC)
    # later blocks that selected this one: all slots of segment (hk, gb), contiguous in Rows
    lo = tl.load(SegStart + (hk * NB + gb) * N_SLOTS)
    hi = tl.load(SegStart + (hk * NB + gb + 1) * N_SLOTS)
    for r0 in range(lo, hi, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_r < hi
        rows = tl.load(Rows + offs_r, mask=mask_m, other=0).to(tl.int64)
        dk, dv = _rows_step(Q, DO, Lse, Delta, DQ, rows, mask_m, offs_r, k, v, dk, dv, offs_n, mask_n, scale,
                            scale_log2, D, False, PREC)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: Layout, routes: Routes,
             scale: float, interpret: bool) -> tuple[Tensor, Tensor, Tensor]:
    tokens, hq, dim = q.shape
    hkv = k.shape[1]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    block_m, block_n = (16, 16) if interpret else (64, 128)
    delta = torch.empty(tokens, hq, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(tokens * hq, 64),)](out, do, delta, tokens * hq, D=dim, BLOCK=64)
    dq = torch.zeros(tokens, hq, dim, device=q.device, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    chunks = layout.key_chunks(block_n)
    seg_start = routes.seg_start if routes.n_slots else torch.zeros(layout.n_blocks * hkv + 1, device=q.device,
                                                                       dtype=torch.int32)
    _kv_kernel[(chunks.shape[0], hkv)](q, k, v, do, lse, delta, dq, dk, dv, routes.rows, seg_start, chunks,
                                       layout.blk_start, layout.blk_len, scale, layout.n_blocks,
                                       max(routes.n_slots, 1), HQ=hq, HKV=hkv, D=dim, PREC=prec, BLOCK_M=block_m,
                                       BLOCK_N=block_n, num_warps=4 if interpret else 8, num_stages=2)
    return dq.to(q.dtype), dk, dv
