"""What the trainer asks each step of staged training: which attention each layer uses (attention.schedule)
and how long the sequences are (data.seq_len_schedule). Changes are logged with the step they start at, and an
attention setup that costs more than it need (MoBA nearly dense, allgather CP over MoBA layers) is warned about."""

import logging

import torch.nn as nn
from torch import Tensor

from moba_train.ops.gate import attended_share
from moba_train.train.schedule_attn import AttentionSchedule, describe
from moba_train.train.seq_stages import SeqLenSchedule

log = logging.getLogger(__name__)

# The fused kernels do a MoBA pair at ~0.75-0.8x the rate of dense cuDNN attention (7 matrix products per pair in
# the backward against 5): a MoBA layer that attends more of the causal pairs than this is no faster than full
# attention (docs/benchmarks.md, "Training steps on one GPU")
DENSE_SHARE = 0.8


class TrainingStages:
    def __init__(self, cfg, is_main: bool = True):
        steps = cfg.train.steps
        self.attention = AttentionSchedule(cfg.attention, cfg.model.n_layers, steps)
        self.seq_len = SeqLenSchedule(cfg.data.seq_len_schedule, cfg.data.seq_len, steps)
        self.block_size, self.top_k = cfg.attention.block_size, cfg.attention.top_k
        self.is_main = is_main
        self._seq_len = None  # None until the first step
        cp, moba = cfg.parallel.cp, any("moba" in kinds for _, kinds in self.attention.stages)
        if is_main and cp > 1 and cfg.parallel.cp_mode == "allgather" and moba and cfg.model.n_kv_heads % cp == 0:
            log.warning("parallel.cp_mode=allgather runs the MoBA kernels over the whole sequence's queries on every "
                        "rank (%dx the sparse attention work, see parallel/offset_attn.py); parallel.cp_mode=ulysses "
                        "splits the heads over the ranks instead and does that work once", cp)

    def begin_step(self, model: nn.Module, step: int) -> None:
        """Call before training step `step` (0-based), also the first one after a resume."""
        first = self._seq_len is None
        changed = self.attention.apply(model, step)
        seq_len = self.seq_len.seq_len_at(step)
        if self.is_main and (first or changed):
            log.info("step %d: attention %s", step, describe(self.attention.kinds_at(step)))
        if self.is_main and seq_len != self._seq_len:
            log.info("step %d: seq_len %d", step, seq_len)
        if self.is_main and (first or changed or seq_len != self._seq_len):
            self.check_density(step, seq_len)
        self._seq_len = seq_len

    def check_density(self, step: int, seq_len: int) -> None:
        """Warn where this step's MoBA layers attend nearly all causal pairs (but not all: then MoBA is full
        attention, and the op runs it as such)."""
        if "moba" not in self.attention.kinds_at(step):
            return
        share = attended_share(seq_len, self.block_size, self.top_k)
        if DENSE_SHARE <= share < 1.0:
            log.warning("step %d: MoBA (block_size %d, top_k %d) attends %.0f%% of the causal pairs of a %d-token "
                        "sequence, so it runs no faster than full attention here; a smaller block_size or top_k "
                        "makes it sparser", step, self.block_size, self.top_k, 100 * share, seq_len)

    def shape_batch(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The loader's batch cut to this step's sequence length (before it is sharded over cp)."""
        return self.seq_len.reshape(batch, step)
