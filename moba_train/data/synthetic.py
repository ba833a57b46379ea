"""Embedded long-context task: key-value retrieval over a byte vocabulary.

A sequence scatters `num_pairs` (key, value) pairs through random filler, then asks `num_queries` keys again
at the end; only the answers (the values) carry loss. Chance loss is ln(num_values). Pairs sit far from the
queries, so the loss falls far below chance only if attention reaches distant blocks.
"""

import numpy as np
import torch

from moba_train.data.config import DataConfig
from moba_train.model.llama import IGNORE_INDEX

# byte vocabulary: 0..199 task symbols, filler 200..255, specials above
KEY0, FILLER0, FILLER1 = 0, 200, 256
BOS, EOS, PAD, SEP = 256, 257, 258, 259
VOCAB_SIZE = 260


class KVRetrieval:
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
        keys = rng.choice(c.num_keys, size=c.num_pairs, replace=False) + KEY0
        values = rng.integers(0, c.num_values, size=c.num_pairs) + KEY0 + c.num_keys
        # queries fill the tail: SEP key value, ...; pairs are spread over the context before it
        tail = 3 * c.num_queries
        context_end = c.seq_len + 1 - tail
        slots = rng.choice((context_end - 1) // 2, size=c.num_pairs, replace=False) * 2 + 1
        seq[slots], seq[slots + 1] = keys, values
        asked = rng.choice(c.num_pairs, size=c.num_queries, replace=False)
        query = np.stack([np.full(c.num_queries, SEP), keys[asked], values[asked]], 1).reshape(-1)
        seq[context_end:] = query
        labels = np.full(c.seq_len + 1, IGNORE_INDEX)
        answer_pos = context_end + 3 * np.arange(c.num_queries) + 2
        labels[answer_pos] = seq[answer_pos]
        seq_t, labels_t = torch.from_numpy(seq), torch.from_numpy(labels)
        return {"input_ids": seq_t[:-1].long(), "labels": labels_t[1:].long()}
