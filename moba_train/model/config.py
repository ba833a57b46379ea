"""Config dataclasses of the model and of its attention (the per-layer hybrid seam)."""

from dataclasses import dataclass, field
from typing import Any, Optional

ATTENTION_KINDS = ("moba", "full")

UNSET = "${from_checkpoint:}"  # configs/model/from_init.yaml: a model.* key the run leaves to model.init_from

# Fields that describe the architecture: a checkpoint fixes them (`model.init_from` takes them from it)
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "tie_embeddings")


@dataclass
class ModelConfig:
    vocab_size: int = 260
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # default dim // n_heads
    ffn_dim: int = 688
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or {"rope_type": "linear", "factor"} (position interpolation). Typed Any:
    # a typed Optional[dict] node set to None cannot take `model.rope_scaling={...}` from the command line
    rope_scaling: Any = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    init_std: float = 0.02
    init_from: Optional[str] = None  # HF Llama directory or moba-train checkpoint to start from

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads


@dataclass
class AttentionConfig:
    kind: str = "moba"  # moba | full: the kind of every layer unless overridden below
    block_size: int = 4096
    top_k: int = 12
    backend: str = "auto"  # auto | naive | varlen | triton (MoBA layers)
    softmax_scale: Optional[float] = None  # default head_dim ** -0.5
    full_attn_last_k: int = 0  # hybrid: the last N layers use full attention
    layers: Optional[list[str]] = None  # explicit per-layer kinds; overrides kind / full_attn_last_k
    # staged switching: [{"at": 0.9, "kind": "full", "full_attn_last_k": 0}, ...] by fraction of train.steps
    schedule: list[dict[str, Any]] = field(default_factory=list)


def layer_kinds(attn: AttentionConfig, n_layers: int) -> list[str]:
    """The attention kind of each layer, from an explicit list or from kind + full_attn_last_k."""
    if attn.layers is not None:
        if len(attn.layers) != n_layers:  # validate() says so for configs; this catches direct API use
            raise ValueError(f"attention.layers has {len(attn.layers)} entries; the model has {n_layers} layers")
        return list(attn.layers)
    if attn.full_attn_last_k < 0:  # validate() says so for configs; this catches direct API use
        raise ValueError(f"attention.full_attn_last_k must be >= 0, got {attn.full_attn_last_k}")
    n_full = min(attn.full_attn_last_k, n_layers)
    return [attn.kind] * (n_layers - n_full) + ["full"] * n_full
