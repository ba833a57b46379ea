"""Embedded long-context task: needle retrieval over a byte vocabulary.

Needle symbols (bytes 128..255) fall into `num_needles` groups of `needle_values` values. A sequence hides one
needle of every group at random places in filler text (a repeated sentence, as in passkey retrieval), then asks
for each group in random order ("SEP <group marker> <needle>"); only the answers carry loss, so chance loss is
ln(needle_values). The needles sit in blocks far before the questions: the loss falls far below chance only if
attention (the MoBA gate) reaches those distant blocks.
"""

import numpy as np
import torch

from moba_train.data.config import DataConfig
from moba_train.data.tokenizer import BYTE_BOS as BOS
from moba_train.data.tokenizer import BYTE_SEP as SEP
from moba_train.model.llama import IGNORE_INDEX

# byte vocabulary: group markers from 1, filler ASCII text, needles from 128, specials above the bytes
MARKER0, NEEDLE0 = 1, 128
FILLER = np.frombuffer(b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
                       dtype=np.uint8).astype(np.int64)


class NeedleRetrieval:
    """Infinite, deterministic: sample i depends only on (seed, i)."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        lengths = self._doc_lengths(rng)
        docs = [self._document(rng, n) for n in lengths]
        sample = {"input_ids": torch.from_numpy(np.concatenate([d[0] for d in docs])),
                  "labels": torch.from_numpy(np.concatenate([d[1] for d in docs]))}
        if len(lengths) > 1:
            sample["doc_lens"] = torch.tensor(lengths)
        return sample

    def _doc_lengths(self, rng: np.random.Generator) -> list[int]:
        """One document per row, or (min_doc_len > 0) several with log-uniform lengths packed into the row."""
        total, low = self.cfg.seq_len, min(self.cfg.min_doc_len, self.cfg.seq_len)
        if not low:
            return [total]
        lengths = []
        while total:
            n = min(total, int(np.exp(rng.uniform(np.log(low), np.log(self.cfg.seq_len)))))
            n = total if total - n < low else n
            lengths.append(n)
            total -= n
        return lengths

    def _document(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and (shifted) labels of one document of `length` tokens."""
        n_needles = max(1, min(self.cfg.num_needles, length // (2 * (self.cfg.needle_run + 3))))
        seq = np.resize(np.roll(FILLER, -rng.integers(len(FILLER))), length + 1)
        seq[0] = BOS
        groups = rng.permutation(self.cfg.num_needles)[:n_needles]
        needles = NEEDLE0 + groups * self.cfg.needle_values + rng.integers(0, self.cfg.needle_values, n_needles)
        questions_at = length + 1 - 3 * n_needles
        # each needle is a run of needle_run copies: slots of that width, spread over the context
        run = self.cfg.needle_run
        slots = rng.choice((questions_at - 1) // run, size=n_needles, replace=False) * run + 1
        seq[(slots[:, None] + np.arange(run)).reshape(-1)] = np.repeat(needles, run)
        asked = rng.permutation(n_needles)
        seq[questions_at:] = np.stack([np.full(n_needles, SEP), MARKER0 + groups[asked], needles[asked]], 1).reshape(-1)
        labels = np.full(length + 1, IGNORE_INDEX)
        answers = questions_at + 3 * np.arange(n_needles) + 2
        labels[answers] = seq[answers]
        return seq[:-1], labels[1:]
