"""End to end: `+exp=sft_tiny` from a `+exp=tiny` checkpoint, and `+exp=continue_llama` from a HF Llama dir."""

import json
import logging
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from moba_train.config import register_configs, to_config
from moba_train.data.sft import check_sft_config
from moba_train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
register_configs()


def config(name, *overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return to_config(compose(name, overrides=list(overrides)))


def train(name, *overrides):
    from moba_train.train.trainer import Trainer

    trainer = Trainer(config(name, *overrides))
    trainer.train()
    return trainer


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_sft_tiny_from_tiny_checkpoint(tmp_path):
    tiny = tmp_path / "tiny"
    trained = train("config", "+exp=tiny", "data.seq_len=256", "data.batch_size=1", "data.num_needles=4",
                    "attention.block_size=32", "train.device=cpu", "train.steps=1", f"train.out_dir={tiny}")
    assert os.listdir(tiny / "checkpoints") == ["step_00000001"]
    from moba_train.model.pretrained import init_model

    tiny_cfg = config("sft", "+exp=sft_tiny", f"model.init_from={tiny}")
    loaded = init_model(tiny_cfg.model, tiny_cfg.attention, "cpu")  # the run dir's newest checkpoint
    assert loaded.cfg.init_from == str(tiny / "checkpoints" / "step_00000001")
    assert trained.model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), (_, b) in zip(trained.model.state_dict().items(), loaded.state_dict().items()):
        assert a.equal(b), name
    sft = tmp_path / "sft"
    args = ["+exp=sft_tiny", f"model.init_from={tiny}", "data.seq_len=512", "data.batch_size=1",
            "data.sft.num_synthetic=24", "data.sft.overlength=truncate", "attention.block_size=64",
            "train.device=cpu", "train.steps=2", "train.log_every=1", f"train.out_dir={sft}"]
    run = subprocess.run([sys.executable, "launch/sft.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # as a user runs it
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    assert "sft data builtin:long_qa" in out and "'truncated': " in out
    assert f"initialized from DCP checkpoint {tiny}/checkpoints/step_00000001" in out
    assert "step 0: attention moba x1, full x1" in out
    records = metrics(sft)
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    # the SFT checkpoint (DCP) exported to a HF Llama dir: transformers' logits equal ours
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from moba_train.model import AttentionConfig
    from moba_train.model.dcp_import import load_dcp_model

    spec = importlib.util.spec_from_file_location("convert_hf", os.path.join(ROOT, "scripts", "convert_hf.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    ckpt = sft / "checkpoints" / "step_00000002"
    # a later launch in the run dir rewrites .hydra/config.yaml (even one that fails): the export still takes the
    # attention the checkpoint was trained with, from the checkpoint's own config.yaml
    hydra_cfg = sft / ".hydra" / "config.yaml"
    assert "block_size: 64" in hydra_cfg.read_text()
    hydra_cfg.write_text(hydra_cfg.read_text().replace("block_size: 64", "block_size: 512"))
    assert convert.main(["ours-to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    cfg = config("sft", *args)
    ours = load_dcp_model(str(ckpt), cfg.model, AttentionConfig(kind="full"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    # the attention it was trained with travels along for attn_implementation="moba"
    assert (hf.config.moba_block_size, hf.config.moba_top_k, hf.config.moba_full_attn_last_k) == (64, 4, 1)
    x = torch.randint(0, 260, (1, 64))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4
    # a model whose shapes do not match the checkpoint: one clear error naming the checkpoint
    from moba_train.train.trainer import Trainer

    bad = [*args, "model.ffn_dim=512", f"train.out_dir={tmp_path / 'bad'}"]
    with pytest.raises(UserError, match="step_00000001/config.yaml: the checkpoint has ffn_dim=384 but the config "
                                        "sets model.ffn_dim=512"):
        config("sft", *bad)
    os.remove(tiny / "checkpoints" / "step_00000001" / "config.yaml")  # a checkpoint from before they carried it:
    with pytest.raises(UserError, match="tiny/model_config.json: the checkpoint has ffn_dim=384 but the config "
                                        "sets model.ffn_dim=512"):  # the run's record
        config("sft", *bad)
    os.remove(tiny / "model_config.json")  # a run that did not record its architecture: the tensors disagree
    with pytest.raises(UserError, match=r"step_00000001: tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                        r"\[384, 128\] but the config gives \[512, 128\]"):
        Trainer(config("sft", *bad))


def test_sft_requires_a_checkpoint_and_sft_data(tmp_path):
    with pytest.raises(UserError, match="give model.init_from"):
        check_sft_config(config("sft", "+exp=sft_tiny", "model.init_from=null"))
    with pytest.raises(UserError, match="runs/nope: no such checkpoint directory"):
        config("sft", "+exp=sft_tiny", f"model.init_from={tmp_path}/runs/nope")
    cfg = config("sft", "+exp=sft_hybrid", "model.init_from=null", "data.path=x.jsonl")
    assert cfg.attention.full_attn_last_k == 3 and cfg.data.sft.tokenizer is None
    for name, exp in (("sft", "+exp=sft_hybrid"), ("config", "+exp=continue_llama")):
        with pytest.raises(UserError, match="model.init_from is required"):
            config(name, exp, "data.path=x")


def test_continue_llama_from_hf_with_stages(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, bos_token_id=290, eos_token_id=291, pad_token_id=292)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')  # stands for a tokenizer
    caplog.set_level(logging.INFO)
    trainer = train("config", "+exp=continue_llama", f"model.init_from={tmp_path / 'hf'}", "model.max_seq_len=256",
                    "data=synthetic", "data.num_needles=4", "data.seq_len=256", "data.batch_size=1",
                    "data.seq_len_schedule=[{at: 0.0, seq_len: 128}, {at: 0.5, seq_len: 256}]",
                    "attention.block_size=32", "attention.top_k=2", "attention.full_attn_last_k=1",
                    "attention.schedule=[{at: 0.75, kind: full}]", "train.device=cpu", "train.steps=4",
                    "train.log_every=1", "train.activation_checkpointing=none", f"train.out_dir={tmp_path / 'run'}")
    log = caplog.text
    assert "step 0: attention moba x3, full x1" in log and "step 3: attention full x4" in log
    assert "step 0: seq_len 128" in log and "step 2: seq_len 256" in log
    assert f"initialized from HF Llama {tmp_path / 'hf'}" in log
    assert len(metrics(tmp_path / "run")) == 4
    model = trainer.model
    assert model.cfg.rope_theta == 8e6 and model.cfg.n_layers == 4 and model.cfg.vocab_size == 300
    assert model.attention_kinds() == ["full"] * 4
    # the next stage (SFT here) starts from the run dir: the architecture comes from its model_config.json
    from moba_train.model.pretrained import init_model

    nxt = config("sft", "+exp=sft_hybrid", f"model.init_from={tmp_path / 'run'}", "data.path=x",
                 "attention.full_attn_last_k=2")
    assert (nxt.model.dim, nxt.model.n_layers, nxt.model.rope_theta) == (64, 4, 8e6)
    loaded = init_model(nxt.model, nxt.attention, "cpu")
    assert loaded.attention_kinds() == ["moba", "moba", "full", "full"]
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.equal(b), name
    # and exports to HF with the recorded architecture
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_hf", os.path.join(ROOT, "scripts", "convert_hf.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    from omegaconf import OmegaConf

    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(trainer.cfg), tmp_path / "run" / ".hydra" / "config.yaml")  # as launch/ does
    assert convert.main(["ours-to-hf", str(tmp_path / "run" / "checkpoints" / "step_00000004"),
                         str(tmp_path / "hf_out")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out")
    assert hf.config.rope_parameters["rope_theta"] == 8e6
    # what the trainer checkpoint lacks comes from the HF dir the run started from
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (290, 291, 292)
    assert (tmp_path / "hf_out" / "tokenizer_config.json").read_text() == '{"eos_token": "</s>"}'
    assert (tmp_path / "hf_out" / "generation_config.json").is_file()
    # its last stage was full attention everywhere: MoBA settings as trained, no full tail
    assert (hf.config.moba_block_size, hf.config.moba_top_k, hf.config.moba_full_attn_last_k) == (32, 2, 0)
    x = torch.randint(0, 300, (1, 40))
    loaded.set_attention_kinds(["full"] * 4)
    with torch.no_grad():
        assert (hf(x).logits - loaded(x)).abs().max() <= 1e-4
