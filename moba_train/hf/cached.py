"""Exact attention for queries at the end of a KV cache, any query count and any padding pattern.

The general (slow, O(Q * L)) path: chunked prefill on top of a cache, right-padded prompts, caches the fast
decode path cannot follow, full-attention layers and the full-attention decode fallback. A row's document is
its real (unmasked) cache slots in order; blocks count from its first real token.
"""

import torch
from torch import Tensor

from moba_train.hf.attend import attend
from moba_train.hf.routing import doc_block_means, score_blocks
from moba_train.ops.gate import pick_blocks, picked_table

MASK_ELEMENTS = 1 << 27  # queries are processed in chunks whose [B, Hq, Q, L] mask stays below this size


def cached_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, block_size: int, top_k: int,
                     scale: float, full: bool) -> Tensor:
    """query [B, Hq, Q, D] (the last Q cache slots), key/value [B, Hkv, L, D], mask [B, L] bool -> [B, Hq, Q, D]."""
    batch, hq, n_q, _ = query.shape
    length = key.shape[2]
    if full and mask is None and n_q == 1:  # plain decode step: no mask needed
        return attend(query, key, value, None, scale)
    real = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=key.device)
    rank = real.long().cumsum(-1) - 1  # position of each slot in its row's document
    means, key_block = None, None
    if not full:
        counts = (real.sum(1) // block_size).tolist()  # complete blocks per row
        means = key.new_zeros(batch, key.shape[1], max(counts), key.shape[3], dtype=torch.float32)
        for b, n_blocks in enumerate(counts):
            means[b, :, :n_blocks] = doc_block_means(key[b][:, real[b]], n_blocks, block_size)
        key_block = rank.clamp(min=0) // block_size
    chunk = max(1, MASK_ELEMENTS // (batch * hq * length))
    outs = []
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        slots = torch.arange(length - n_q + start, length - n_q + stop, device=key.device)  # the queries' slots
        q_rank, q_real = rank[:, slots], real[:, slots]  # [B, Qc]
        allowed = real[:, None, :] & (rank[:, None, :] <= q_rank[:, :, None])  # [B, Qc, L]
        # a padded query attends to itself only (its output is ignored; this avoids an all-masked row)
        allowed |= (~q_real)[:, :, None] & (torch.arange(length, device=key.device) == slots[:, None])
        allowed = allowed[:, None]  # [B, 1, Qc, L]
        if not full:
            own = q_rank.clamp(min=0) // block_size  # [B, Qc]
            idx = pick_blocks(score_blocks(query[:, :, start:stop], means), own[:, None], top_k)  # [B, Hq, Qc, k]
            table = picked_table(idx, int(own.max()) + 1)
            table = table[..., :-1].gather(-1, key_block[:, None, None, :].clamp(max=table.shape[-1] - 2)
                                           .expand(batch, hq, stop - start, length))
            allowed = allowed & (table | (~q_real)[:, None, :, None])
        outs.append(attend(query[:, :, start:stop], key, value, allowed, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
