"""Tile configs of the fused kernels, in one place.

Tuned on an H100 at head_dim 128 in bf16 (scripts/tune_attention.py; docs/kernels.md has the sweeps). Wider rows
(fp32, or head_dim 256) take smaller chunks and fewer stages so the pipelined buffers stay within Hopper's
227 KiB of shared memory; the interpreter takes the smallest tiles that keep its runs short.
"""

from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor


def kv_desc(x: Tensor, block_n: int) -> TensorDescriptor:
    """TMA descriptor of K or V [T, Hkv, D] as [T, Hkv * D]: a chunk of one KV head is the box at (token, hk * D).

    Rows past T load as zeros; rows past a block's end but inside T load real keys, which the kernels mask.
    """
    tokens, heads, dim = x.shape
    return TensorDescriptor(x.view(tokens, heads * dim), [tokens, heads * dim], [heads * dim, 1], [block_n, dim])


def tiles(block_size: int, dim: int, elem_bytes: int, interpret: bool = False) -> dict:
    if interpret:  # kv: rows < keys on purpose, so CI covers the diagonal walk with more than one row tile
        return {"past_rows": 16, "past": {"BLOCK_N": 16}, "own": {"BLOCK_N": 16},
                "kv": {"BLOCK_M": 16, "BLOCK_N": 32}, "dq_past": {"BLOCK_N": 16}, "dq_own": {"BLOCK_N": 16}}
    width = dim * elem_bytes
    if width <= 256:
        wide_keys = block_size >= 128  # 128-key chunks would half-mask 64-token blocks
        # a past-pass program of a block <= 128 walks one or two key chunks: bound by the latency of its row
        # gathers, so 64-row tiles in one warp group, two programs per SM, hide one's loads behind the other's work
        fine = block_size <= 128
        return {
            "past_rows": 64 if fine else 128,
            "past": ({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3} if fine else
                     {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
            "own": {"BLOCK_N": 128 if wide_keys else 64, "num_warps": 8, "num_stages": 3},
            "kv": ({"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8,
                    "num_stages": 4 if block_size >= 4096 else 3 if block_size >= 2048 else 2}
                   if wide_keys else {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}),
            "dq_past": ({"BLOCK_N": 64, "num_warps": 8, "num_stages": 3} if block_size >= 2048 else
                        {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2} if fine else
                        {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}),
            "dq_own": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        }
    return {"past_rows": 128, "past": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
            "own": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
            "kv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
            "dq_past": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
            "dq_own": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}}
