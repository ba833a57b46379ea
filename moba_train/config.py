"""The one structured config tree: dataclasses per component, registered in Hydra's ConfigStore.

YAML files under configs/ hold values; this file holds the schema (unknown keys are errors) and `validate`,
which turns a bad value into one ConfigError line naming the key and the allowed values.
"""

import dataclasses
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from moba_train.data.config import DataConfig
from moba_train.data.tokenizer import BYTE_VOCAB
from moba_train.errors import CheckpointError, ConfigError
from moba_train.model.config import ATTENTION_KINDS, UNSET, AttentionConfig, ModelConfig
from moba_train.model.rope import ROPE_SCALING_KEYS
from moba_train.ops import BACKENDS
from moba_train.parallel.config import CP_MODES, ParallelConfig
from moba_train.train.config import AC_MODES, CheckpointConfig, LoggerConfig, TrainConfig
from moba_train.train.schedule_attn import validate_schedule
from moba_train.train.seq_stages import SeqLenSchedule

DATA_KINDS = ("synthetic", "megatron", "sft")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base", node=Config)
    if not OmegaConf.has_resolver("from_checkpoint"):  # resolved outside to_config: the schema default
        OmegaConf.register_new_resolver("from_checkpoint", lambda _node_: getattr(ModelConfig(), _node_._key()))


def refuse_bad_out_dir(argv: list[str]) -> None:
    """Hydra creates `train.out_dir` (hydra.run.dir) before the run starts: a command-line value that is a file, or
    lies under one, would end in a traceback there. One `error:` line instead (exit 2)."""
    for arg in argv:
        if arg.lstrip("+").startswith("train.out_dir="):
            path = os.path.abspath(arg.split("=", 1)[1])
            while not os.path.exists(path):
                path = os.path.dirname(path)
            if not os.path.isdir(path):
                print(f"error: {arg}: {path} is a file, not a directory", file=sys.stderr)
                sys.exit(2)


def to_config(cfg: DictConfig | Config) -> Config:
    """Hydra's DictConfig -> typed Config dataclasses (validated).

    `model.*` keys left UNSET (configs/model/from_init.yaml) take the checkpoint's values; every key the config
    sets overrides them, even where it equals the schema default. A Config dataclass has no unset keys: there
    the values that differ from the defaults override (`pretrained.config_overrides`)."""
    explicit = None
    if isinstance(cfg, Config):
        config = cfg
    else:
        cfg = cfg.copy()
        raw = OmegaConf.to_container(cfg.model, resolve=False)
        unset, default = [key for key, value in raw.items() if value == UNSET], ModelConfig()
        for key in unset:
            cfg.model[key] = getattr(default, key)
        # model=from_init leaves keys UNSET: the others are the run's; without it (no key UNSET) the schema
        # defaults fill what no config set, so the values that differ from them override the checkpoint's
        explicit = [key for key in raw if key not in unset] if unset else None
        config = OmegaConf.to_object(cfg)
    if config.model.init_from:  # the architecture of the checkpoint, with the run's model.* overrides
        from moba_train.model.pretrained import REQUIRED, find_checkpoint, resolve_model_config

        source = config.model.init_from
        own = None if source == REQUIRED else resumed_checkpoint(config)
        if own is None:
            config.model = resolve_model_config(config.model, explicit)
        else:  # a resume: the model its own checkpoint was trained with (a source that has moved on since, or is
            # gone, would change it), the run's model.* overrides on top; the source's weights are never loaded
            resolved = resolve_model_config(dataclasses.replace(config.model, init_from=own), explicit)
            if os.path.exists(source):
                origin = os.path.abspath(find_checkpoint(source))
            else:
                logging.getLogger(__name__).warning("model.init_from=%s: no such path; %s resumes from its own "
                                                    "checkpoint %s", source, config.train.out_dir, own)
                origin = os.path.abspath(source)
            config.model = dataclasses.replace(resolved, init_from=origin)
    declared, trained = config.model.max_seq_len, config.data.seq_len
    if isinstance(declared, int) and isinstance(trained, int) and 0 < declared < trained:
        # the context the model declares (an HF export's max_position_embeddings, which generation enforces)
        # covers what it trains: an export of a 2048-token run declared 1024
        logging.getLogger(__name__).warning("model.max_seq_len=%d is below data.seq_len=%d: raised to %d, the "
                                            "context this run trains", declared, trained, trained)
        config.model = dataclasses.replace(config.model, max_seq_len=trained)
    validate(config)
    return config


def resumed_checkpoint(config: Config) -> str | None:
    """The checkpoint `checkpoint.resume` would load for this run, if any."""
    from moba_train.train.checkpoint import resolve_resume

    try:
        return resolve_resume(config.checkpoint.resume, config.train.out_dir)
    except CheckpointError:
        return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value, allowed) -> None:
    _require(value in allowed, f"{key}={value!r} is not one of {tuple(allowed)}")


