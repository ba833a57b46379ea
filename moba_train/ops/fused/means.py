"""Fused block means: one pass over K, fp32 sums, [B, Hkv, D] out (B = blocks over the batch), or the three bf16
parts of each fp32 mean that the gate's bf16 products take."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.fused.layout import Layout


@triton.jit
def bf16_split(x):
    """fp32 x -> (x rounded to bf16, the fp32 remainder x - that, exact): the step that cuts an fp32 value (3 parts)
    or an fp16 one (2 parts) into bf16 parts whose sum is exactly the value."""
    hi = x.to(tl.bfloat16)
    return hi, x - hi.to(tl.float32)


@triton.jit
def _means_kernel(K, Out, BlkStart, BlkLen, part_stride, HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                  PARTS: tl.constexpr):
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
    mean = acc / length.to(tl.float32)
    out = Out + (gb * HKV + hk) * D + offs_d
    if PARTS:  # hi, mid, lo, part_stride apart; the last part is exact (fp32 has 24 mantissa bits)
        hi, rest = bf16_split(mean)
        mid, rest = bf16_split(rest)
        tl.store(out, hi)
        tl.store(out + part_stride, mid)
        tl.store(out + 2 * part_stride, rest.to(tl.bfloat16))
    else:
        tl.store(out, mean)


def block_means(k: Tensor, layout: Layout, parts: bool = False) -> Tensor:
    """k [T, Hkv, D] contiguous -> [B, Hkv, D] fp32 mean key of every block of every document; with `parts`
    [3, B, Hkv, D] bf16 hi, mid, lo, whose sum is that fp32 mean exactly."""
    _, hkv, dim = k.shape
    shape = (3, layout.n_blocks, hkv, dim) if parts else (layout.n_blocks, hkv, dim)
    out = torch.empty(shape, device=k.device, dtype=torch.bfloat16 if parts else torch.float32)
    _means_kernel[(layout.n_blocks, hkv)](k, out, layout.blk_start, layout.blk_len, layout.n_blocks * hkv * dim,
                                          HKV=hkv, D=dim, BLOCK_T=64, PARTS=parts)
    return out
