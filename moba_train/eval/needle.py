"""Needle retrieval on the embedded task (moba_train/data/synthetic.py): accuracy, loss and gate recall.

Each answer is scored on its own: was the argmax the needle, its loss, the length of its document, and how many
blocks back the needle sits from the question. For every MoBA layer the gate recall is the share of query heads
whose selection, for the token that must retrieve (the group marker), includes a block holding the needle.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moba_train.data.config import DataConfig
from moba_train.data.loader import collate
from moba_train.data.synthetic import NeedleRetrieval
from moba_train.model import IGNORE_INDEX, Llama
from moba_train.ops import moba_select

BUCKETS = ((0, 0), (1, 2), (3, 7), (8, 10**9))  # needle distance in blocks


@dataclass
class Answer:
    doc_len: int
    distance: int  # blocks between the question's block and the needle's (last) block
    correct: bool
    loss: float
    recall: list[float]  # per MoBA layer: share of query heads that selected a needle block


def _capture_selections(model: Llama) -> tuple[list, list]:
    """Forward hooks that record each MoBA layer's block selection of the current batch."""
    selections, handles = [], []

    def hook(core, args, output):
        q, k, _, cu, max_seqlen = args
        selections.append(moba_select(q, k, cu, max_seqlen, core.block_size, core.top_k))

    for layer in model.layers:
        if layer.self_attn.kind == "moba":
            handles.append(layer.self_attn.core.register_forward_hook(hook))
    return selections, handles


@torch.no_grad()
def evaluate_needles(model: Llama, data: DataConfig, block_size: int, seed: int, samples: int,
                     device: torch.device, progress: bool = False) -> list[Answer]:
    """Answers of `samples` rows of the task (seed picks rows the training run did not see if it differs);
    `progress`: a bar over the rows on stderr."""
    dataset = NeedleRetrieval(data, seed)
    selections, handles = _capture_selections(model)
    answers = []
    try:
        for index in tqdm(range(samples), desc="needle eval", unit="row", disable=not progress):
            batch = {k: v.to(device) for k, v in collate([dataset[index]]).items()}
            selections.clear()
            logits = model(batch["input_ids"], cu_seqlens=batch.get("cu_seqlens"))[0].float()
            ids, labels = batch["input_ids"][0], batch["labels"][0]
            cu = batch.get("cu_seqlens", torch.tensor([0, ids.numel()], device=device)).tolist()
            for t in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
                start, end = next((s, e) for s, e in zip(cu, cu[1:]) if s <= t < e)
                run = (ids[start:t] == labels[t]).nonzero().flatten()
                needle_blocks = set((run // block_size).tolist())
                own = (t - start) // block_size
                picks = torch.stack([sel[t] for sel in selections]).tolist() if selections else []  # one transfer
                recall = [sum(bool(needle_blocks & set(head)) for head in layer) / len(layer) for layer in picks]
                answers.append(Answer(end - start, own - max(needle_blocks), bool(logits[t].argmax() == labels[t]),
                                      F.cross_entropy(logits[t], labels[t]).item(), recall))
    finally:
        for handle in handles:
            handle.remove()
    return answers


def summarize(answers: list[Answer]) -> list[dict]:
    """One row per needle-distance bucket: answers, accuracy, mean loss, mean gate recall per MoBA layer."""
    rows = []
    for low, high in BUCKETS:
        group = [a for a in answers if low <= a.distance <= high]
        if not group:
            continue
        layers = len(group[0].recall)
        rows.append({"blocks_back": f"{low}" if low == high else f"{low}-{high}" if high < 10**9 else f">={low}",
                     "answers": len(group),
                     "accuracy": sum(a.correct for a in group) / len(group),
                     "loss": sum(a.loss for a in group) / len(group),
                     "gate_recall": [sum(a.recall[i] for a in group) / len(group) for i in range(layers)]})
    return rows
