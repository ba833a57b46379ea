from dataclasses import dataclass, field
from typing import Optional

AC_MODES = ("none", "full", "selective")


@dataclass
class TrainConfig:
    steps: int = 100
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; <= 0: no clipping (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step
    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0 = only at the end
    keep: int = 2  # newest complete checkpoints kept
    resume: str = "auto"  # auto | none | <path>
    async_save: bool = False


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "moba-train"
    name: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
