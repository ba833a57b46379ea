"""Routing: from the selection [T, Hq, k] to row lists per (KV head, block, slot), on O(T*Hq*k) data: one Triton
pass writes each (row, past slot)'s segment key, torch sorts them (16-bit keys where the segments fit, half the
radix passes of 32-bit ones) and cuts the entries.

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
import triton
import triton.language as tl
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


@triton.jit(do_not_specialize=["NB", "N_SEG"])
def _keys_kernel(Idx, Key, QTiles, BlkStart, BlkLen, BlkLocal, NB, N_SEG, HQ: tl.constexpr, HKV: tl.constexpr,
                 TOPK: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Segment key (kv head, global block, slot) of each (row, past slot) of one query tile and KV head (its
    group's query heads are adjacent rows, so a token's entries are one contiguous run); N_SEG (sorts last)
    where the slot holds the own block or -1."""
    group: tl.constexpr = HQ // HKV
    n_slots: tl.constexpr = TOPK - 1
    hk = tl.program_id(1)
    t0 = tl.load(QTiles + 2 * tl.program_id(0))
    gb = tl.load(QTiles + 2 * tl.program_id(0) + 1)
    t_end = tl.load(BlkStart + gb) + tl.load(BlkLen + gb)
    local = tl.load(BlkLocal + gb)
    tok = t0 + tl.arange(0, BLOCK_M)
    g = tl.arange(0, GP)
    slot = tl.arange(0, SP)
    rows = tok.to(tl.int64)[:, None, None] * HQ + hk * group + g[None, :, None]
    mask = (tok < t_end)[:, None, None] & (g < group)[None, :, None] & (slot < n_slots)[None, None, :]
    past = tl.load(Idx + rows * TOPK + slot[None, None, :], mask=mask, other=-1)
    key = (gb - local + hk * NB + past) * n_slots + slot[None, None, :]
    key = tl.where((past >= 0) & (past < local), key, N_SEG)
    tl.store(Key + rows * n_slots + slot[None, None, :], key.to(Key.dtype.element_ty), mask=mask)


@triton.jit
def _segment(SegStart, pair, slot, live, N_SLOTS: tl.constexpr, TILE_M: tl.constexpr):
    """(first row, end row, entries) of the segments (pair, slot)."""
    s0 = tl.load(SegStart + pair * N_SLOTS + slot, mask=live, other=0)
    s1 = tl.load(SegStart + pair * N_SLOTS + slot + 1, mask=live, other=0)
    return s0, s1, (s1 - s0 + TILE_M - 1) // TILE_M


@triton.jit(do_not_specialize=["n_pairs"])
def _ends_kernel(SegStart, Ends, n_pairs, N_SLOTS: tl.constexpr, TILE_M: tl.constexpr, BLOCK: tl.constexpr):
    """Per slot (one program): where each pair's entries end among the slot's entries, the running sum of its
    segments' entry counts (pair after pair)."""
    slot = tl.program_id(0)
    used = 0
    for p0 in range(0, n_pairs, BLOCK):
        pair = p0 + tl.arange(0, BLOCK)
        live = pair < n_pairs
        _, _, n = _segment(SegStart, pair, slot, live, N_SLOTS, TILE_M)
        tl.store(Ends + slot.to(tl.int64) * n_pairs + pair, used + tl.cumsum(n, 0), mask=live)
        used += tl.sum(n, 0)


