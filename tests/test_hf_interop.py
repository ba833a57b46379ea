"""HF Llama interop: logits equal transformers', round trips are exact, bad checkpoints give clear errors."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from moba_train.errors import UserError  # noqa: E402
from moba_train.model import AttentionConfig, ModelConfig  # noqa: E402
from moba_train.model.hf import CheckpointError, config_from_hf, from_hf, to_hf  # noqa: E402
from moba_train.model.pretrained import load_pretrained, save_consolidated  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = AttentionConfig(kind="full")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def convert_script():
    spec = importlib.util.spec_from_file_location("convert_hf", os.path.join(ROOT, "scripts", "convert_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_hf(tmp_path, name="hf", tie=False, rope_scaling=LLAMA3, shard=None, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=500000.0, rope_scaling=rope_scaling, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=tie)
    cfg.update(kw)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb them so a mapping mistake shows in the logits
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    path = tmp_path / name
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model, str(path)


def logits_diff(hf_model, ours, seq=48):
    x = torch.randint(0, hf_model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf_model(x).logits.float() - ours(x).float()).abs().max().item()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tmp_path, tie):
    hf_model, path = make_hf(tmp_path, tie=tie)
    ours = from_hf(path, FULL)
    assert ours.cfg.rope_scaling["rope_type"] == "llama3" and ours.cfg.n_kv_heads == 2
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tie
    assert ours.attention_kinds() == ["full", "full"]
    assert logits_diff(hf_model, ours) <= 1e-4
    assert torch.equal(ours.inv_freq, hf_model.model.rotary_emb.inv_freq)  # the same bits (float64 differed)


def test_sharded_and_default_rope(tmp_path):
    hf_model, path = make_hf(tmp_path, rope_scaling=None, shard="20KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = from_hf(path, FULL)
    assert ours.cfg.rope_scaling is None
    assert logits_diff(hf_model, ours) <= 1e-4
    assert torch.equal(ours.inv_freq, hf_model.model.rotary_emb.inv_freq)


def test_export_over_an_earlier_one_leaves_only_its_own_shards(tmp_path):
    """Re-exporting into a directory replaces every weight file: the earlier export's shards (another shard
    count) were left behind, to be uploaded or globbed along with the new ones."""
    _, path = make_hf(tmp_path)
    ours = from_hf(path, FULL)
    out = tmp_path / "out"
    to_hf(ours, out, max_shard_bytes=40_000)
    first = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    to_hf(ours, out, max_shard_bytes=80_000)
    second = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    n = len(second)
    assert len(first) > n > 1 and second == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    to_hf(ours, out)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]


def test_linear_scaling_and_dtype(tmp_path):
    hf_model, path = make_hf(tmp_path, rope_scaling={"rope_type": "linear", "factor": 4.0}, dtype=torch.bfloat16)
    assert from_hf(path, FULL, dtype="auto").embed_tokens.weight.dtype == torch.bfloat16
    ours = from_hf(path, FULL)  # float32 by default
    assert ours.embed_tokens.weight.dtype == torch.float32 and ours.inv_freq.dtype == torch.float32
    assert logits_diff(hf_model.float(), ours) <= 1e-4
    # a config.json that declares no dtype: "auto" takes the stored one (it used to fall back to float32)
    config = os.path.join(path, "config.json")
    cfg = {k: v for k, v in json.load(open(config)).items() if k not in ("dtype", "torch_dtype")}
    json.dump(cfg, open(config, "w"))
    assert from_hf(path, FULL, dtype="auto").embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_exact(tmp_path, tie):
    _, path = make_hf(tmp_path, tie=tie)
    ours = from_hf(path, FULL)
    to_hf(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.tie_word_embeddings == tie
    assert back.config.rope_parameters["rope_type"] == "llama3"
    src, out = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "out" / "model.safetensors")
    assert src.keys() == out.keys()
    assert all(torch.equal(src[k], out[k]) for k in src)
    again = from_hf(str(tmp_path / "out"), FULL)
    assert again.cfg == ours.cfg.__class__(**{**ours.cfg.__dict__, "init_from": str(tmp_path / "out")})
    assert ours.state_dict().keys() == again.state_dict().keys()
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    # through our consolidated format and the conversion script
    save_consolidated(ours, tmp_path / "ours")
    assert torch.equal(load_pretrained(str(tmp_path / "ours"), FULL).lm_head.weight, ours.lm_head.weight)
    assert convert_script().main(["ours-to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")]) == 0
    assert convert_script().main(["hf-to-ours", path, str(tmp_path / "ours2")]) == 0
    assert load_file(tmp_path / "ours2" / "model.safetensors").keys() == load_file(
        tmp_path / "ours" / "model.safetensors").keys()
    out2 = load_file(tmp_path / "hf2" / "model.safetensors")
    assert all(torch.equal(src[k], out2[k]) for k in src)
    # no tokenizer anywhere in the lineage: the generation config still comes back
    assert convert_script().main(["ours-to-hf", str(tmp_path / "ours2"), str(tmp_path / "hf3")]) == 0
    assert os.path.isfile(os.path.join(path, "generation_config.json"))
    assert os.path.isfile(tmp_path / "hf3" / "generation_config.json")


def test_overrides_and_moba(tmp_path):
    _, path = make_hf(tmp_path)
    ours = from_hf(path, AttentionConfig(kind="moba", block_size=8, top_k=2, full_attn_last_k=1),
                   rope_theta=1e6, rope_scaling=None, max_seq_len=1024)
    assert ours.cfg.rope_theta == 1e6 and ours.cfg.max_seq_len == 1024 and ours.cfg.init_from == path
    assert ours.attention_kinds() == ["moba", "full"]
    with pytest.raises(UserError, match="change the architecture"):
        from_hf(path, n_layers=3)
    with pytest.raises(UserError, match="unknown ModelConfig overrides"):
        from_hf(path, rope_thta=1.0)


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such directory"):
        from_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config.json: no such file"):
        from_hf(str(tmp_path / "empty"))
    _, path = make_hf(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    with pytest.raises(CheckpointError, match="only Llama"):
        config_from_hf({**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        config_from_hf({**cfg, "rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="attention_bias"):
        config_from_hf({**cfg, "attention_bias": True})
    json.dump([1, 2], open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config.json: a JSON list, not an object of config keys"):
        from_hf(path)
    # shape mismatch: the config says a bigger FFN than the weights
    json.dump({**cfg, "intermediate_size": 128}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' "
                                              r"has shape \[64, 96\] but the config gives \[64, 128\]"):
        from_hf(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing 1 tensors, e.g. \['norm.weight'\]"):
        from_hf(path)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        from_hf(path)
    capsys.readouterr()
    assert convert_script().main(["hf-to-ours", path, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no model.safetensors" in err


def test_lineage_is_recorded_absolute(tmp_path, monkeypatch):
    """A conversion run with relative paths records where it came from absolutely: from another working
    directory, the consolidated dir still leads back to the HF dir (and its token ids)."""
    from moba_train.model.pretrained import lineage, special_token_ids

    make_hf(tmp_path, bos_token_id=5, eos_token_id=6)
    monkeypatch.chdir(tmp_path)
    assert convert_script().main(["hf-to-ours", "hf", "ours"]) == 0
    monkeypatch.chdir(tmp_path.parent)
    ours = str(tmp_path / "ours")
    assert list(lineage(ours)) == [ours, str(tmp_path / "hf")]
    assert special_token_ids(ours) == {"bos_token_id": 5, "eos_token_id": 6}


def test_init_from_a_file_says_it_is_a_file(tmp_path):
    from moba_train.model.pretrained import checkpoint_kind, find_checkpoint

    (tmp_path / "model.safetensors").write_bytes(b"")
    for look in (find_checkpoint, checkpoint_kind):
        with pytest.raises(UserError, match="model.safetensors: a file, not a checkpoint directory"):
            look(str(tmp_path / "model.safetensors"))
        with pytest.raises(UserError, match="nope: no such checkpoint directory"):
            look(str(tmp_path / "nope"))


def test_explicit_model_values_override_the_checkpoint_even_at_schema_defaults(tmp_path):
    """Under model=from_init a value the command line sets wins over the checkpoint's even where it equals the
    schema default (rope_theta 10000, rope_scaling null: both were silently dropped, so the checkpoint's 500000 and
    llama3 scaling stayed); unset keys come from the checkpoint; the trainer's model is built with them."""
    from hydra import compose, initialize_config_dir

    from moba_train.config import register_configs, to_config
    from moba_train.model.pretrained import init_model

    _, path = make_hf(tmp_path, vocab_size=300)  # the default data (synthetic bytes) needs 260 tokens
    register_configs()

    def load(*overrides):
        with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
            return to_config(compose(config_name="config", overrides=["model=from_init", f"model.init_from={path}",
                                                                      *overrides]))

    kept = load().model
    assert (kept.rope_theta, kept.rope_scaling["rope_type"], kept.dim, kept.norm_eps) == (500000.0, "llama3", 64, 1e-5)
    cfg = load("model.rope_theta=10000.0", "model.rope_scaling=null", "model.max_seq_len=8192")
    assert (cfg.model.rope_theta, cfg.model.rope_scaling, cfg.model.max_seq_len, cfg.model.dim) == (10000.0, None,
                                                                                                   8192, 64)
    model = init_model(cfg.model, FULL, "cpu", resolved=True)
    assert (model.cfg.rope_theta, model.cfg.rope_scaling) == (10000.0, None)
    # the Python API (a bare ModelConfig): the values that differ from the schema defaults override, so these
    # defaults leave the checkpoint's
    api = init_model(ModelConfig(init_from=path), FULL, "cpu")
    assert (api.cfg.rope_theta, api.cfg.rope_scaling["rope_type"]) == (500000.0, "llama3")
    with pytest.raises(UserError, match="the checkpoint has dim=64 but the config sets model.dim=256"):
        load("model.dim=256")
