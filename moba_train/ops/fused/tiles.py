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
    """Launch configs per pass. A routing entry holds up to `past_rows` rows of one segment. `whole_block`: the
    past passes' programs hold their block's K and V (blocks of at most 128 keys) and walk the entry's rows in
    tiles of BLOCK_M; otherwise an entry is one tile and the block's keys stream in chunks of BLOCK_N."""
    keys = dot_size(block_size)  # a chunk holding the whole block
    dq_block = {"BLOCK_N": min(64, keys), "CHUNKS": max(1, keys // 64)}  # dQ holds the block as 64-key chunks
    if interpret:  # kv: rows < keys on purpose, so CI covers the diagonal walk with more than one row tile;
        # blocks <= 32 take the whole-block past passes with two row tiles per entry, larger ones the tiled ones
        whole = block_size <= 32
        return {"past_rows": 32 if whole else 16, "whole_block": whole,
                "past": {"BLOCK_M": 16, "BLOCK_N": keys} if whole else {"BLOCK_N": 16},
                "dq_past": {"BLOCK_M": 16, **dq_block} if whole else {"BLOCK_N": 16},
                "own": {"BLOCK_N": 16}, "kv": {"BLOCK_M": 16, "BLOCK_N": 32}, "dq_own": {"BLOCK_N": 16}}
    width = dim * elem_bytes
    if width <= 256:
        wide_keys = block_size >= 128  # 128-key chunks would half-mask 64-token blocks
        # a block <= 128 is one or two key chunks: a program that took one row tile per block mostly moved rows
        # and reloaded the block; holding the block over an entry of up to 512 rows reloads it less. dQ keeps
        # 64-key score tiles and one stage, so two programs fit per SM (a 128-key tile or a second stage: one).
        fine = block_size <= 128
        # rows of at most 128 bytes (head_dim 64 in bf16) leave room for more programs per SM: four-warp
        # programs with narrower row tiles win every stage there, and at fine blocks one 64-row tile per program
        # beats holding the block (docs/kernels.md, item 32)
        narrow = width <= 128
        whole = fine and not narrow
        return {
            "past_rows": 512 if whole else 64 if fine else 128, "whole_block": whole,
            "past": ({"BLOCK_M": 64, "BLOCK_N": keys, "num_warps": 4, "num_stages": 3} if whole else
                     {"BLOCK_N": 64, "num_warps": 4 if fine else 8, "num_stages": 3} if narrow else
                     {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
            "own": {"BLOCK_N": 128 if wide_keys else 64, "num_warps": 4 if narrow else 8, "num_stages": 3},
            # dK/dV: since its row loop lost its per-load masks (item 36), four-warp 64x64 tiles (two programs per
            # SM) beat 128-key eight-warp ones at 128- and 512-key blocks (256 and 1024 take them too); from 2048
            # on the eight-warp tile holds. Narrow rows: a third stage since item 36 (-6-11%, item 40)
            "kv": ({"BLOCK_M": 32 if narrow else 64, "BLOCK_N": 128, "num_warps": 4 if narrow else 8,
                    "num_stages": 4 if not narrow and block_size >= 4096 else 3}
                   if wide_keys and (narrow or block_size >= 2048) else
                   {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}),
            "dq_past": ({"BLOCK_M": 64, **dq_block, "num_warps": 4, "num_stages": 1} if whole else
                        {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2 if fine else 3} if narrow else
                        {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3} if block_size >= 2048 else
                        {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}),
            "dq_own": {"BLOCK_N": 64, "num_warps": 4 if narrow else 8, "num_stages": 3},
        }
    # 512-byte rows (head_dim 256 in bf16, 128 in fp32): eight warps throughout; four-warp backward programs
    # spilled kilobytes of registers and ran 2.7-3.6x slower at head_dim 256 (docs/kernels.md, item 35)
    return {"past_rows": 128, "whole_block": False,
            "past": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
            "own": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
            "kv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
            "dq_past": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
            "dq_own": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2}}


def dot_size(n: int) -> int:
    """n rounded up to a power of two, at least 16 (tl.dot's minimum): the key chunk that holds a whole block,
    and the head size the kernels run."""
    return max(16, 1 << (n - 1).bit_length())


def past_launch(block_kernel, tile_kernel, cfg: dict, name: str, tile_m: int) -> tuple:
    """(kernel, launch constants) of a past pass (`name`: "past" or "dq_past"): the whole-block kernel with its
    own row tiles, or the tiled one, whose tile is the routing entry (tile_m rows)."""
    if cfg["whole_block"]:
        return block_kernel, cfg[name]
    return tile_kernel, {**cfg[name], "BLOCK_M": tile_m}
