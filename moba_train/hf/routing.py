"""MoBA routing for queries that see a KV cache: the prefill gate's rule (`moba_train.ops.gate`) in cache layout.

The rule (DESIGN.md): a query in block `own` of its document scores every block j < own by q . mean(K_j) in fp32,
no scale; it keeps its own block plus the best `top_k - 1` of those. Block means come from `gate.block_means`.
"""

import torch
from torch import Tensor

from moba_train.ops.gate import block_means


def doc_block_means(keys: Tensor, n_blocks: int, block_size: int) -> Tensor:
    """Means of the first `n_blocks` (complete) blocks of one document: keys [Hkv, L, D] -> [Hkv, n_blocks, D] fp32."""
    if n_blocks == 0:
        return keys.new_zeros(keys.shape[0], 0, keys.shape[2], dtype=torch.float32)
    return block_means(keys[:, : n_blocks * block_size].transpose(0, 1), block_size).transpose(0, 1)


def score_blocks(q: Tensor, means: Tensor) -> Tensor:
    """q [B, Hq, Q, D], means [B, Hkv, N, D] (fp32) -> [B, Hq, Q, N] fp32 scores q . mean.

    With GQA each query head scores the means of its own KV head.
    """
    batch, hq, n_q, dim = q.shape
    hkv = means.shape[1]
    qf = q.float().reshape(batch, hkv, hq // hkv, n_q, dim)
    return torch.einsum("bkgqd,bknd->bkgqn", qf, means).reshape(batch, hq, n_q, means.shape[2])


def pick_blocks(scores: Tensor, own: Tensor, top_k: int) -> Tensor:
    """Selected block ids: scores [..., N] over blocks, own [...] the query's own block -> [..., top_k] long.

    Own block always (last column); the best `top_k - 1` blocks j < own by score; -1 where fewer exist.
    """
    n_blocks = scores.shape[-1]
    own = own.expand(scores.shape[:-1])
    past = torch.arange(n_blocks, device=scores.device) < own[..., None]
    scores = scores.masked_fill(~past, float("-inf"))
    idx = torch.full((*scores.shape[:-1], top_k), -1, dtype=torch.long, device=scores.device)
    n_pick = min(top_k - 1, n_blocks)
    if n_pick > 0:
        val, top = scores.topk(n_pick, dim=-1)
        idx[..., :n_pick] = torch.where(val > float("-inf"), top, -1)
    idx[..., -1] = own
    return idx


def picked_table(idx: Tensor, n_blocks: int) -> Tensor:
    """[..., top_k] selected ids (each < n_blocks, or -1) -> [..., n_blocks + 1] bool; column n_blocks absorbs -1."""
    table = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx.device)
    return table.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)
