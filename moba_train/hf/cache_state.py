"""Per-layer decode state (incremental block means) kept on the HF cache object that generate() passes around.

The attention function does not receive the cache, so a forward pre-hook on each attention module notes the
`past_key_values` of the current call (as a weak reference: the cache's lifetime stays the caller's). The state
lives on the cache itself, one entry per layer, and is dropped whenever the layer's key tensor is not the one the
state was last synchronised with (beam-search reorder, crop, reset, batch selection, a new prompt chunk, ...).
"""

import weakref
from typing import Any

import torch.nn as nn
from torch import Tensor

_ATTR = "_moba_train_states"  # {layer_idx: state} on the cache object


def layer_keys(cache: Any, layer_idx: int) -> Tensor | None:
    """The key tensor the cache holds for a layer (DynamicCache layout), None when it has none we can see."""
    try:
        return cache.layers[layer_idx].keys
    except (AttributeError, IndexError, TypeError):
        return None


def states_of(cache: Any) -> dict:
    states = getattr(cache, _ATTR, None)
    if states is None:
        states = {}
        setattr(cache, _ATTR, states)
    return states


def _note_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
    module._moba_cache = None if cache is None else weakref.ref(cache)
    if cache is None:
        return
    states = getattr(cache, _ATTR, None)
    state = None if states is None else states.get(getattr(module, "layer_idx", None))
    if state is not None and state.synced_keys() is not layer_keys(cache, module.layer_idx):
        del states[module.layer_idx]


def watch(module: nn.Module) -> None:
    """Install the cache-noting pre-hook on an attention module (once)."""
    if not getattr(module, "_moba_watched", False):
        module.register_forward_pre_hook(_note_cache, with_kwargs=True)
        module._moba_watched = True


def cache_of(module: nn.Module) -> Any:
    ref = getattr(module, "_moba_cache", None)
    return None if ref is None else ref()
