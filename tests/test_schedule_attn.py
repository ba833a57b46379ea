"""Staged attention (MoBA <-> full per layer at step fractions) and staged sequence lengths."""

import logging

import pytest
import torch

from moba_train.config import Config
from moba_train.errors import ConfigError
from moba_train.model import AttentionConfig, Llama, ModelConfig
from moba_train.train.schedule_attn import AttentionSchedule, describe
from moba_train.train.seq_stages import SeqLenSchedule
from moba_train.train.stages import TrainingStages


def test_paper_recipe_switches_at_90_percent():
    attn = AttentionConfig(kind="moba", schedule=[{"at": 0.9, "kind": "full"}])
    sched = AttentionSchedule(attn, n_layers=4, total_steps=100)
    assert sched.switch_steps == [90]
    assert sched.kinds_at(0) == sched.kinds_at(89) == ["moba"] * 4
    assert sched.kinds_at(90) == sched.kinds_at(99) == ["full"] * 4


def test_warmup_then_hybrid_and_explicit_layers():
    attn = AttentionConfig(kind="moba", full_attn_last_k=1, schedule=[
        {"at": 0.0, "kind": "full"}, {"at": 0.1, "kind": "moba", "full_attn_last_k": 2},
        {"at": 0.5, "layers": ["full", "moba", "moba", "full"]}, {"at": 0.8, "full_attn_last_k": 3}])
    sched = AttentionSchedule(attn, n_layers=4, total_steps=50)
    assert sched.switch_steps == [0, 5, 25, 40]
    assert sched.kinds_at(0) == sched.kinds_at(4) == ["full"] * 4
    assert sched.kinds_at(5) == sched.kinds_at(24) == ["moba", "moba", "full", "full"]
    assert sched.kinds_at(25) == ["full", "moba", "moba", "full"]
    assert sched.kinds_at(40) == ["moba", "full", "full", "full"]  # base kind, this stage's full_attn_last_k
    assert describe(sched.kinds_at(40)) == "moba x1, full x3"


def test_no_schedule_is_the_base_config():
    sched = AttentionSchedule(AttentionConfig(kind="moba", full_attn_last_k=2), n_layers=3, total_steps=10)
    assert sched.switch_steps == [] and sched.kinds_at(9) == ["moba", "full", "full"]


def test_apply_switches_the_model_at_the_right_step():
    torch.manual_seed(0)
    attn = AttentionConfig(kind="moba", block_size=16, top_k=2, backend="naive", full_attn_last_k=1,
                           schedule=[{"at": 0.5, "kind": "full"}])
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64), attn)
    sched = AttentionSchedule(attn, 3, total_steps=4)
    x = torch.randint(0, 64, (1, 64))
    seen = []
    for step in range(4):
        changed = sched.apply(model, step)
        seen.append((step, changed, model.attention_kinds()))
        model(x)
    assert seen[0] == (0, None, ["moba", "moba", "full"])
    assert seen[1][1] is None
    assert seen[2] == (2, ["full"] * 3, ["full"] * 3)
    assert sched.apply(model, 3) is None
    sched.apply(model, 1)  # resuming earlier puts the earlier kinds back
    assert model.attention_kinds() == ["moba", "moba", "full"]


@pytest.mark.parametrize("stage,msg", [({"kind": "full"}, "at must be"), ({"at": 0.5, "kind": "dense"}, "kind="),
                                       ({"at": 0.5, "full_attn_last_k": 9}, r"must be in \[0, 4\]"),
                                       ({"at": 0.5, "layers": ["full"]}, "must list 4 kinds"),
                                       ({"at": 0.5, "top_k": 3}, "unknown keys")])
def test_schedule_errors(stage, msg):
    with pytest.raises(ConfigError, match=msg):
        AttentionSchedule(AttentionConfig(schedule=[stage]), n_layers=4, total_steps=10)


def test_seq_len_stages_cut_rows_into_documents():
    sched = SeqLenSchedule([{"at": 0.0, "seq_len": 4}, {"at": 0.5, "seq_len": 8}], seq_len=8, total_steps=10)
    assert sched.switch_steps == [0, 5] and sched.seq_len_at(4) == 4 and sched.seq_len_at(5) == 8
    ids = torch.arange(16).view(2, 8)
    batch = {"input_ids": ids, "labels": ids + 1, "cu_seqlens": torch.tensor([0, 3, 8, 16], dtype=torch.int32),
             "positions": torch.tensor([0, 1, 2, 0, 1, 2, 3, 4] + list(range(8))).view(2, 8)}
    short = sched.reshape(batch, step=2)
    assert short["input_ids"].shape == (4, 4) and torch.equal(short["labels"].flatten(), batch["labels"].flatten())
    assert short["cu_seqlens"].tolist() == [0, 3, 4, 8, 12, 16] and "positions" not in short
    assert sched.reshape(batch, step=5) is batch
    with pytest.raises(ConfigError, match="must divide data.seq_len=8"):
        SeqLenSchedule([{"at": 0.0, "seq_len": 3}], seq_len=8, total_steps=10)


def test_seq_len_stage_loss_equals_separate_rows():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64),
                  AttentionConfig(kind="moba", block_size=16, top_k=2, backend="naive")).eval()
    ids = torch.randint(0, 64, (2, 64))
    sched = SeqLenSchedule([{"at": 0.0, "seq_len": 32}], seq_len=64, total_steps=1)
    b = sched.reshape({"input_ids": ids, "labels": ids}, 0)
    with torch.no_grad():
        staged = model(b["input_ids"], None, b["cu_seqlens"], labels=b["labels"])[0]
        rows = model(ids.view(4, 32), labels=ids.view(4, 32))[0]
    assert torch.allclose(staged, rows, atol=1e-4)


def test_dense_moba_warns_once_per_stage(caplog):
    """MoBA attending nearly every causal pair is no faster than full attention: the stages say so when a stage
    starts (64 tokens at block 4 / top_k 12: 16 blocks, 92% of the pairs), not at the sparse first stage, and
    not where MoBA is full attention (top_k covers every block)."""
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
    cfg.attention = AttentionConfig(kind="moba", block_size=4, top_k=12, backend="naive")
    cfg.train.steps = 10
    cfg.data.seq_len = 256  # 64 blocks: 39% of the pairs
    cfg.data.seq_len_schedule = [{"at": 0.5, "seq_len": 64}]
    model = Llama(cfg.model, cfg.attention)
    stages = TrainingStages(cfg)
    with caplog.at_level(logging.WARNING, logger="moba_train.train.stages"):
        for step in range(10):
            stages.begin_step(model, step)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("step 5: MoBA (block_size 4, top_k 12) attends 92%")
    cfg.attention.top_k = 16  # 16 blocks of 64 tokens, all selected: full attention, no warning
    caplog.clear()
    stages = TrainingStages(cfg)
    with caplog.at_level(logging.WARNING, logger="moba_train.train.stages"):
        for step in range(10):
            stages.begin_step(model, step)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
