"""Self-attention with a swappable inner kernel: the hybrid seam between MoBA and full attention."""

from typing import Callable, Optional

import torch.nn as nn
from torch import Tensor

from moba_train.model.config import ATTENTION_KINDS, AttentionConfig, ModelConfig
from moba_train.model.rope import apply_rope
from moba_train.ops import full_attn, moba_attn


class MobaCore(nn.Module):
    """MoBA over a packed batch (varlen layout)."""

    kind = "moba"

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.block_size, self.top_k, self.backend = cfg.block_size, cfg.top_k, cfg.backend
        self.softmax_scale = cfg.softmax_scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        return moba_attn(q, k, v, cu_seqlens, max_seqlen, self.block_size, self.top_k, self.backend,
                         self.softmax_scale)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, top_k={self.top_k}, backend={self.backend}"


class FullCore(nn.Module):
    """Full causal attention, document-masked for packed batches."""

    kind = "full"

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.softmax_scale = cfg.softmax_scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        return full_attn(q, k, v, cu_seqlens, max_seqlen, self.softmax_scale)


def build_core(kind: str, cfg: AttentionConfig) -> nn.Module:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {ATTENTION_KINDS}")
    return MobaCore(cfg) if kind == "moba" else FullCore(cfg)


# A parallelism hook: runner(core, q, k, v, cu_seqlens, max_seqlen) -> out. Context parallelism installs one
# (see moba_train.parallel); the model itself never talks to process groups.
Runner = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor, int], Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, kind: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.attn_cfg = attn_cfg
        self.core = build_core(kind, attn_cfg)
        self.runner: Optional[Runner] = None

    @property
    def kind(self) -> str:
        return self.core.kind

    def set_kind(self, kind: str) -> None:
        if kind != self.kind:
            self.core = build_core(kind, self.attn_cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        tokens = x.shape[0]
        q = apply_rope(self.q_proj(x).view(tokens, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(tokens, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(tokens, self.n_kv_heads, self.head_dim)
        if self.runner is None:
            out = self.core(q, k, v, cu_seqlens, max_seqlen)
        else:
            out = self.runner(self.core, q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(tokens, self.n_heads * self.head_dim))