@triton.jit(do_not_specialize=["n_pairs", "slot_tiles", "search_steps"])
def _cut_kernel(SegStart, Ends, Tiles, n_pairs, slot_tiles, search_steps, N_SLOTS: tl.constexpr,
                TILE_M: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK entries of one slot, each (start in rows, row count, pair): entry t belongs to the first pair whose
    entries end after t (binary search in `Ends`), and is that pair's segment cut at (t - its first entry) *
    TILE_M; entries past the slot's last hold 0 rows. Vectorised over entries, so one long segment (every query
    picking the same block) costs what many short ones do."""
    slot = tl.program_id(0)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ends = Ends + slot.to(tl.int64) * n_pairs
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.zeros([BLOCK], tl.int32) + n_pairs
    for _ in range(search_steps):  # ceil(log2(n_pairs + 1)) halvings
        mid = (lo + hi) // 2
        right = tl.load(ends + mid, mask=mid < n_pairs, other=2147483647) <= t
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    live = lo < n_pairs  # t lies before the slot's last entry end
    pair = tl.where(live, lo, 0)
    s0, s1, n = _segment(SegStart, pair, slot, live, N_SLOTS, TILE_M)
    first = tl.load(ends + pair, mask=live, other=0) - n
    start = s0 + (t - first) * TILE_M
    out = Tiles + (slot.to(tl.int64) * slot_tiles + t) * 3
    keep = t < slot_tiles
    tl.store(out, tl.where(live, start, 0), mask=keep)
    tl.store(out + 1, tl.where(live, tl.minimum(s1 - start, TILE_M), 0), mask=keep)
    tl.store(out + 2, pair, mask=keep)


def build_routes(idx: Tensor, layout: Layout, hkv: int, tile_m: int) -> Routes:
    """Never reads the GPU: launch sizes are bounds known from the shapes, so the host queues on."""
    tokens, hq, top_k = idx.shape
    n_slots, nb = top_k - 1, layout.n_blocks
    device = idx.device
    if n_slots == 0 or nb == layout.n_docs:  # no past block anywhere
        one = torch.zeros(1, device=device, dtype=torch.int32)  # kernels take a real pointer even when unread
        return Routes(0, tile_m, one, one, one.view(1, 1).expand(0, 3), 0)
    n_pairs = hkv * nb
    n_seg = n_pairs * n_slots
    # 16-bit keys where the segments fit (the sentinel n_seg included): the radix sort then takes half the passes
    key = torch.empty(tokens * hq * n_slots, device=device,
                      dtype=torch.int16 if n_seg <= torch.iinfo(torch.int16).max else torch.int32)
    _keys_kernel[(layout.q_tiles.shape[0], hkv)](idx, key, layout.q_tiles, layout.blk_start, layout.blk_len,
                                                 layout.blk_local, nb, n_seg, HQ=hq, HKV=hkv, TOPK=top_k,
                                                 GP=triton.next_power_of_2(hq // hkv),
                                                 SP=triton.next_power_of_2(n_slots), BLOCK_M=layout.tile_m)
    key, order = torch.sort(key, stable=True)
    # segment starts by binary search in the sorted keys (a bincount would contend on few bins at this size)
    seg_start = torch.searchsorted(key, torch.arange(n_seg + 1, device=device, dtype=key.dtype), out_int32=True)
    rows = (order // n_slots).to(torch.int32)

    # forward tiles: each slot's segments cut into tiles of tile_m rows, packed from the slot's first tile on.
    # A slot holds at most T * Hq rows, so ceil(T * Hq / tile_m) + (one partial tile per segment) bounds it.
    slot_tiles = -(-tokens * hq // tile_m) + n_pairs
    ends = torch.empty(n_slots, n_pairs, device=device, dtype=torch.int32)
    _ends_kernel[(n_slots,)](seg_start, ends, n_pairs, N_SLOTS=n_slots, TILE_M=tile_m, BLOCK=1024)
    tiles = torch.empty(n_slots * slot_tiles, 3, device=device, dtype=torch.int32)
    _cut_kernel[(n_slots, triton.cdiv(slot_tiles, 1024))](seg_start, ends, tiles, n_pairs, slot_tiles,
                                                          n_pairs.bit_length(), N_SLOTS=n_slots, TILE_M=tile_m,
                                                          BLOCK=1024)
    return Routes(n_slots, tile_m, rows, seg_start, tiles, slot_tiles)
