"""Embedded long-context task: needle retrieval over a byte vocabulary.

Symbols fall into `num_needles` groups of `needle_values` values. A sequence hides one needle of every group
at random places in random filler, then asks for each group in random order ("SEP <group marker> <needle>");
only the answers carry loss, so chance loss is ln(needle_values). The needles sit in blocks far before the
questions: the loss falls far below chance only if attention (the MoBA gate) reaches those distant blocks.
"""

import numpy as np
import torch

from moba_train.data.config import DataConfig
from moba_train.model.llama import IGNORE_INDEX

# byte vocabulary: needles from 0, group markers from MARKER0, filler FILLER0..255, specials above
MARKER0, FILLER0, FILLER1 = 192, 224, 256
BOS, EOS, PAD, SEP = 256, 257, 258, 259
VOCAB_SIZE = 260


class NeedleRetrieval:
    """Infinite, deterministic: sample i depends only on (seed, i)."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        c = self.cfg
        rng = np.random.default_rng([self.seed, index])
        seq = rng.integers(FILLER0, FILLER1, size=c.seq_len + 1)
        seq[0] = BOS
        groups = np.arange(c.num_needles)
        needles = groups * c.needle_values + rng.integers(0, c.needle_values, size=c.num_needles)
        questions_at = c.seq_len + 1 - 3 * c.num_needles
        seq[1 + rng.choice(questions_at - 1, size=c.num_needles, replace=False)] = needles
        asked = rng.permutation(c.num_needles)
        seq[questions_at:] = np.stack([np.full(c.num_needles, SEP), MARKER0 + asked, needles[asked]], 1).reshape(-1)
        labels = np.full(c.seq_len + 1, IGNORE_INDEX)
        answers = questions_at + 3 * np.arange(c.num_needles) + 2
        labels[answers] = seq[answers]
        seq_t, labels_t = torch.from_numpy(seq), torch.from_numpy(labels)
        return {"input_ids": seq_t[:-1].long(), "labels": labels_t[1:].long()}
