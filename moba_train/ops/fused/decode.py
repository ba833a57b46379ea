"""Decode: one new query per (row, query head) routes over the cached block means and attends to its selected
blocks, read in place.

The torch path scores, picks, gathers each head's selected blocks into a copy and runs SDPA over it: some twenty
small launches per layer, which bound a decode step at batch 1. Here three kernels: the gate (one program per
(row, query head) scores the past blocks a chunk at a time into the prefill gate's running top-(k-1)); one program
per (row, query head, selected slot, piece of PIECE keys) runs an online softmax over those keys straight from the
cache [B, Hkv, L, D] and writes a partial output with its log-sum-exp (one row has too little work for one
program); a merge of the pieces of each (row, head).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.gate import empty_top, update_top

PIECE = 512  # keys per program in the attention kernel (a block's last piece may be shorter)
MERGE_CHUNK = 16  # partial outputs the merge holds at a time
GATE_CHUNK = 64  # block means the gate scores at a time


# length grows by one per step and n_means with the cache: specialising on them (equal to 1, a multiple of 16)
# compiled another variant mid-generation, a ~0.3 s stall; nothing here depends on the cache's size at compile time
@triton.jit(do_not_specialize=["length", "n_means"])
def _gate_kernel(Q, Means, Starts, Idx, length, n_means, stride_mb, stride_mh, stride_mn, HQ: tl.constexpr,
                 HKV: tl.constexpr, TOP_K: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                 CHUNK: tl.constexpr, KP: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HQ
    hk = bh % HQ // (HQ // HKV)
    own = (length - 1 - tl.load(Starts + b)) // BLOCK_SIZE  # blocks before it are complete and compete
    n_past = tl.minimum(own, n_means)  # equal for a caller that keeps its promise; never reads past the buffer
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * D + offs_d).to(tl.float32)
    m_base = Means + b.to(tl.int64) * stride_mb + hk.to(tl.int64) * stride_mh
    col = tl.arange(0, CHUNK)
    slot = tl.arange(0, KP)
    top_v, top_i = empty_top(slot, 1, TOP_K, KP)
    for c0 in range(0, n_past, CHUNK):  # fp32 scores q . mean (no scale, as in the prefill gate), a chunk at a time
        live = c0 + col < n_past
        means = tl.load(m_base + (c0 + col)[:, None] * stride_mn + offs_d[None, :], mask=live[:, None], other=0.0)
        s = tl.where(live, tl.sum(means * q[None, :], 1), float("-inf"))
        top_v, top_i = update_top(s[None, :], top_v, top_i, c0, col, slot, TOP_K, CHUNK, KP)
    tl.store(Idx + bh * TOP_K + slot[None, :], top_i, mask=slot[None, :] < TOP_K - 1)  # -1 where none is left
    tl.store(Idx + bh * TOP_K + TOP_K - 1, own)


@triton.jit(do_not_specialize=["length"])
def _slot_kernel(Q, K, V, Idx, Starts, Part, Lse, length, scale_log2, stride_kb, stride_kh, stride_kl,
                 stride_vb, stride_vh, stride_vl, HQ: tl.constexpr, HKV: tl.constexpr, TOP_K: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, PIECE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    part = tl.program_id(1)  # piece `part % pieces` of the block in slot `part // pieces`
    pieces: tl.constexpr = (BLOCK_SIZE + PIECE - 1) // PIECE  # the last one shorter where PIECE does not divide
    b = bh // HQ
    hk = bh % HQ // (HQ // HKV)
    blk = tl.load(Idx + bh * TOP_K + part // pieces)
    blk_start = tl.load(Starts + b) + tl.maximum(blk, 0) * BLOCK_SIZE
    start = blk_start + part % pieces * PIECE
    end = tl.minimum(tl.minimum(start + PIECE, blk_start + BLOCK_SIZE), length)
    end = tl.where(blk < 0, start, end)  # -1: an unused slot, no keys
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * D + offs_d).to(tl.float32) * scale_log2
    # 64-bit offsets: a KV head's stride is L x D, past 2^31 elements in a few heads at multi-million caches
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        live = offs_n < end
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * stride_kl + offs_d[None, :], mask=live[:, None],
                    other=0.0)
        s = tl.where(live, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vl + offs_d[None, :], mask=live[:, None],
                    other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)  # an empty piece: zero output, LSE -inf (no weight in the merge)
    row = bh * TOP_K * pieces + part
    tl.store(Part + row * D + offs_d, acc / l_safe)
    tl.store(Lse + row, tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf")))


@triton.jit
def _merge_kernel(Part, Lse, Out, N_PARTS: tl.constexpr, PARTS_POW2: tl.constexpr, D: tl.constexpr,
                  CHUNK: tl.constexpr):
    bh = tl.program_id(0)
    offs_k = tl.arange(0, PARTS_POW2)
    lse = tl.load(Lse + bh * N_PARTS + offs_k, mask=offs_k < N_PARTS, other=float("-inf"))
    top = tl.max(lse, 0)  # the own block's first piece holds a key: finite
    total = tl.sum(tl.math.exp2(lse - top), 0)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    for c0 in range(0, N_PARTS, CHUNK):  # a chunk of partial outputs at a time: top_k x pieces can be hundreds
        offs = c0 + tl.arange(0, CHUNK)
        used = offs < N_PARTS
        w = tl.math.exp2(tl.load(Lse + bh * N_PARTS + offs, mask=used, other=float("-inf")) - top)
        part = tl.load(Part + (bh * N_PARTS + offs)[:, None] * D + offs_d[None, :], mask=used[:, None], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
    tl.store(Out + bh * D + offs_d, (acc / total).to(Out.dtype.element_ty))


def decode_supported(query: Tensor, key: Tensor, value: Tensor) -> bool:
    dim = query.shape[-1]
    return (query.is_cuda and dim in (16, 32, 64, 128, 256) and key.stride(-1) == 1 and value.stride(-1) == 1
            and query.dtype == key.dtype == value.dtype)


def decode_gate(query: Tensor, means: Tensor, starts: Tensor, length: int, block_size: int, top_k: int,
                n_past: int) -> Tensor:
    """query [B, Hq, 1, D] at cache slot length - 1; means [B, Hkv, N, D] fp32 of each row's complete blocks
    (the first n_past, the most past blocks of any row, filled), counted from starts [B] -> [B, Hq, top_k] int32
    selected blocks: the best top_k - 1 past ones by q . mean (-1 where fewer exist), the own block last."""
    batch, hq, _, dim = query.shape
    if means.shape[2] < n_past:  # the kernel reads n_past means per row: it would read past the buffer
        raise ValueError(f"decode_gate: means hold {means.shape[2]} blocks, rows have up to {n_past} past blocks")
    idx = torch.empty(batch, hq, top_k, device=query.device, dtype=torch.int32)
    _gate_kernel[(batch * hq,)](query.reshape(batch * hq, dim).contiguous(), means, starts.to(torch.int32), idx,
                                length, means.shape[2], *means.stride()[:3], HQ=hq, HKV=means.shape[1],
                                TOP_K=top_k, BLOCK_SIZE=block_size, D=dim, CHUNK=GATE_CHUNK,
                                KP=triton.next_power_of_2(top_k), num_warps=4)
    return idx


def decode_attn(query: Tensor, key: Tensor, value: Tensor, idx: Tensor, starts: Tensor, block_size: int,
                scale: float) -> Tensor:
    """query [B, Hq, 1, D] at the last cache slot; key/value [B, Hkv, L, D]; idx [B, Hq, k] selected blocks of each
    row's document (-1 unused), counted from starts [B] (each row's first real slot) -> [B, Hq, 1, D]."""
    batch, hq, _, dim = query.shape
    hkv, length = key.shape[1], key.shape[2]
    top_k = idx.shape[-1]
    q = query.reshape(batch * hq, dim).contiguous()
    idx = idx.to(torch.int32).contiguous()  # no copy for decode_gate's
    # blocks split into pieces of PIECE keys: batch-1 decode has too few (row, head, slot) programs to fill the GPU
    # (H100, 32 heads, one layer, 1M cache: 4096/12 0.45 -> 0.32 ms, 1024/8 0.11 -> 0.07 ms; 256-2048 within 10%)
    piece = min(block_size, PIECE)
    n_parts = top_k * triton.cdiv(block_size, piece)
    part = torch.empty(batch * hq, n_parts, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch * hq, n_parts, device=q.device, dtype=torch.float32)
    _slot_kernel[(batch * hq, n_parts)](q, key, value, idx, starts.to(torch.int32), part, lse, length,
                                        scale * 1.4426950408889634, *key.stride()[:3], *value.stride()[:3], HQ=hq,
                                        HKV=hkv, TOP_K=top_k, BLOCK_SIZE=block_size, PIECE=piece, D=dim,
                                        BLOCK_N=min(64, triton.next_power_of_2(piece)), num_warps=4)
    out = torch.empty_like(q)
    _merge_kernel[(batch * hq,)](part, lse, out, N_PARTS=n_parts, PARTS_POW2=triton.next_power_of_2(n_parts), D=dim,
                                 CHUNK=MERGE_CHUNK)
    return out.view(batch, hq, 1, dim)
