"""Decode: one new query per (row, query head) over its selected cache blocks, read in place.

The torch path gathers each head's selected blocks into a copy and runs SDPA over it, a dozen small launches per
layer. Here one program per (row, query head, selected slot) runs an online softmax over that block's keys
straight from the cache [B, Hkv, L, D] and writes a partial output with its log-sum-exp (split over slots: a
single row has too little work for one program); a second kernel merges the slots of each (row, head).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _slot_kernel(Q, K, V, Idx, Starts, Part, Lse, length, scale_log2, stride_kb, stride_kh, stride_kl,
                 stride_vb, stride_vh, stride_vl, HQ: tl.constexpr, HKV: tl.constexpr, TOP_K: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = bh // HQ
    hk = bh % HQ // (HQ // HKV)
    blk = tl.load(Idx + bh * TOP_K + slot)
    start = tl.load(Starts + b) + tl.maximum(blk, 0) * BLOCK_SIZE
    end = tl.where(blk < 0, start, tl.minimum(start + BLOCK_SIZE, length))  # -1: an unused slot, no keys
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * D + offs_d).to(tl.float32) * scale_log2
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
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
    row = bh * TOP_K + slot
    tl.store(Part + row * D + offs_d, acc / tl.where(has_keys, l_i, 1.0))
    tl.store(Lse + row, tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf")))


@triton.jit
def _merge_kernel(Part, Lse, Out, TOP_K: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    offs_k = tl.arange(0, SLOTS)
    used = offs_k < TOP_K
    lse = tl.load(Lse + bh * TOP_K + offs_k, mask=used, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))  # the own block always holds the new token: the max is finite
    offs_d = tl.arange(0, D)
    part = tl.load(Part + (bh * TOP_K + offs_k)[:, None] * D + offs_d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + bh * D + offs_d, out.to(Out.dtype.element_ty))


def decode_supported(query: Tensor, key: Tensor, value: Tensor) -> bool:
    dim = query.shape[-1]
    return (query.is_cuda and dim in (16, 32, 64, 128, 256) and key.stride(-1) == 1 and value.stride(-1) == 1
            and query.dtype == key.dtype == value.dtype)


def decode_attn(query: Tensor, key: Tensor, value: Tensor, idx: Tensor, starts: Tensor, block_size: int,
                scale: float) -> Tensor:
    """query [B, Hq, 1, D] at the last cache slot; key/value [B, Hkv, L, D]; idx [B, Hq, k] selected blocks of each
    row's document (-1 unused), counted from starts [B] (each row's first real slot) -> [B, Hq, 1, D]."""
    batch, hq, _, dim = query.shape
    hkv, length = key.shape[1], key.shape[2]
    top_k = idx.shape[-1]
    q = query.reshape(batch * hq, dim).contiguous()
    idx = idx.to(torch.int32).contiguous()
    part = torch.empty(batch * hq, top_k, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch * hq, top_k, device=q.device, dtype=torch.float32)
    _slot_kernel[(batch * hq, top_k)](q, key, value, idx, starts.to(torch.int32), part, lse, length,
                                      scale * 1.4426950408889634, *key.stride()[:3], *value.stride()[:3], HQ=hq,
                                      HKV=hkv, TOP_K=top_k, BLOCK_SIZE=block_size, D=dim,
                                      BLOCK_N=min(64, triton.next_power_of_2(block_size)), num_warps=4)
    out = torch.empty_like(q)
    _merge_kernel[(batch * hq,)](part, lse, out, TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), D=dim)
    return out.view(batch, hq, 1, dim)
