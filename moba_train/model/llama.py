"""A plain Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) whose layers each own an attention kind.

Parameter names follow HF Llama (without the leading `model.`), so one adapter maps checkpoints.
Tokens travel flattened, [T, dim] with T = batch * seq, in the varlen layout the attention ops use.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from moba_train.model.attention import Attention
from moba_train.model.config import AttentionConfig, ModelConfig, layer_kinds
from moba_train.model.rope import inv_frequencies, rope_tables
from moba_train.ops.offsets import longest_doc

IGNORE_INDEX = -100
LOSS_CHUNK = 8192  # tokens per logits chunk: the [T, vocab] logits never exist at once


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, kind: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, attn_cfg, kind)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


def rows_cu_seqlens(input_ids: Tensor) -> Tensor:
    """The default document bounds of a [B, S] batch: one document per row."""
    rows, seq = input_ids.shape
    return torch.arange(0, rows * seq + 1, seq, dtype=torch.int32, device=input_ids.device)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Positions that restart at every document start."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(total, device=cu_seqlens.device) - starts


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: Optional[AttentionConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.attn_cfg = attn_cfg or AttentionConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        kinds = layer_kinds(self.attn_cfg, cfg.n_layers)
        self.layers = nn.ModuleList(Block(cfg, self.attn_cfg, kind) for kind in kinds)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):  # residual branches: scaled by depth
                p.normal_(0.0, std / (2 * self.cfg.n_layers) ** 0.5)
            else:
                p.normal_(0.0, std)
        self.inv_freq.copy_(inv_frequencies(self.cfg.head_size, self.cfg.rope_theta, self.cfg.rope_scaling))

    def attention_kinds(self) -> list[str]:
        return [layer.self_attn.kind for layer in self.layers]

    def set_attention_kinds(self, kinds: list[str]) -> None:
        if len(kinds) != len(self.layers):
            raise ValueError(f"got {len(kinds)} attention kinds for {len(self.layers)} layers")
        for layer, kind in zip(self.layers, kinds):
            layer.self_attn.set_kind(kind)

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> Tensor | tuple[Tensor, Tensor]:
        """input_ids [B, S] -> logits [B, S, vocab]; with labels: (sum of token losses, count of real tokens).

        cu_seqlens [n_docs + 1] (int32) bounds the documents of the flattened batch; default one per row.
        positions [B, S] are global positions (they restart per document when derived from cu_seqlens).
        """
        batch, seq = input_ids.shape
        total = batch * seq
        if cu_seqlens is None:
            cu_seqlens = rows_cu_seqlens(input_ids)
        if positions is None:
            positions = positions_from_cu_seqlens(cu_seqlens, total)
        max_seqlen = longest_doc(cu_seqlens)
        cos, sin = rope_tables(positions.reshape(total), self.inv_freq)
        h = self.embed_tokens(input_ids.reshape(total))
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen)
        h = self.norm(h)
        if labels is None:
            return self.lm_head(h).view(batch, seq, -1)
        return self.loss(h, labels.reshape(total))

    def loss(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Summed cross entropy over real tokens, chunked and recomputed so full logits are never stored."""
        total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
        for start in range(0, h.shape[0], LOSS_CHUNK):
            chunk, target = h[start:start + LOSS_CHUNK], labels[start:start + LOSS_CHUNK]
            total = total + torch.utils.checkpoint.checkpoint(self._chunk_loss, chunk, target, use_reentrant=False)
        return total, (labels != IGNORE_INDEX).sum()

    def _chunk_loss(self, h: Tensor, labels: Tensor) -> Tensor:
        logits = self.lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
