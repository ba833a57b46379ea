"""The embedded needle-retrieval task: deterministic, answers only where the needles are asked, packing."""

import torch

from moba_train.data import DataConfig, Loader
from moba_train.data.synthetic import MARKER0, NEEDLE0, SEP, NeedleRetrieval


def check_document(ids: torch.Tensor, labels: torch.Tensor, cfg: DataConfig) -> int:
    """Every labelled position is '<marker g>' whose target is the group-g needle hidden earlier in the doc."""
    answers = (labels != -100).nonzero().flatten().tolist()
    assert answers, "each document asks at least one question"
    for t in answers:
        group = int(ids[t]) - MARKER0
        needle = int(labels[t])
        assert ids[t - 1] == SEP and 0 <= group < cfg.num_needles
        assert NEEDLE0 + group * cfg.needle_values <= needle < NEEDLE0 + (group + 1) * cfg.needle_values
        first_question = answers[0] - 1
        run = (ids[:first_question] == needle).sum().item()
        assert run == cfg.needle_run, "the needle is written needle_run times before the questions"
    return len(answers)


def test_single_document_rows():
    cfg = DataConfig(seq_len=1024, num_needles=8, needle_values=8, needle_run=4)
    data = NeedleRetrieval(cfg, seed=1)
    sample = data[5]
    assert sample["input_ids"].shape == (1024,) and "doc_lens" not in sample
    assert check_document(sample["input_ids"], sample["labels"], cfg) == 8
    assert torch.equal(sample["input_ids"], NeedleRetrieval(cfg, seed=1)[5]["input_ids"]), "deterministic"
    assert not torch.equal(sample["input_ids"], NeedleRetrieval(cfg, seed=2)[5]["input_ids"])


def test_packed_rows_become_cu_seqlens():
    cfg = DataConfig(seq_len=2048, batch_size=3, min_doc_len=256)
    data = NeedleRetrieval(cfg, seed=0)
    batch = Loader(data, cfg.batch_size).next_batch()
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 3 * 2048 and all(b > a for a, b in zip(cu, cu[1:]))
    ids, labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
    for start, end in zip(cu, cu[1:]):
        assert end - start >= 256 and (end - start) <= 2048
        check_document(ids[start:end], labels[start:end], cfg)
    row_bounds = {0, 2048, 4096, 6144}
    assert row_bounds <= set(cu), "documents never cross rows"