def validate(cfg: Config) -> None:
    m, a, d, t, p = cfg.model, cfg.attention, cfg.data, cfg.train, cfg.parallel
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        _require(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be >= 1")
    _require(m.head_dim is not None or m.dim % m.n_heads == 0,
             f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    _require(m.head_size % 2 == 0, f"head dim {m.head_size} must be even for RoPE (model.head_dim)")
    for key, rule in (("rope_theta", "> 0"), ("norm_eps", "> 0"), ("max_seq_len", "> 0"), ("init_std", ">= 0")):
        value = getattr(m, key)  # None where a checkpoint's config.json holds null
        ok = isinstance(value, (int, float)) and (value > 0 if rule == "> 0" else value >= 0)
        _require(ok, f"model.{key}={value} must be {rule}")
    if m.rope_scaling:
        _require(isinstance(m.rope_scaling, dict), f"model.rope_scaling={m.rope_scaling!r} must be a mapping "
                 "such as {rope_type: linear, factor: 4.0}")
        kind = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
        _one_of("model.rope_scaling.rope_type", kind, ROPE_SCALING_KEYS)
        missing = [key for key in ROPE_SCALING_KEYS[kind] if key not in m.rope_scaling]
        _require(not missing, f"model.rope_scaling of rope_type {kind} needs {missing}")

    _one_of("attention.kind", a.kind, ATTENTION_KINDS)
    _one_of("attention.backend", a.backend, ("auto",) + BACKENDS)
    _require(a.top_k >= 1, f"attention.top_k={a.top_k} must be >= 1")
    _require(a.softmax_scale is None or a.softmax_scale > 0,
             f"attention.softmax_scale={a.softmax_scale} must be > 0 (or null: head_dim ** -0.5)")
    _require(a.block_size >= 16 and a.block_size % 16 == 0,
             f"attention.block_size={a.block_size} must be a positive multiple of 16")
    _require(0 <= a.full_attn_last_k <= m.n_layers,
             f"attention.full_attn_last_k={a.full_attn_last_k} must be in [0, model.n_layers={m.n_layers}]")
    if a.layers is not None:
        _require(len(a.layers) == m.n_layers,
                 f"attention.layers has {len(a.layers)} entries; model.n_layers={m.n_layers}")
        for i, kind in enumerate(a.layers):
            _one_of(f"attention.layers[{i}]", kind, ATTENTION_KINDS)
    validate_schedule(a, m.n_layers)  # before any work (the trainer builds the schedule after loading weights)

    _one_of("data.name", d.name, DATA_KINDS)
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
    _require(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    if d.name == "synthetic":
        _require(m.vocab_size >= BYTE_VOCAB, f"model.vocab_size={m.vocab_size} is smaller than the synthetic "
                 f"task's byte vocabulary ({BYTE_VOCAB} tokens)")
        for key in ("num_needles", "needle_values"):
            _require(getattr(d, key) >= 1, f"data.{key}={getattr(d, key)} must be >= 1")
        _require(d.num_needles <= 31 and d.num_needles * d.needle_values <= 128,
                 f"data.num_needles={d.num_needles} x data.needle_values={d.needle_values} must fit the byte "
                 f"vocabulary (<= 31 groups, <= 128 symbols)")
        _require(d.needle_run >= 1, f"data.needle_run={d.needle_run} must be >= 1")
        shortest = 2 * (d.needle_run + 3)  # a document with one needle and its question
        _require(d.min_doc_len == 0 or d.min_doc_len >= shortest,
                 f"data.min_doc_len={d.min_doc_len} must be 0 or >= {shortest} (2 x (data.needle_run + 3))")
        _require(d.seq_len >= shortest, f"data.seq_len={d.seq_len} must be >= {shortest} for data.needle_run="
                                        f"{d.needle_run}")
    elif d.name in ("megatron", "sft"):
        _require(bool(d.path), f"data.path is required for data.name={d.name} (give data.path=...)")
    if d.name == "sft":
        _require(d.sft.num_synthetic >= 1, f"data.sft.num_synthetic={d.sft.num_synthetic} must be >= 1")

    if d.name == "megatron":
        _require(re.fullmatch(r"\s*[0-9.]+\s*(,\s*[0-9.]+\s*){0,2}", d.megatron.split) is not None,
                 f"data.megatron.split={d.megatron.split!r} must be 1 to 3 comma-separated weights (train,valid,test), "
                 "e.g. '99,1,0'")
    w = cfg.logger.wandb
    if w.enabled:
        _one_of("logger.wandb.mode", w.mode, WANDB_MODES)
    c = cfg.checkpoint
    _require(c.interval >= 0, f"checkpoint.interval={c.interval} must be >= 0 (0: save only at the end)")
    _require(c.keep >= 0, f"checkpoint.keep={c.keep} must be >= 0 (0: keep all)")

    _one_of("train.device", t.device, DEVICES)
    _one_of("train.activation_checkpointing", t.activation_checkpointing, AC_MODES)
    _require(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    _require(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} must be a finite number > 0")
    _require(not math.isnan(t.grad_clip), f"train.grad_clip={t.grad_clip} must be a number (<= 0: no clipping)")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(t, key) < 1, f"train.{key}={getattr(t, key)} must be in [0, 1)")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    SeqLenSchedule(d.seq_len_schedule, d.seq_len, t.steps)  # raises ConfigError on a bad stage

    _one_of("parallel.cp_mode", p.cp_mode, CP_MODES)
    for key in ("cp", "dp_replicate"):
        _require(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be >= 1")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard={p.dp_shard} must be -1 or >= 1")
    if p.cp > 1:  # context-parallel layout (see moba_train/parallel/cp.py)
        chunks = 2 * p.cp if p.cp_mode == "allgather" else p.cp
        _require(d.seq_len % chunks == 0,
                 f"data.seq_len={d.seq_len} must be divisible by {chunks} for parallel.cp={p.cp} with "
                 f"parallel.cp_mode={p.cp_mode}" + (" (zigzag: 2 x cp chunks)" if p.cp_mode == "allgather" else ""))
        if p.cp_mode == "ulysses":
            _require(m.n_kv_heads % p.cp == 0,
                     f"model.n_kv_heads={m.n_kv_heads} must be divisible by parallel.cp={p.cp} for "
                     f"parallel.cp_mode=ulysses (heads are split over the cp ranks)")
