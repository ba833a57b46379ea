"""Routing: from the selection [T, Hq, k] to row lists per (KV head, block, slot), with torch ops on O(T*Hq*k) data.

A row is one (token, query head), numbered t * Hq + h. Slot r of a row is its r-th past block in ascending
order (the own block is handled separately by the causal kernels). Rows are sorted by the segment key
(kv head, global block, slot): the rows of one (kv head, block) are then contiguous over all slots (the
backward walks them KV-major) and each slot is a sub-range (the forward handles one slot per launch, so a
row meets each launch at most once and the running softmax state is updated without atomics).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from moba_train.ops.fused.layout import Layout


@dataclass
class Routes:
    n_slots: int          # k - 1 past slots
    tile_m: int           # rows per forward tile
    rows: Tensor          # [n_entries] int32 row ids sorted by segment
    seg_start: Tensor     # [Hkv * B * n_slots + 1] int32 start of each segment in `rows`
    tiles: Tensor         # [n_tiles, 3] int32 (start in rows, row count, hk * B + block) ordered by slot
    tiles_per_slot: list  # forward launch sizes, slot by slot


def build_routes(idx: Tensor, layout: Layout, hkv: int, tile_m: int) -> Routes:
    tokens, hq, top_k = idx.shape
    n_slots, nb = top_k - 1, layout.n_blocks
    device = idx.device
    if n_slots == 0:
        one = torch.zeros(1, device=device, dtype=torch.int32)  # kernels take a real pointer even when unread
        return Routes(0, tile_m, one, one, one.view(1, 1).expand(0, 3), [])
    past = idx[:, :, :n_slots]
    # int32 throughout: the key tensors are the size of the selection (352M entries at 1M tokens, 4096/12)
    i32 = dict(device=device, dtype=torch.int32)
    tok_blk = torch.repeat_interleave(torch.arange(nb, **i32), layout.blk_len.long(), output_size=tokens)
    local = layout.blk_local[tok_blk]
    own = local[:, None, None]
    first = tok_blk - local  # global index of the document's block 0
    base = first[:, None, None] + (torch.arange(hq, **i32) // (hq // hkv))[None, :, None] * nb  # [T, Hq, 1]
    n_seg = hkv * nb * n_slots
    key = (past + base).mul_(n_slots).add_(torch.arange(n_slots, **i32))
    key.masked_fill_((past < 0) | (past >= own), n_seg)
    key, order = torch.sort(key.flatten(), stable=True)
    # segment starts by binary search in the sorted keys (a bincount would contend on few bins at this size)
    seg_start = torch.searchsorted(key, torch.arange(n_seg + 1, **i32), out_int32=True)

    # forward tiles: segments enumerated slot-major, each cut into tiles of tile_m rows
    seg_by_slot = torch.arange(n_seg, device=device).view(hkv * nb, n_slots).t().flatten()
    n_tiles = (seg_start.diff()[seg_by_slot] + tile_m - 1) // tile_m
    # the one host sync: routed entries and the launch size of every slot
    n_valid, *tiles_per_slot = torch.cat([seg_start[-1:].long(), n_tiles.view(n_slots, -1).sum(1)]).tolist()
    rows = (order[:max(n_valid, 1)] // n_slots).to(torch.int32)  # at least one entry: a real pointer
    n_total = sum(tiles_per_slot)
    tile_seg = torch.repeat_interleave(seg_by_slot, n_tiles, output_size=n_total)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    within = torch.arange(n_total, device=device) - torch.repeat_interleave(first_tile, n_tiles, output_size=n_total)
    start = seg_start[tile_seg] + within * tile_m
    tiles = torch.stack([start, torch.clamp(seg_start[tile_seg + 1] - start, max=tile_m), tile_seg // n_slots], 1)
    return Routes(n_slots, tile_m, rows, seg_start, tiles.to(torch.int32).contiguous(), tiles_per_slot)
