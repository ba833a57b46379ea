"""Step metrics: a console progress bar, `<out_dir>/metrics.jsonl` (one JSON object per logged step), wandb."""

import json
import os
from typing import Optional

from tqdm import tqdm

from moba_train.train.config import LoggerConfig


METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes on the main rank only; other ranks get a silent instance."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, cfg: LoggerConfig, enabled: bool,
                 run_config: Optional[dict] = None):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, METRICS_FILE), "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.wandb = None
        if cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    dir=out_dir, config=run_config)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")  # shown now, with this step's count
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
