"""Gated decode: one new token per row routes over the cached blocks and attends only to the chosen ones.

Block means of the cache are kept per layer and grow incrementally (a block that becomes complete adds one
mean). The fast path needs a cache we can follow (DynamicCache layers), one query per row and rows whose real
tokens are contiguous at the end of the cache (no padding or left padding: what generate() produces). Anything
else goes to the exact general path in `cached.py`.
"""

import weakref

import torch
from torch import Tensor

from moba_train.hf.attend import attend
from moba_train.hf.cache_state import cache_of, layer_keys, states_of
from moba_train.hf.cached import cached_attention
from moba_train.hf.routing import doc_block_means, score_blocks
from moba_train.ops.gate import pick_blocks, picked_table

# Attend by gathering the selected tokens when the tokens all query heads select are fewer than this fraction of
# the cache (as KV heads x length); else one masked pass over the whole cache. The masked kernel is slow enough
# that gathering 1.5x the cache still wins (H100, 8 layers, 128K, 4096/12: 37.8 vs 48.8 ms per token; at 32K,
# 1024/8, 0.25x: 18.3-19.4 vs 18.6-18.9).
GATHER_FRACTION = 1.5
# On CUDA the gate and the attention over the selected blocks run as Triton kernels (`ops/fused/decode.py`), which
# read the blocks in place; tests switch them off to cover the torch paths on the GPU too.
DECODE_KERNEL = True


class LayerMeans:
    """Means of the complete blocks of each row's document in one layer's cache."""

    def __init__(self, starts: list[int], key: Tensor, block_size: int):
        self.block_size = block_size
        self.starts = starts  # cache slot of each row's first real token
        # the same on the device, int32 as the decode kernels take it (no copies per step)
        self.starts_t = torch.tensor(starts, device=key.device, dtype=torch.int32)
        self.count = [0] * len(starts)  # complete blocks whose means are stored, per row
        self.means = key.new_zeros(key.shape[0], key.shape[1], 0, key.shape[3], dtype=torch.float32)
        self.synced = None  # weak reference to the key tensor the state was last brought up to date with

    def synced_keys(self) -> Tensor | None:
        return None if self.synced is None else self.synced()

    def extend(self, key: Tensor, own: list[int]) -> None:
        """Store the means of every block before each row's own block (complete by construction)."""
        need = max(own)
        if need > self.means.shape[2]:
            grow = max(need, 2 * self.means.shape[2]) - self.means.shape[2]
            self.means = torch.cat([self.means, self.means.new_zeros(*self.means.shape[:2], grow,
                                                                     self.means.shape[3])], dim=2)
        for b, (start, have, want) in enumerate(zip(self.starts, self.count, own)):
            if want > have:
                first = start + have * self.block_size
                self.means[b, :, have:want] = doc_block_means(key[b, :, first:], want - have, self.block_size)
                self.count[b] = want


def left_aligned_starts(mask: Tensor | None, batch: int, length: int) -> list[int] | None:
    """Each row's first real slot if every row's real tokens are one run ending at the last slot, else None."""
    if mask is None:
        return [0] * batch
    starts = length - mask.sum(1)
    expected = torch.arange(length, device=mask.device)[None, :] >= starts[:, None]
    return starts.tolist() if bool((mask == expected).all()) else None


_last_mask: dict = {"ref": None, "ok": True}


def new_token_real(mask: Tensor | None) -> bool:
    """Whether the newest slot is a real token in every row (checked once per forward: layers share the mask)."""
    if mask is None:
        return True
    ref = _last_mask["ref"]
    if ref is None or ref() is not mask:
        _last_mask["ref"], _last_mask["ok"] = weakref.ref(mask), bool(mask[:, -1].all())
    return _last_mask["ok"]


def gated_step(query: Tensor, key: Tensor, value: Tensor, state: LayerMeans, block_size: int, top_k: int,
               scale: float) -> Tensor:
    """query [B, Hq, 1, D] at the last cache slot -> [B, Hq, 1, D]."""
    batch, hq, _, dim = query.shape
    hkv, length = key.shape[1], key.shape[2]
    own = [(length - 1 - start) // block_size for start in state.starts]
    device = key.device
    starts = state.starts_t
    if max(own) < top_k:  # every block is selected: exactly full attention (the means wait for a later step)
        real = None if not any(state.starts) else (torch.arange(length, device=device) >= starts[:, None])
        return attend(query, key, value, None if real is None else real[:, None, None], scale)
    state.extend(key, own)
    if DECODE_KERNEL and query.is_cuda:
        from moba_train.ops.fused.decode import decode_attn, decode_gate, decode_supported  # triton where it runs

        if decode_supported(query, key, value):
            idx = decode_gate(query, state.means, starts, length, block_size, top_k, max(own))
            return decode_attn(query, key, value, idx, starts, block_size, scale)
    own_t = (length - 1 - starts) // block_size
    idx = pick_blocks(score_blocks(query, state.means[:, :, : max(own)]), own_t[:, None, None], top_k)
    idx = idx[:, :, 0]  # [B, Hq, k]
    if hq * top_k * block_size <= GATHER_FRACTION * hkv * length:
        slots = (starts[:, None, None] + idx.clamp(min=0) * block_size)[..., None] + torch.arange(block_size,
                                                                                                  device=device)
        valid = (idx >= 0)[..., None] & (slots < length)  # the own block ends at the newest token
        slots = slots.clamp(max=length - 1).reshape(batch, hq, -1)
        rows = torch.arange(batch, device=device)[:, None] * hkv + torch.arange(hq, device=device) // (hq // hkv)
        flat = (rows[..., None] * length + slots).reshape(-1)
        kg = key.reshape(-1, dim).index_select(0, flat).view(batch, hq, -1, dim)
        vg = value.reshape(-1, dim).index_select(0, flat).view(batch, hq, -1, dim)
        return attend(query, kg, vg, valid.reshape(batch, hq, 1, -1), scale)
    slot = torch.arange(length, device=device)
    key_block = ((slot[None, :] - starts[:, None]).clamp(min=0) // block_size).clamp(max=max(own))  # [B, L]
    table = picked_table(idx, max(own) + 1)[..., :-1]  # [B, Hq, nb]
    allowed = table.gather(-1, key_block[:, None, :].expand(batch, hq, length)) & (slot >= starts[:, None])[:, None]
    return attend(query, key, value, allowed[:, :, None], scale)


def decode(module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, block_size: int, top_k: int,
           scale: float, full: bool) -> Tensor:
    """Queries that extend a cache: query [B, Hq, Q, D], key/value [B, Hkv, L, D] -> [B, Hq, Q, D]."""
    if full:
        return cached_attention(query, key, value, mask, block_size, top_k, scale, full=True)
    cache = cache_of(module)
    layer = getattr(module, "layer_idx", None)
    followable = cache is not None and layer is not None and layer_keys(cache, layer) is key
    if followable and query.shape[2] == 1 and new_token_real(mask):
        states = states_of(cache)
        state = states.get(layer)
        if state is None or state.block_size != block_size:
            starts = left_aligned_starts(mask, key.shape[0], key.shape[2])
            state = None if starts is None else LayerMeans(starts, key, block_size)
        if state is not None:
            out = gated_step(query, key, value, state, block_size, top_k, scale)
            state.synced = weakref.ref(key)
            states[layer] = state
            return out
    if cache is not None and layer is not None:
        states_of(cache).pop(layer, None)
    return cached_attention(query, key, value, mask, block_size, top_k, scale, full=False)
