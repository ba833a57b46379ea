"""Fused block means: one pass over K, fp32 sums, [B, Hkv, D] out (B = blocks over the batch)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.layout import Layout


@triton.jit
def _means_kernel(K, Out, BlkStart, BlkLen, HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    gb = tl.program_id(0)
    hk = tl.program_id(1)
    start = tl.load(BlkStart + gb)
    length = tl.load(BlkLen + gb)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    for t0 in range(0, length, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ptrs = K + ((start + offs_t).to(tl.int64)[:, None] * HKV + hk) * D + offs_d[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(offs_t < length)[:, None], other=0.0).to(tl.float32), 0)
    tl.store(Out + (gb * HKV + hk) * D + offs_d, acc / length.to(tl.float32))


def block_means(k: Tensor, layout: Layout) -> Tensor:
    """k [T, Hkv, D] contiguous -> [B, Hkv, D] fp32 mean key of every block of every document."""
    _, hkv, dim = k.shape
    out = torch.empty(layout.n_blocks, hkv, dim, device=k.device, dtype=torch.float32)
    _means_kernel[(layout.n_blocks, hkv)](k, out, layout.blk_start, layout.blk_len, HKV=hkv, D=dim, BLOCK_T=64)
    return out
