"""Softmax attention of queries over a [B, Hkv, L, D] cache under a boolean mask, GQA without copying K or V."""

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Not cuDNN: it builds an execution plan for every new key length (~5 ms per layer call on an H100), and a
# decode step grows the cache by one, so every step would pay it; measured in docs/benchmarks.md.
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    with sdpa_kernel(BACKENDS):
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=allowed, scale=scale)
    return out.reshape(batch, hq, n_q, dim)
