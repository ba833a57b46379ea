"""Rotary position embedding with explicit (global) positions and Llama-3 / linear frequency scaling."""

import math

import torch
from torch import Tensor


# the keys each kind of `model.rope_scaling` needs (transformers' names)
ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "linear": ("factor",)}


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> Tensor:
    # fp32 throughout, in transformers' order of operations: the same bits as the frequencies HF Llama checkpoints
    # were trained and are served with (float64 differed in the last bit of ~1 in 4, 1e-2 rad at 128K positions)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":  # position interpolation
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"model.rope_scaling.rope_type={kind!r} is not one of {tuple(ROPE_SCALING_KEYS)}")
    old_ctx = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim] (fp32) for flat token positions [T]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D]; rotate-half convention of HF Llama, computed in fp32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)
