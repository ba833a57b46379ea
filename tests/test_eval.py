"""Needle eval: its per-answer losses are the model's own, gate recall follows the routing rule, bad flags fail
in one line."""

import importlib.util
import os

import pytest
import torch
from omegaconf import OmegaConf

from moba_train.config import Config
from moba_train.data import DataConfig, collate
from moba_train.data.synthetic import NeedleRetrieval
from moba_train.data.tokenizer import BYTE_VOCAB
from moba_train.eval import evaluate_needles, summarize
from moba_train.model import IGNORE_INDEX, AttentionConfig, Llama, ModelConfig
from moba_train.model.pretrained import save_consolidated

DATA = DataConfig(seq_len=512, min_doc_len=128, needle_run=4, num_needles=8)
BLOCK = 32  # MoBA block size of the test model (16 blocks per row)
CPU = torch.device("cpu")


def model(top_k: int) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=BYTE_VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    return Llama(cfg, AttentionConfig(block_size=BLOCK, top_k=top_k, backend="naive", full_attn_last_k=1))


def test_losses_are_the_models_own():
    net = model(top_k=3)
    answers = evaluate_needles(net, DATA, BLOCK, seed=7, samples=2, device=CPU)
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
    every = evaluate_needles(model(top_k=64), DATA, BLOCK, seed=3, samples=2, device=CPU)
    assert all(a.recall == [1.0] for a in every), "all blocks selected: every needle block is seen"
    own_only = evaluate_needles(model(top_k=1), DATA, BLOCK, seed=3, samples=2, device=CPU)
    assert {a.recall[0] for a in own_only if a.distance == 0} == {1.0}
    assert {a.recall[0] for a in own_only if a.distance > 0} == {0.0}
    rows = summarize(own_only)
    assert sum(r["answers"] for r in rows) == len(own_only)


def test_gate_recall_matches_an_independent_selection():
    """top_k between 1 and the block count, so the gate really chooses: recall equals the share of heads whose
    brute-force selection (float64 block means and scores, top-2 past blocks + own) holds a needle block."""
    net = model(top_k=3)
    captured = []
    core = next(layer.self_attn.core for layer in net.layers if layer.self_attn.kind == "moba")
    handle = core.register_forward_hook(lambda mod, args, out: captured.append((args[0], args[1])))
    answers = evaluate_needles(net, DATA, BLOCK, seed=3, samples=1, device=CPU)
    handle.remove()
    q, k = (x.double() for x in captured[0])
    batch = collate([NeedleRetrieval(DATA, 3)[0]])
    ids, labels, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seqlens"].tolist()
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    expected = []
    for t in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        start, end = next((s, e) for s, e in zip(cu, cu[1:]) if s <= t < e)
        own = (t - start) // BLOCK
        means = torch.stack([k[start + BLOCK * j:min(start + BLOCK * (j + 1), end)].mean(0) for j in range(own)])
        needles = {int(p) // BLOCK for p in (ids[start:t] == labels[t]).nonzero().flatten()}
        hits = 0
        for h in range(heads):
            scores = means[:, h // group] @ q[t, h]
            picked = set(scores.topk(min(2, own)).indices.tolist()) | {own}
            hits += bool(needles & picked)
        expected.append(hits / heads)
    assert [a.recall[0] for a in answers] == expected
    assert 0.0 < sum(expected) < len(expected), "some needles found, some missed: the choice matters here"


def eval_script():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "eval_needle.py")
    spec = importlib.util.spec_from_file_location("eval_needle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_dir(tmp_path):
    """A run on the needle task as the script reads it: its Hydra config (top_k 3) and a checkpoint."""
    net = model(top_k=3)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(Config(model=net.cfg, attention=net.attn_cfg, data=DATA)),
                   tmp_path / ".hydra" / "config.yaml")
    save_consolidated(net, str(tmp_path))
    return str(tmp_path)


def test_script_top_k_defaults_to_the_runs(run_dir, capsys):
    for flags, top_k in (([], 3), (["--top-k", "1"], 1)):
        eval_script().main(["--run", run_dir, "--samples", "1", "--device", "cpu", *flags])
        assert f"top_k {top_k}," in capsys.readouterr().out


def test_script_reads_the_checkpoints_own_config(run_dir, capsys):
    """A checkpoint's config.yaml (what it was trained with) wins over the run's .hydra/config.yaml, which any later
    launch in the run dir rewrites (a failed one included)."""
    from moba_train.train.checkpoint import RUN_CONFIG

    hydra_cfg = os.path.join(run_dir, ".hydra", "config.yaml")
    os.replace(hydra_cfg, os.path.join(run_dir, RUN_CONFIG))
    cfg = OmegaConf.load(os.path.join(run_dir, RUN_CONFIG))
    cfg.attention.top_k = 1
    OmegaConf.save(cfg, hydra_cfg)
    eval_script().main(["--run", run_dir, "--samples", "1", "--device", "cpu"])
    assert "top_k 3," in capsys.readouterr().out


def test_script_evaluates_the_layers_the_schedule_trained(run_dir, capsys):
    """A run whose attention.schedule switched every layer to full attention is evaluated with full layers (it
    used to get MoBA in every layer, and gate recall for layers that never routed)."""
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    cfg = OmegaConf.load(path)
    cfg.attention.schedule = [{"at": 0.5, "kind": "full"}]
    OmegaConf.save(cfg, path)
    eval_script().main(["--run", run_dir, "--samples", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "layers full x2," in out
    assert out.strip().splitlines()[-1].endswith("|  |")  # no gate-recall column entries


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k 0: must be >= 1 (leave it out to use the run's attention.top_k)"),
    (["--samples", "0"], "--samples 0: must be >= 1"),
    (["--device", "tpu"], "--device tpu: not a device name"),
    pytest.param(["--device", "cuda"], "--device cuda: 0 CUDA GPUs visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")),
])
def test_script_refuses_bad_flags(run_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        eval_script().main(["--run", run_dir, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_script_names_its_flag_for_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_script().main(["--run", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such checkpoint directory (--run)\n"


def test_script_stops_in_one_line_on_ctrl_c(run_dir, capsys, monkeypatch):
    """Ctrl-C during the rows gives one line and the shell's 130 (it was a traceback); the rows show a bar."""
    import moba_train.eval.needle as needle

    script = eval_script()
    seen = []

    def interrupted(batch):
        seen.append(batch)
        raise KeyboardInterrupt

    monkeypatch.setattr(needle, "collate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--run", run_dir, "--samples", "3", "--device", "cpu"])
    assert exit_info.value.code == 130 and len(seen) == 1
    err = capsys.readouterr().err
    assert err.endswith("interrupted (SIGINT): stopped without saving\n") and "Traceback" not in err
    assert "needle eval" in err
