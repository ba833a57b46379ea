"""AdamW (fused on CUDA) with decay on matrices only, and a linear-warmup + cosine learning-rate schedule."""

import logging
import math

import torch
import torch.nn as nn

from moba_train.train.config import TrainConfig


log = logging.getLogger(__name__)


def group_weight_decays(cfg: TrainConfig) -> tuple[float, float]:
    """Weight decay of the optimizer's two groups: matrices, then vectors (norms, biases: no decay)."""
    return cfg.weight_decay, 0.0


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    matrices, vectors = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groups = [{"params": group, "weight_decay": decay}
              for group, decay in zip((matrices, vectors), group_weight_decays(cfg))]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 cfg: TrainConfig) -> None:
    """After a resume: the config's lr, betas and weight decay win over those the checkpoint restored (the
    optimizer's param groups, the scheduler's base_lrs); the lr of the current step follows the config's schedule."""
    decay_group = optimizer.param_groups[0]
    saved = {"lr": scheduler.base_lrs[0], "beta1": decay_group["betas"][0], "beta2": decay_group["betas"][1],
             "weight_decay": decay_group["weight_decay"]}
    for group, weight_decay in zip(optimizer.param_groups, group_weight_decays(cfg)):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(scheduler.last_epoch, cfg),
                     betas=(cfg.beta1, cfg.beta2), weight_decay=weight_decay)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    changed = [f"train.{key}={getattr(cfg, key)} (checkpoint: {value})" for key, value in saved.items()
               if value != getattr(cfg, key)]
    if changed:
        log.warning("resuming with optimizer settings that differ from the checkpoint's: %s", ", ".join(changed))
