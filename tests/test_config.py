"""Config tree: recipes compose, and bad values fail with one line naming the key."""

import os
import re

import pytest
from hydra import compose, initialize_config_dir

from moba_train.config import register_configs, to_config
from moba_train.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
register_configs()


def load(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def test_recipes_compose():
    tiny = load("+exp=tiny")
    assert tiny.attention.kind == "moba" and tiny.model.dim == 128 and tiny.model.n_kv_heads % 4 == 0
    big = load("+exp=moba_128k", "data.path=/data/x")
    assert (big.data.seq_len, big.attention.block_size, big.attention.top_k) == (131072, 4096, 12)
    assert big.model.n_layers == 16 and big.model.dim == 2048
    hybrid = load("+exp=tiny", "attention.full_attn_last_k=1")
    assert hybrid.attention.full_attn_last_k == 1


@pytest.mark.parametrize("override,match", [
    ("attention.top_k=0", "attention.top_k=0 must be >= 1"),
    ("attention.block_size=24", "attention.block_size=24 must be a positive multiple of 16"),
    ("attention.kind=sparse", "attention.kind='sparse' is not one of"),
    ("attention.backend=cuda", "attention.backend='cuda' is not one of"),
    ("model.n_kv_heads=3", "model.n_heads=4 must be a multiple of model.n_kv_heads=3"),
    ("model.n_heads=3", "model.dim=128 must be divisible by model.n_heads=3"),
    ("train.device=tpu", "train.device='tpu' is not one of"),
    ("attention.full_attn_last_k=9", "attention.full_attn_last_k=9 must be in"),
    ("attention.layers=[moba]", "attention.layers has 1 entries"),
    ("model.rope_scaling={rope_type: yarn, factor: 2.0}", "model.rope_scaling.rope_type='yarn' is not one of"),
    ("model.rope_scaling={rope_type: llama3, factor: 8.0}", "rope_type llama3 needs ['low_freq_factor'"),
    # stages are checked with the rest of the config, before the trainer loads any weights
    ("attention.schedule=[{at:0.5,kind:sparse}]", "attention.schedule[0].kind='sparse' is not one of"),
    ("data.seq_len_schedule=[{at:0.0,seq_len:300}]", "data.seq_len_schedule[0].seq_len=300 must divide"),
    ("train.beta2=1.5", "train.beta2=1.5 must be in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2.0 must be in [0, 1]"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
    # accepted until the ninth session, each ending in a NaN loss, a torch traceback or a wrong HF export
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"),
    ("model.init_std=-1", "model.init_std=-1.0 must be >= 0"),
    ("model.max_seq_len=-5", "model.max_seq_len=-5 must be > 0"),
    ("attention.softmax_scale=-1", "attention.softmax_scale=-1.0 must be > 0"),
    ("model.vocab_size=100", "model.vocab_size=100 is smaller than the synthetic task's byte vocabulary"),
    ("data.num_needles=0", "data.num_needles=0 must be >= 1"),
    ("data.needle_values=0", "data.needle_values=0 must be >= 1"),
    (("logger.wandb.enabled=true", "logger.wandb.mode=foo"), "logger.wandb.mode='foo' is not one of"),
    (("data=sft", "data.path=builtin:long_qa", "data.sft.num_synthetic=-5"), "data.sft.num_synthetic=-5 must be >= 1"),
    # tracebacks (ValueError, TypeError) or silently changed values until the thirteenth session
    ("attention.schedule=[{at:x,kind:full}]", "attention.schedule[0].at='x' is not a number"),
    ("attention.schedule=[{at:null,kind:full}]", "attention.schedule[0].at=None is not a number"),
    ("attention.schedule=[{at:0.5,full_attn_last_k:abc}]", "attention.schedule[0].full_attn_last_k='abc' is not"),
    ("attention.schedule=[{at:0.5,full_attn_last_k:1.5}]", "full_attn_last_k=1.5 must be a whole number"),
    ("data.seq_len_schedule=[{at:abc,seq_len:256}]", "data.seq_len_schedule[0].at='abc' is not a number"),
    ("data.seq_len_schedule=[{at:0.0,seq_len:null}]", "data.seq_len_schedule[0].seq_len=None is not a number"),
    ("data.seq_len_schedule=[{at:0.0,seq_len:512.5}]", "data.seq_len_schedule[0].seq_len=512.5 must be a whole"),
    ("train.lr=inf", "train.lr=inf must be a finite number > 0"),
    ("train.grad_clip=nan", "train.grad_clip=nan must be a number"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load("+exp=tiny", *(override if isinstance(override, tuple) else (override,)))


def test_rope_scaling_from_the_command_line():
    """Position interpolation as the continue_llama recipe documents it: the schema's default is None, and the
    override must still land (a typed Optional[dict] node set to None refused it)."""
    import torch

    from moba_train.model.llama import Llama
    from moba_train.model.rope import inv_frequencies

    cfg = load("+exp=tiny", "model.rope_scaling={rope_type: linear, factor: 4.0}")
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    base = inv_frequencies(cfg.model.head_size, cfg.model.rope_theta, None)
    assert torch.allclose(Llama(cfg.model, cfg.attention).inv_freq, base / 4)
    assert load("+exp=tiny").model.rope_scaling is None


def test_megatron_data_needs_a_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        load("+exp=moba_128k")


def test_unknown_key_is_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        load("+exp=tiny", "attention.topk=3")


def test_gpu_backends_on_a_cpu_run_fail_before_the_model_is_built():
    from moba_train.train.trainer import pick_device

    for backend in ("varlen", "triton"):
        with pytest.raises(ConfigError, match=f"attention.backend={backend} needs a CUDA GPU"):
            pick_device("cpu", backend)
    assert pick_device("cpu", "naive").type == "cpu" and pick_device("cpu", "auto").type == "cpu"


def test_declared_context_covers_the_trained_one(caplog):
    """model.max_seq_len (an HF export's max_position_embeddings) below data.seq_len was kept: a run trained at
    2048 tokens exported a model declaring 1024, whose generation then refused the prompts it was trained on."""
    assert load("+exp=tiny", "model.max_seq_len=1024", "data.seq_len=2048").model.max_seq_len == 2048
    assert "model.max_seq_len=1024 is below data.seq_len=2048: raised to 2048" in caplog.text
    assert load("+exp=tiny", "model.max_seq_len=4096", "data.seq_len=2048").model.max_seq_len == 4096
