"""`attn_implementation="moba"` / `"moba_naive"` for Hugging Face transformers models (Llama family).

`register_moba(...)` puts two attention functions and their mask builder into transformers' public registries
(`AttentionInterface`, `AttentionMaskInterface`). The mask builder hands the attention function the 2D padding
mask (None when there is no padding), which is all MoBA needs: prefill unpads rows into the varlen layout of
`moba_attn`; calls that extend a KV cache go to the gated decode.

A model config may override the registered settings with attributes `moba_block_size`, `moba_top_k`,
`moba_backend`, `moba_full_attn_last_k`, `moba_full_decode` (they travel in config.json).
"""

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface

from moba_train.hf.cache_state import watch
from moba_train.hf.decode import decode
from moba_train.hf.prefill import prefill
from moba_train.ops import BACKENDS
from moba_train.ops.inputs import whole_number

NAMES = ("moba", "moba_naive")


@dataclass(frozen=True)
class MobaSettings:
    block_size: int = 4096
    top_k: int = 12
    backend: str = "auto"  # MoBA op backend for prefill (moba_naive always uses "naive")
    full_attn_last_k: int = 0  # the last N layers use full attention
    full_decode: bool = False  # decode with full attention over the cache (the reference code's behaviour)

    def __post_init__(self):
        for name, minimum in (("block_size", 1), ("top_k", 1), ("full_attn_last_k", 0)):
            whole_number(name, getattr(self, name), minimum)  # a float or a string fails here, not in a forward
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {('auto',) + BACKENDS}")


_settings: dict[str, MobaSettings] = {}


def settings_for(module, name: str) -> MobaSettings:
    """Registered settings of `name`, overridden by `moba_*` attributes of the module's config (what a checkpoint
    was trained with: `convert_hf.py ours-to-hf` writes them); an override of a different registered value warns."""
    base = _settings[name]
    config = getattr(module, "config", None)
    overrides = {field: getattr(config, f"moba_{field}") for field in base.__dataclass_fields__
                 if getattr(config, f"moba_{field}", None) is not None}
    differ = {k: v for k, v in overrides.items() if v != getattr(base, k)}
    if differ:  # Python's warning filter shows each message once
        warnings.warn(f"moba: the model's config sets {differ}, which take precedence over register_moba's "
                      f"{ {k: getattr(base, k) for k in differ} } (set model.config.moba_<key> to change them)")
    if name == "moba_naive":
        overrides["backend"] = "naive"
    return replace(base, **overrides) if overrides else base


def is_full_layer(module, settings: MobaSettings) -> bool:
    n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if settings.full_attn_last_k == 0:
        return False
    if n_layers is None or getattr(module, "layer_idx", None) is None:
        raise ValueError("moba: full_attn_last_k needs module.layer_idx and config.num_hidden_layers")
    return module.layer_idx >= n_layers - settings.full_attn_last_k


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """Mask builder registered for "moba": the [B, kv_length] bool padding mask, or None without padding.

    The attention function takes keys as the cached tokens followed by the new ones; a cache whose key slots are
    not exactly that (a static cache's fixed length, a sliding window's offset) is refused here, since that
    function cannot tell its empty slots from tokens."""
    past = int(q_offset)  # transformers' static cache layers give a tensor
    if kv_offset != 0 or kv_length != past + q_length:
        raise ValueError(f"moba: {kv_length} key slots (offset {kv_offset}) for {past} cached and {q_length} new "
                         "tokens; static or sliding caches are not supported (use the default DynamicCache)")
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:]
    if mask.shape[1] != kv_length:
        raise ValueError(f"moba: padding mask covers {mask.shape[1]} of {kv_length} key slots")
    return None if bool(mask.all()) else mask.bool()


def _check_mask(mask, batch: int, length: int) -> Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(f"moba: expected a [batch, kv_len] = [{batch}, {length}] padding mask, got "
                         f"{tuple(mask.shape)}; 4D or custom masks are not supported")
    return mask.bool()


def moba_attention(name: str, module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """HF attention function: query [B, Hq, Q, D], key/value [B, Hkv, L, D] (cache included) -> [B, Q, Hq, D]."""
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError("moba: MoBA is causal attention; bidirectional use (is_causal=False) is not supported")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("moba: sliding-window attention layers are not supported")
    if dropout and getattr(module, "training", False):
        raise ValueError(f"moba: attention dropout ({dropout}) is not supported")
    settings = settings_for(module, name)
    watch(module)
    mask = _check_mask(attention_mask, key.shape[0], key.shape[2])
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    full = is_full_layer(module, settings)
    if query.shape[2] == key.shape[2]:  # nothing cached before this call
        out = prefill(query, key, value, mask, kwargs.get("position_ids"), settings.block_size, settings.top_k,
                      settings.backend, scale, full)
        return out, None
    if getattr(module, "layer_idx", 0) == 0:  # once per forward: a host read
        refuse_packed_cache(kwargs.get("position_ids"), mask, key.shape[2] - query.shape[2])
    out = decode(module, query, key, value, mask, settings.block_size, settings.top_k, scale,
                 full or settings.full_decode)
    return out.transpose(1, 2), None


def refuse_packed_cache(position_ids: Tensor | None, mask: Tensor | None, cached: int) -> None:
    """Decoding treats each row's cache as one document; a row whose positions restarted (packed documents, which
    prefill splits at position 0) would route and attend across the restart. A restart shows as a real new token
    whose position is below the count of real tokens before it (padding slots carry arbitrary positions)."""
    if position_ids is None or position_ids.dim() != 2:
        return
    batch, new = position_ids.shape
    real = (mask if mask is not None else
            torch.ones(batch, cached + new, dtype=torch.bool, device=position_ids.device))
    real_new = real[:, cached:]
    before = real.long().cumsum(1)[:, cached:] - real_new.long()
    if bool((real_new & (position_ids.to(before.device) < before)).any()):
        raise ValueError("moba: cached decoding of packed sequences (position_ids restarting at 0 inside a row) is "
                         "not supported; decode each document in a row of its own")


def _moba(module, query, key, value, attention_mask, **kwargs):
    return moba_attention("moba", module, query, key, value, attention_mask, **kwargs)


def _moba_naive(module, query, key, value, attention_mask, **kwargs):
    return moba_attention("moba_naive", module, query, key, value, attention_mask, **kwargs)


def register_moba(block_size: int = 4096, top_k: int = 12, backend: str = "auto", full_attn_last_k: int = 0,
                  full_decode: bool = False) -> MobaSettings:
    """Register "moba" and "moba_naive" with transformers; calling again replaces the settings."""
    settings = MobaSettings(block_size, top_k, backend, full_attn_last_k, full_decode)
    _settings["moba"] = _settings["moba_naive"] = settings  # settings_for forces moba_naive's backend
    for name, fn in zip(NAMES, (_moba, _moba_naive)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_mask)
    return settings


__all__ = ["MobaSettings", "NAMES", "padding_mask", "register_moba", "settings_for"]
