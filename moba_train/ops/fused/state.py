"""Per-row fp32 sums that outlive a launch: the forward's running acc and dQ's past part, one slot at a time.

A row meets each slot's launch at most once, so a launch reads a row's sum, adds its block and writes it back
with no atomics, and the result is bitwise deterministic. For bf16 and fp16 inputs the sum is kept as fp16
times a per-row power-of-two scale (|sum / scale| <= 1, < 2 in fp32's last binade, so any finite sum fits):
half the bytes of fp32, which is most of a fine-block slot's time, at a rounding per slot of at most 2^-12 of
the scale (2^-11 in the last binade, where the scale is capped), so < 2^-11 of the row's largest entry: an
eighth of a bf16 rounding of that entry, about one fp16 rounding. Other inputs keep fp32 sums. The scale is
a field of the pass's per-row record (fwd.py, bwd.py).
"""

import torch
import triton
import triton.language as tl


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


def is_scaled(dtype: torch.dtype) -> bool:
    """Sums stored in `dtype` carry a row scale (16-bit storage); fp32 sums do not."""
    return dtype != torch.float32


@triton.jit
def load_rows_sum(Sums, Scale, rows, mask, D: tl.constexpr, SCALED: tl.constexpr, REC: tl.constexpr):
    """fp32 [rows, D]; masked rows read 0. A row's scale is at Scale + row * REC (REC > 1: one field of a
    per-row record, so the row's other fields share its 32-byte sector)."""
    offs_d = tl.arange(0, D)
    acc = tl.load(Sums + rows[:, None] * D + offs_d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    if SCALED:
        acc = acc * tl.load(Scale + rows * REC, mask=mask, other=1.0)[:, None]
    return acc


@triton.jit
def store_rows_sum(Sums, Scale, rows, mask, acc, D: tl.constexpr, SCALED: tl.constexpr, REC: tl.constexpr):
    offs_d = tl.arange(0, D)
    if SCALED:  # the smallest power of two >= the row's largest |entry| (floored at the smallest normal: zero
        # rows), capped at 2^127: fp32 has no 2^128, and |sum / 2^127| < 2 still fits fp16
        big = tl.maximum(tl.max(tl.abs(acc), 1), 1.1754943508222875e-38)
        scale = tl.math.exp2(tl.minimum(tl.math.ceil(tl.math.log2(big)), 127.0))
        tl.store(Scale + rows * REC, scale, mask=mask)
        acc = acc * (1.0 / scale)[:, None]
    tl.store(Sums + rows[:, None] * D + offs_d[None, :], acc.to(Sums.dtype.element_ty), mask=mask[:, None])
