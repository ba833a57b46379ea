"""Softmax attention of queries over a [B, Hkv, L, D] cache under a boolean mask, GQA without copying K or V."""

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import sdpa_kernel

from moba_train.ops.flash import SDPA_NO_CUDNN


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float) -> Tensor:
    """q [B, Hq, Q, D], k/v [B, Hkv, L, D], allowed [B, Hq or 1, Q, L] bool (None = everything) -> [B, Hq, Q, D].

    The G = Hq / Hkv query heads of a KV head are folded into the query axis, so one SDPA call per KV head
    serves them all (each folded row keeps its own mask row).
    """
    batch, hq, n_q, dim = q.shape
    hkv, length = k.shape[1], k.shape[2]
    group = hq // hkv
    qf = q.reshape(batch, hkv, group * n_q, dim)
    if allowed is not None and allowed.shape[1] == 1:  # same mask for every head: tile over the folded group only
        allowed = allowed.repeat(1, 1, group, 1) if n_q > 1 else allowed
    elif allowed is not None:
        allowed = allowed.reshape(batch, hkv, group * n_q, length)
    with sdpa_kernel(SDPA_NO_CUDNN):  # a decode step grows the cache by one: a new length every step
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=allowed, scale=scale)
    return out.reshape(batch, hq, n_q, dim)
