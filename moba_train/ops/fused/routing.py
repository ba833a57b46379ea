"""Routing: from the selection [T, Hq, k] to row lists per (KV head, block, slot), with torch ops on O(T*Hq*k) data.

A row is one (token, query head), numbered t * Hq + h. Slot r of a row is its r-th past block in ascending
order (the own block is handled separately by the causal kernels). Rows are sorted by the segment key
(kv head, global block, slot): the rows of one (kv head, block) are then contiguous over all slots (the
backward walks them KV-major) and each slot is a sub-range (the past passes handle one slot per launch, so a
row meets each launch at most once and the running state is updated without atomics). Each slot's segments
are cut into entries of up to `tile_m` rows: one tile of a tiled past pass, or the rows a whole-block program
walks (`tiles()["past_rows"]`).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moba_train.ops.fused.layout import Layout


@dataclass
class Routes:
    n_slots: int          # k - 1 past slots (0 when no row has a past block)
    tile_m: int           # rows per entry
    rows: Tensor          # [T * Hq * n_slots] int32 row ids sorted by segment (entries from seg_start[-1] on: none)
    seg_start: Tensor     # [Hkv * B * n_slots + 1] int32 start of each segment in `rows`
    tiles: Tensor         # [n_slots * slot_tiles, 3] int32 (start in rows, row count, hk * B + block), slot-major
    slot_tiles: int       # tiles reserved per slot; the unused ones hold 0 rows

    def slot(self, r: int) -> tuple[int, int]:
        """(first tile, tile count) of slot r's forward launch."""
        return r * self.slot_tiles, self.slot_tiles

    def own_only(self) -> "Routes":
        """The same routes without past slots: the forward then runs the own-block pass alone (stage timing)."""
        return replace(self, n_slots=0, tiles=self.tiles[:0], slot_tiles=0)


def build_routes(idx: Tensor, layout: Layout, hkv: int, tile_m: int) -> Routes:
    """Never reads the GPU: launch sizes are bounds known from the shapes, so the host queues on."""
    tokens, hq, top_k = idx.shape
    n_slots, nb = top_k - 1, layout.n_blocks
    device = idx.device
    if n_slots == 0 or nb == layout.n_docs:  # no past block anywhere
        one = torch.zeros(1, device=device, dtype=torch.int32)  # kernels take a real pointer even when unread
        return Routes(0, tile_m, one, one, one.view(1, 1).expand(0, 3), 0)
    past = idx[:, :, :n_slots]
    # int32 throughout: the key tensors are the size of the selection (352M entries at 1M tokens, 4096/12)
    i32 = dict(device=device, dtype=torch.int32)
    tok_blk = torch.repeat_interleave(torch.arange(nb, **i32), layout.blk_len.long(), output_size=tokens)
    local = layout.blk_local[tok_blk]
    own = local[:, None, None]
    first = tok_blk - local  # global index of the document's block 0
    base = first[:, None, None] + (torch.arange(hq, **i32) // (hq // hkv))[None, :, None] * nb  # [T, Hq, 1]
    n_pairs = hkv * nb
    n_seg = n_pairs * n_slots
    key = (past + base).mul_(n_slots).add_(torch.arange(n_slots, **i32))
    key.masked_fill_((past < 0) | (past >= own), n_seg)
    key, order = torch.sort(key.flatten(), stable=True)
    # segment starts by binary search in the sorted keys (a bincount would contend on few bins at this size)
    seg_start = torch.searchsorted(key, torch.arange(n_seg + 1, **i32), out_int32=True)
    rows = (order // n_slots).to(torch.int32)

    # forward tiles: each slot's segments cut into tiles of tile_m rows, packed from the slot's first tile on.
    # A slot holds at most T * Hq rows, so ceil(T * Hq / tile_m) + (one partial tile per segment) bounds it.
    slot_tiles = -(-tokens * hq // tile_m) + n_pairs
    seg_len = seg_start.diff().view(n_pairs, n_slots).t()  # [slot, pair]
    n_tiles = (seg_len.long() + tile_m - 1) // tile_m
    ends = torch.cumsum(n_tiles, 1)
    t = torch.arange(slot_tiles, device=device).expand(n_slots, slot_tiles).contiguous()
    pair = torch.searchsorted(ends, t, right=True)  # the pair whose tiles cover t; n_pairs past the last
    used = pair < n_pairs
    pair.clamp_(max=n_pairs - 1)
    seg = pair * n_slots + torch.arange(n_slots, device=device)[:, None]
    start = seg_start[seg] + (t - (ends.gather(1, pair) - n_tiles.gather(1, pair))) * tile_m
    count = torch.where(used, torch.clamp(seg_start[seg + 1] - start, max=tile_m), 0)
    tiles = torch.stack([start, count, pair], -1).view(-1, 3)
    return Routes(n_slots, tile_m, rows, seg_start, tiles.to(torch.int32).contiguous(), slot_tiles)
