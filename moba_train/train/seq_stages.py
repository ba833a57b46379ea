"""Staged sequence lengths: train on shorter sequences first, from the same data stream.

    data:
      seq_len: 131072                 # the rows the loader yields (the longest stage)
      seq_len_schedule:               # shorter stages cut every row into equal pieces
        - {at: 0.0, seq_len: 32768}
        - {at: 0.5, seq_len: 131072}

A stage starts at step round(at * train.steps); before the first one rows keep `data.seq_len`. A stage's
seq_len divides `data.seq_len`: each [B, S] batch becomes [B * S / s, s] with the same tokens and labels,
and every piece starts a new document (cu_seqlens gets a boundary every s tokens; positions restart).
Tokens per step, data order and the loader state stay the same, so resuming is exact in every stage.
"""

from typing import Any

import torch
from torch import Tensor

from moba_train.errors import ConfigError
from moba_train.model.llama import rows_cu_seqlens
from moba_train.train.schedule_attn import number, stage_at


class SeqLenSchedule:
    def __init__(self, stages: list[dict[str, Any]], seq_len: int, total_steps: int):
        self.seq_len = seq_len
        self.stages: list[tuple[int, int]] = [(0, seq_len)]
        last = -1.0
        for i, stage in enumerate(stages):
            key = f"data.seq_len_schedule[{i}]"
            if set(stage) - {"at", "seq_len"} or "at" not in stage or "seq_len" not in stage:
                raise ConfigError(f"{key} must have exactly the keys 'at' and 'seq_len', got {sorted(stage)}")
            at, s = number(stage["at"], f"{key}.at"), number(stage["seq_len"], f"{key}.seq_len", whole=True)
            if not 0.0 <= at <= 1.0 or at < last:
                raise ConfigError(f"{key}.at={stage['at']} must be in [0, 1] and not before the previous stage")
            if s < 2 or seq_len % s:
                raise ConfigError(f"{key}.seq_len={s} must divide data.seq_len={seq_len}")
            last = at
            self.stages.append((int(round(at * total_steps)), s))

    @property
    def switch_steps(self) -> list[int]:
        return [start for start, _ in self.stages[1:]]

    def seq_len_at(self, step: int) -> int:
        return stage_at(self.stages, step)

    def reshape(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The batch cut to the stage's sequence length (unchanged when it is data.seq_len)."""
        s = self.seq_len_at(step)
        rows, full = batch["input_ids"].shape
        if s == full:
            return batch
        total = rows * full
        cu = batch.get("cu_seqlens")
        if cu is None:
            cu = rows_cu_seqlens(batch["input_ids"])
        pieces = torch.arange(0, total + 1, s, dtype=cu.dtype, device=cu.device)
        bounds = torch.unique(torch.cat([cu, pieces]))  # sorted
        out = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "positions")}
        out["input_ids"] = batch["input_ids"].reshape(-1, s)
        out["labels"] = batch["labels"].reshape(-1, s)
        out["cu_seqlens"] = bounds.to(torch.int32)
        return out  # positions restart at every document: the model derives them from cu_seqlens
