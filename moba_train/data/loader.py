"""Deterministic, resumable batching over an indexable dataset, split over data-parallel ranks.

Global sample order is fixed by the dataset; a step consumes `batch_size * dp_size` samples per micro-batch,
so the position is one number (`consumed`) that any dp size can resume from. Past the dataset's end (a finite
one, such as SFT packs, trained for several epochs) every further epoch takes it in a new seeded order.
"""

import numpy as np
import torch


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; per-sample document lengths (`doc_lens`) become cu_seqlens over the flattened batch."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("input_ids", "labels")}
    if any("doc_lens" in s for s in samples):  # a sample without doc_lens is one document
        lengths = torch.cat([s.get("doc_lens", torch.tensor([len(s["input_ids"])])) for s in samples])
        batch["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return batch


class Loader:
    def __init__(self, dataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = 0  # global samples consumed, over all dp ranks
        self._order = (0, None)  # (epoch, its permutation of the dataset)

    def next_batch(self) -> dict[str, torch.Tensor]:
        first = self.consumed + self.dp_rank * self.batch_size
        self.consumed += self.batch_size * self.dp_size
        return collate([self.dataset[self.index(first + i)] for i in range(self.batch_size)])

    def index(self, position: int) -> int:
        """The dataset index at global `position`: the dataset's own order in the first epoch, then a permutation
        of it per epoch, a function of (seed, epoch) alone, so resuming anywhere gives the same samples."""
        epoch, index = divmod(position, len(self.dataset))
        if epoch == 0:
            return index
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        return int(self._order[1][index])

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
