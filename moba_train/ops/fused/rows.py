"""Loads of per-row values ([rows]) and row tiles ([rows, D]) under an optional row mask.

A mask of None means every row is real: the loads then carry no predicate and no zero-fill size, which in dK/dV's
loop over gathered rows was a fifth of its instructions (docs/kernels.md, item 36). Kernels pass None for whole
row tiles and a mask only for the short tail.
"""

import triton
import triton.language as tl


@triton.jit
def row_load(ptrs, mask, other):
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=other)
    return x


@triton.jit
def tile_load(ptrs, mask, other):
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask[:, None], other=other)
    return x
