"""Routing: from the selection [T, Hq, k] to row lists per (KV head, block, slot), with torch ops on O(T*Hq*k) data.

A row is one (token, query head), numbered t * Hq + h. Slot r of a row is its r-th past block in ascending
order (the own block is handled separately by the causal kernels). Rows are sorted by the segment key
(kv head, global block, slot): the rows of one (kv head, block) are then contiguous over all slots (the
backward walks them KV-major) and each slot is a sub-range (the forward handles one slot per launch, so a
row meets each launch at most once and the running softmax state is updated without atomics). Each past pass
cuts the slots' segments into its own work entries (`Entries`): the forward's hold up to a few hundred rows at
fine blocks, dQ's one tile.
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moba_train.ops.fused.layout import Layout


@dataclass
class Entries:
    """Work entries of a past pass: per slot, tiles of at most `rows` rows of one segment."""
    rows: int
    table: Tensor         # [n_slots * per_slot, 3] int32 (start in rows, row count, hk * B + block), slot-major
    per_slot: int         # entries reserved per slot; the unused ones hold 0 rows

    def slot(self, r: int) -> tuple[int, int]:
        """(first entry, entry count) of slot r's launch."""
        return r * self.per_slot, self.per_slot


@dataclass
class Routes:
    n_slots: int          # k - 1 past slots (0 when no row has a past block)
    rows: Tensor          # [T * Hq * n_slots] int32 row ids sorted by segment (entries from seg_start[-1] on: none)
    seg_start: Tensor     # [Hkv * B * n_slots + 1] int32 start of each segment in `rows`
    fwd: Entries          # the forward's past pass
    dq: Entries           # dQ's past pass (the same object where both take the same rows per entry)

    def own_only(self) -> "Routes":
        """The same routes without past slots: the forward then runs the own-block pass alone (stage timing)."""
        return replace(self, n_slots=0, fwd=_no_entries(self.fwd), dq=_no_entries(self.dq))


def _no_entries(entries: Entries) -> Entries:
    return replace(entries, table=entries.table[:0], per_slot=0)


def build_routes(idx: Tensor, layout: Layout, hkv: int, cfg: dict) -> Routes:
    """Rows of the forward's and dQ's entries from `cfg` (`tiles()`: past_rows, dq_rows). Never reads the GPU:
    launch sizes are bounds known from the shapes, so the host queues on."""
    fwd_rows, dq_rows = cfg["past_rows"], cfg["dq_rows"]
    tokens, hq, top_k = idx.shape
    n_slots, nb = top_k - 1, layout.n_blocks
    device = idx.device
    if n_slots == 0 or nb == layout.n_docs:  # no past block anywhere
        one = torch.zeros(1, device=device, dtype=torch.int32)  # kernels take a real pointer even when unread
        return Routes(0, one, one, Entries(fwd_rows, one.view(1, 1).expand(0, 3), 0),
                      Entries(dq_rows, one.view(1, 1).expand(0, 3), 0))
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
    rows = (order // n_slots).to(torch.int32)
    fwd = _entries(seg_start, tokens * hq, n_slots, fwd_rows)
    return Routes(n_slots, rows, seg_start, fwd, fwd if dq_rows == fwd_rows else
                  _entries(seg_start, tokens * hq, n_slots, dq_rows))


def _entries(seg_start: Tensor, n_rows: int, n_slots: int, tile_m: int) -> Entries:
    """Each slot's segments cut into entries of tile_m rows, packed from the slot's first entry on. A slot holds
    at most n_rows (T * Hq) rows, so ceil(n_rows / tile_m) + (one partial entry per segment) bounds it."""
    device = seg_start.device
    n_pairs = (seg_start.numel() - 1) // n_slots
    per_slot = -(-n_rows // tile_m) + n_pairs
    seg_len = seg_start.diff().view(n_pairs, n_slots).t()  # [slot, pair]
    n_tiles = (seg_len.long() + tile_m - 1) // tile_m
    ends = torch.cumsum(n_tiles, 1)
    t = torch.arange(per_slot, device=device).expand(n_slots, per_slot).contiguous()
    pair = torch.searchsorted(ends, t, right=True)  # the pair whose entries cover t; n_pairs past the last
    used = pair < n_pairs
    pair.clamp_(max=n_pairs - 1)
    seg = pair * n_slots + torch.arange(n_slots, device=device)[:, None]
    start = seg_start[seg] + (t - (ends.gather(1, pair) - n_tiles.gather(1, pair))) * tile_m
    count = torch.where(used, torch.clamp(seg_start[seg + 1] - start, max=tile_m), 0)
    table = torch.stack([start, count, pair], -1).view(-1, 3)
    return Entries(tile_m, table.to(torch.int32).contiguous(), per_slot)
