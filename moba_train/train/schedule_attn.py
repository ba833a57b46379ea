"""Staged attention: switch layers between MoBA and full attention at fractions of `train.steps`.

    attention:
      kind: moba
      schedule:                       # the MoBA paper's recipe: MoBA for 90% of training, full for the rest
        - {at: 0.9, kind: full}

A stage starts at step round(at * train.steps) (0-based: the first step it trains) and sets any of `kind`,
`full_attn_last_k`, `layers`; fields it leaves out come from the base `attention` config (stages do not
accumulate). Before the first stage the base config holds. Examples:
    - {at: 0.0, kind: full}, {at: 0.1, kind: moba}     full-attention warm-up, then MoBA
    - {at: 0.5, full_attn_last_k: 3}                   hybrid for the second half
"""

import bisect
import dataclasses
import math
from typing import Any, Optional

import torch.nn as nn

from moba_train.errors import ConfigError
from moba_train.model.config import ATTENTION_KINDS, AttentionConfig, layer_kinds

STAGE_KEYS = ("at", "kind", "full_attn_last_k", "layers")


def number(value: Any, key: str, whole: bool = False) -> float:
    """A schedule value as a float (an int with whole=True), or a ConfigError naming its key."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number") from None
    if whole and not x.is_integer():
        raise ConfigError(f"{key}={value!r} must be a whole number")
    return int(x) if whole else x


def stage_at(stages: list[tuple[int, Any]], step: int) -> Any:
    """The value of the last stage starting at or before `step`; stages are (first step, value), ascending."""
    return stages[max(bisect.bisect_right([start for start, _ in stages], step) - 1, 0)][1]


def validate_schedule(attn: AttentionConfig, n_layers: int) -> None:
    last = -1.0
    for i, stage in enumerate(attn.schedule):
        key = f"attention.schedule[{i}]"
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"{key} has unknown keys {unknown}; allowed: {STAGE_KEYS}")
        at = number(stage["at"], f"{key}.at") if "at" in stage else math.nan
        if not 0.0 <= at <= 1.0:
            raise ConfigError(f"{key}.at must be a step fraction in [0, 1]")
        if at < last:
            raise ConfigError(f"{key}.at={stage['at']} comes before the previous stage's at={last}")
        last = at
        if "kind" in stage and stage["kind"] not in ATTENTION_KINDS:
            raise ConfigError(f"{key}.kind={stage['kind']!r} is not one of {ATTENTION_KINDS}")
        if "full_attn_last_k" in stage and not (
                0 <= number(stage["full_attn_last_k"], f"{key}.full_attn_last_k", whole=True) <= n_layers):
            raise ConfigError(f"{key}.full_attn_last_k={stage['full_attn_last_k']} must be in [0, {n_layers}]")
        if stage.get("layers") is not None:
            layers = list(stage["layers"])
            if len(layers) != n_layers or any(k not in ATTENTION_KINDS for k in layers):
                raise ConfigError(f"{key}.layers must list {n_layers} kinds from {ATTENTION_KINDS}, got {layers}")


def stage_config(attn: AttentionConfig, stage: dict[str, Any]) -> AttentionConfig:
    fields = {k: stage[k] for k in ("kind", "full_attn_last_k", "layers") if k in stage}
    if "full_attn_last_k" in fields:  # YAML may give 2.0 or "2"
        fields["full_attn_last_k"] = number(fields["full_attn_last_k"], "full_attn_last_k", whole=True)
    if "layers" in fields and fields["layers"] is not None:
        fields["layers"] = list(fields["layers"])
    elif "kind" in stage or "full_attn_last_k" in stage:
        fields.setdefault("layers", None)  # a stage that names kinds replaces an explicit base list
    return dataclasses.replace(attn, schedule=[], **fields)


class AttentionSchedule:
    """Per-layer attention kinds as a function of the step; `apply` switches a model when they change."""

    def __init__(self, attn: AttentionConfig, n_layers: int, total_steps: int):
        validate_schedule(attn, n_layers)
        self.n_layers = n_layers
        base = layer_kinds(attn, n_layers)
        # (first step, kinds), ascending; the base config holds from step 0
        self.stages: list[tuple[int, list[str]]] = [(0, base)]
        for stage in attn.schedule:
            start = int(round(float(stage["at"]) * total_steps))
            self.stages.append((start, layer_kinds(stage_config(attn, stage), n_layers)))

    @property
    def switch_steps(self) -> list[int]:
        return [start for start, _ in self.stages[1:]]

    def kinds_at(self, step: int) -> list[str]:
        """The kinds used to train step `step` (0-based)."""
        return list(stage_at(self.stages, step))

    def kinds_saved_at(self, steps_done: int) -> list[str]:
        """The kinds of a checkpoint saved after `steps_done` steps: those of its last trained step."""
        return self.kinds_at(max(steps_done - 1, 0))

    def apply(self, model: nn.Module, step: int) -> Optional[list[str]]:
        """Set the kinds for step `step` on `model` (a Llama; parallelize wraps it in place); returns them if they
        changed."""
        kinds = self.kinds_at(step)
        if model.attention_kinds() == kinds:
            return None
        model.set_attention_kinds(kinds)
        return kinds


def describe(kinds: list[str]) -> str:
    """'moba x5, full x3' style summary for logs."""
    parts, prev, count = [], None, 0
    for k in kinds + [None]:
        if k == prev:
            count += 1
            continue
        if prev is not None:
            parts.append(f"{prev} x{count}")
        prev, count = k, 1
    return ", ".join(parts)
