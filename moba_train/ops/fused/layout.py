"""Block and tile tables of a packed batch: the metadata every fused kernel indexes by.

Blocks are numbered globally over the batch (document after document); a kernel maps a global block back
to its document through `first` (global index of the document's block 0).
"""

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_train.ops.offsets import host_offsets


@dataclass
class Layout:
    block_size: int
    n_blocks: int       # blocks over the whole batch
    n_docs: int         # non-empty documents in the batch (each has a block 0)
    max_doc_blocks: int  # blocks of the longest document
    blk_start: Tensor   # [B] int32 first token of each block
    blk_len: Tensor     # [B] int32 tokens in each block (the last of a document may be short)
    blk_local: Tensor   # [B] int32 index of the block within its document
    q_tiles: Tensor     # [n_tiles, 2] int32 (first token, global block) of query tiles that never straddle blocks
    tile_m: int         # rows of a query tile
    blk_start_cpu: Tensor  # host copies, to cut other tables without a sync
    blk_len_cpu: Tensor
    chunks: dict = field(default_factory=dict, repr=False, compare=False)  # key_chunks by block_n

    def key_chunks(self, block_n: int) -> Tensor:
        """[n_chunks, 2] int32 (global block, first key) of key chunks of block_n that never straddle blocks."""
        if block_n not in self.chunks:
            self.chunks[block_n] = self._cut_keys(block_n)
        return self.chunks[block_n]

    def _cut_keys(self, block_n: int) -> Tensor:
        per_blk = (self.blk_len_cpu + block_n - 1) // block_n
        blk = torch.repeat_interleave(torch.arange(self.n_blocks), per_blk)
        idx = torch.arange(len(blk)) - (torch.cumsum(per_blk, 0) - per_blk)[blk]
        table = torch.stack([blk, self.blk_start_cpu[blk] + idx * block_n], 1)
        return table.to(device=self.blk_start.device, dtype=torch.int32).contiguous()


def query_tile(block_size: int, interpret: bool) -> int:
    """Rows per query tile: tiles never straddle blocks, so take the largest power of two dividing the block."""
    cap = 16 if interpret else 128
    tile = 16
    while tile * 2 <= cap and block_size % (tile * 2) == 0:
        tile *= 2
    return tile


def build_layout(cu_seqlens: Tensor, block_size: int, tile_m: int, device: torch.device) -> Layout:
    """Tables from cu_seqlens, computed on the host: O(blocks + tiles) entries.

    Keyed by the offsets' values, so every MoBA layer of a step (same cu_seqlens) builds them once.
    """
    return _layout(host_offsets(cu_seqlens), block_size, tile_m, torch.device(device))


@functools.lru_cache(maxsize=16)
def _layout(offsets: tuple, block_size: int, tile_m: int, device: torch.device) -> Layout:
    cu = torch.tensor(offsets, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    nb_doc = (lengths + block_size - 1) // block_size
    doc_of_blk = torch.repeat_interleave(torch.arange(len(lengths)), nb_doc)
    first_blk = torch.cumsum(nb_doc, 0) - nb_doc
    blk_local = torch.arange(int(nb_doc.sum())) - first_blk[doc_of_blk]
    blk_start = cu[:-1][doc_of_blk] + blk_local * block_size
    blk_len = torch.minimum(cu[1:][doc_of_blk] - blk_start, torch.tensor(block_size))
    tiles_per_blk = (blk_len + tile_m - 1) // tile_m
    tile_blk = torch.repeat_interleave(torch.arange(len(blk_len)), tiles_per_blk)
    tile_idx = torch.arange(len(tile_blk)) - (torch.cumsum(tiles_per_blk, 0) - tiles_per_blk)[tile_blk]
    q_tiles = torch.stack([blk_start[tile_blk] + tile_idx * tile_m, tile_blk], 1)
    dev = lambda x: x.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
    return Layout(block_size, len(blk_len), int((lengths > 0).sum()), int(nb_doc.max()) if len(nb_doc) else 0,
                  dev(blk_start), dev(blk_len), dev(blk_local),
                  dev(q_tiles), tile_m, blk_start, blk_len)


@triton.jit
def own_tile(QTiles, BlkStart, BlkLen, HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Kernel side of `q_tiles` for the program (query tile, query head): (KV head, first token, global block,
    block start, block end, tokens, mask, row ids)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(QTiles + 2 * tile)
    gb = tl.load(QTiles + 2 * tile + 1)
    k_start = tl.load(BlkStart + gb)
    t_end = k_start + tl.load(BlkLen + gb)
    offs_m = t0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < t_end
    return h // (HQ // HKV), t0, gb, k_start, t_end, offs_m, mask_m, offs_m.to(tl.int64) * HQ + h


@triton.jit
def past_item(Tiles, BlkStart, BlkLen, tile, NB):
    """Kernel side of one `Routes.tiles` entry: (first row in Rows, row count, KV head, first key and length of
    the block; length 0 for a reserved, unused entry, which then walks no keys)."""
    r0 = tl.load(Tiles + 3 * tile)
    n_rows = tl.load(Tiles + 3 * tile + 1)
    pair = tl.load(Tiles + 3 * tile + 2)
    gb = pair % NB
    k_len = tl.where(n_rows > 0, tl.load(BlkLen + gb), 0)
    return r0, n_rows, pair // NB, tl.load(BlkStart + gb), k_len


@triton.jit
def past_tile(Tiles, Rows, BlkStart, BlkLen, tile, NB, BLOCK_M: tl.constexpr):
    """A `Routes.tiles` entry of at most BLOCK_M rows: (KV head, first key and length of the block, mask, row ids)."""
    r0, n_rows, hk, k_start, k_len = past_item(Tiles, BlkStart, BlkLen, tile, NB)
    mask_m, rows = entry_rows(Rows, r0, 0, n_rows, BLOCK_M)
    return hk, k_start, k_len, mask_m, rows


@triton.jit
def entry_rows(Rows, r0, m0, n_rows, BLOCK_M: tl.constexpr):
    """(mask, row ids) of the entry's rows m0 .. m0 + BLOCK_M (the entry's rows start at Rows + r0)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    return mask_m, tl.load(Rows + r0 + offs_m, mask=mask_m, other=0).to(tl.int64)


@triton.jit
def block_chunk(Kd, Vd, k_start, n0, k_len, hk, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V of keys n0 .. n0 + BLOCK_N of the block starting at token k_start (TMA loads, zeros past T), and
    which of them lie inside the block's k_len keys ([1, BLOCK_N], for masking scores)."""
    k = Kd.load([k_start + n0, hk * D])
    v = Vd.load([k_start + n0, hk * D])
    return k, v, (n0 + tl.arange(0, BLOCK_N) < k_len)[None, :]
