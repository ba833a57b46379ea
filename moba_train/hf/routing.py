"""MoBA routing for queries that see a KV cache: the prefill gate's rule (`moba_train.ops.gate`) in cache layout.

The rule (README.md, "The MoBA op"): a query in block `own` of its document scores every block j < own by
q . mean(K_j) in fp32, no scale; it keeps its own block plus the best `top_k - 1` of those (`gate.pick_blocks`).
Block means come from `gate.block_means`; this module only lays them out for the cache.
"""

import torch
from torch import Tensor

from moba_train.ops.gate import block_means


def doc_block_means(keys: Tensor, n_blocks: int, block_size: int) -> Tensor:
    """Means of the first `n_blocks` (complete) blocks of one document: keys [Hkv, L, D] -> [Hkv, n_blocks, D] fp32."""
    return block_means(keys[:, : n_blocks * block_size].transpose(0, 1), block_size).transpose(0, 1)


def score_blocks(q: Tensor, means: Tensor) -> Tensor:
    """q [B, Hq, Q, D], means [B, Hkv, N, D] (fp32) -> [B, Hq, Q, N] fp32 scores q . mean.

    With GQA each query head scores the means of its own KV head.
    """
    batch, hq, n_q, dim = q.shape
    hkv = means.shape[1]
    qf = q.float().reshape(batch, hkv, hq // hkv, n_q, dim)
    with torch.autocast(q.device.type, enabled=False):  # fp32 even under autocast, as the prefill gate
        scores = torch.einsum("bkgqd,bknd->bkgqn", qf, means.float())
    return scores.reshape(batch, hq, n_q, means.shape[2])
