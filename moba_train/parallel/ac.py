"""Activation checkpointing applied to a built model (the model code has no checkpointing switches).

- `full`: every transformer block recomputes its forward in the backward;
- `selective`: only the MLP of every block is recomputed (attention outputs are kept: at long context
  attention is the expensive part to redo, MLP activations the large part to keep).

Forwards are wrapped in place (an instance attribute), so parameter names and checkpoints are unchanged.
"""

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moba_train.train.config import AC_MODES


def _checkpointed(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    if mode not in AC_MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r} is not one of {AC_MODES}")
    if mode == "none":
        return model
    for block in model.layers:
        _checkpointed(block if mode == "full" else block.mlp)
    return model
