"""Needle eval: its per-answer losses are the model's own, and gate recall follows the routing rule."""

import torch

from moba_train.data import DataConfig, collate
from moba_train.data.synthetic import NeedleRetrieval
from moba_train.data.tokenizer import BYTE_VOCAB
from moba_train.eval import evaluate_needles, summarize
from moba_train.model import AttentionConfig, Llama, ModelConfig

DATA = DataConfig(seq_len=512, min_doc_len=128, needle_run=4, num_needles=8)
CPU = torch.device("cpu")


def model(top_k: int) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=BYTE_VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    return Llama(cfg, AttentionConfig(block_size=32, top_k=top_k, backend="naive", full_attn_last_k=1))


def test_losses_are_the_models_own():
    net = model(top_k=3)
    answers = evaluate_needles(net, DATA, 32, seed=7, samples=2, device=CPU)
    rows = [NeedleRetrieval(DATA, 7)[i] for i in range(2)]
    total, count = 0.0, 0
    for row in rows:
        batch = collate([row])
        loss, n = net(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"])
        total, count = total + loss.item(), count + int(n)
    assert len(answers) == count
    assert abs(sum(a.loss for a in answers) - total) < 1e-3
    assert all(len(a.recall) == 1 for a in answers), "one MoBA layer (the last is full)"


def test_gate_recall_follows_top_k():
    every = evaluate_needles(model(top_k=64), DATA, 32, seed=3, samples=2, device=CPU)
    assert all(a.recall == [1.0] for a in every), "all blocks selected: every needle block is seen"
    own_only = evaluate_needles(model(top_k=1), DATA, 32, seed=3, samples=2, device=CPU)
    assert {a.recall[0] for a in own_only if a.distance == 0} == {1.0}
    assert {a.recall[0] for a in own_only if a.distance > 0} == {0.0}
    rows = summarize(own_only)
    assert sum(r["answers"] for r in rows) == len(own_only)
