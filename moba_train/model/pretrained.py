"""Starting weights for `model.init_from`: a HF Llama dir or a consolidated moba-train checkpoint dir.

Consolidated format (what `scripts/convert_hf.py` writes): a directory with
    config.json         {"format": "moba-train", "version": 1, "dtype": "float32", "model": <ModelConfig fields>}
    model.safetensors   our parameter names (HF names without `model.`), tied lm_head stored once
"""

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Collection, Iterator, Optional, Union

import torch

from moba_train.errors import CheckpointError, ConfigError
from moba_train.model import hf
from moba_train.model.config import SHAPE_FIELDS, UNSET, AttentionConfig, ModelConfig
from moba_train.model.llama import Llama

log = logging.getLogger(__name__)

FORMAT = "moba-train"
# Files a HF checkpoint dir carries besides weights that a consumer of the weights may want (tokenizer).
TOKENIZER_MARKS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # any one: a tokenizer dir
TOKENIZER_FILES = TOKENIZER_MARKS + ("special_tokens_map.json", "generation_config.json", "chat_template.jinja",
                                     "added_tokens.json")


def _not_a_dir(path: str) -> str:
    return "a file, not a checkpoint directory" if os.path.exists(path) else "no such checkpoint directory"


def checkpoint_kind(path: str) -> str:
    """'hf' or 'ours' for a checkpoint directory; anything else is an error naming the path."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: {_not_a_dir(path)}")
    config_path = os.path.join(path, hf.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: no such file (a checkpoint dir needs config.json and safetensors)")
    cfg = hf.read_json(config_path)
    return "ours" if cfg.get("format") == FORMAT else "hf"


def read_config(path: str, file: str = hf.CONFIG_FILE) -> ModelConfig:
    """The ModelConfig stored in a consolidated checkpoint dir (or in a run dir's model_config.json)."""
    config_path = os.path.join(path, file)
    return _model_config(hf.read_json(config_path), config_path)


def _model_config(data: dict[str, Any], config_path: str) -> ModelConfig:
    if data.get("format") != FORMAT or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{config_path}: not a moba-train checkpoint config (format={data.get('format')!r})")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data["model"]) - fields)
    if unknown:
        raise CheckpointError(f"{config_path}: unknown ModelConfig keys {unknown}")
    return ModelConfig(**data["model"])


def save_consolidated(model: Llama, out_dir: str, dtype: Union[str, torch.dtype, None] = None) -> str:
    """Write `model` as a consolidated moba-train checkpoint dir."""
    os.makedirs(out_dir, exist_ok=True)
    state = hf.state_for_export(model, hf.resolve_dtype(dtype, None) if dtype is not None else None)
    hf.write_safetensors(state, out_dir, max_shard_bytes=1 << 62, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": 1, "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
            "model": dataclasses.asdict(model.cfg)}
    with open(os.path.join(out_dir, hf.CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def load_consolidated(path: str, attn_cfg: Optional[AttentionConfig] = None,
                      dtype: Union[str, torch.dtype, None] = "float32", device: Union[str, torch.device] = "cpu",
                      **overrides: Any) -> Llama:
    config_path = os.path.join(path, hf.CONFIG_FILE)
    meta = hf.read_json(config_path)
    recorded = {"init_from": os.path.abspath(path), **overrides}  # absolute: lineage() is read from any cwd
    cfg = hf.apply_overrides(_model_config(meta, config_path), recorded, config_path)
    files = hf.weight_files(path)
    declared = hf.hf_dtype(meta)  # reads the top-level "dtype"
    model = hf.build_empty(cfg, attn_cfg, hf.resolve_dtype(dtype, declared), device)
    hf.load_weights(model, files)
    return model


def load_pretrained(path: str, attn_cfg: Optional[AttentionConfig] = None,
                    dtype: Union[str, torch.dtype, None] = "float32", device: Union[str, torch.device] = "cpu",
                    **overrides: Any) -> Llama:
    """Our Llama from a HF Llama dir or a consolidated moba-train dir (detected from config.json)."""
    if checkpoint_kind(path) == "hf":
        return hf.from_hf(path, attn_cfg, dtype=dtype, device=device, **overrides)
    return load_consolidated(path, attn_cfg, dtype=dtype, device=device, **overrides)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer / generation files that sit next to the weights; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


REQUIRED = "REQUIRED"  # configs/model/from_init.yaml: the recipe needs model.init_from
# what a run may set on top of a checkpoint: everything but the shape
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in SHAPE_FIELDS + ("init_from",))


def config_overrides(model_cfg: ModelConfig, explicit: Optional[Collection[str]] = None) -> dict[str, Any]:
    """The `model.*` values a run sets on top of an `init_from` checkpoint: the keys in `explicit` (those a Hydra
    config set; `configs/model/from_init.yaml` leaves every one unset), or without it those that differ from the
    schema defaults."""
    default = ModelConfig()
    return {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "init_from" and
            (f.name in explicit if explicit is not None else getattr(model_cfg, f.name) != getattr(default, f.name))}


def _check_shapes(ckpt_cfg: ModelConfig, overrides: dict[str, Any], where: str) -> dict[str, Any]:
    for key in SHAPE_FIELDS:
        if key in overrides and overrides[key] != getattr(ckpt_cfg, key):
            raise CheckpointError(f"{where}: the checkpoint has {key}={getattr(ckpt_cfg, key)} but the config sets "
                                  f"model.{key}={overrides[key]}; drop the override (use model=from_init)")
    return {k: v for k, v in overrides.items() if k not in SHAPE_FIELDS}


def is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


RUN_CONFIG = "config.yaml"  # in each trainer checkpoint: the run's config it was trained with (init_from dropped)
RUN_MODEL_CONFIG = "model_config.json"  # <train.out_dir>/model_config.json: the architecture of the run's checkpoints


def write_run_model_config(model_cfg: ModelConfig, out_dir: str) -> str:
    """Record the architecture a run trains (resolved from init_from) next to its checkpoints."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RUN_MODEL_CONFIG)
    with open(path + ".part", "w") as f:
        json.dump({"format": FORMAT, "version": 1, "model": dataclasses.asdict(model_cfg)}, f, indent=2)
    os.replace(path + ".part", path)
    return path


def find_run_model_config(dcp_path: str) -> Optional[str]:
    """The run dir holding model_config.json for a DCP checkpoint (<run>/checkpoints/step_N), if any."""
    here = os.path.abspath(dcp_path)
    for _ in range(3):
        if os.path.isfile(os.path.join(here, RUN_MODEL_CONFIG)):
            return here
        here = os.path.dirname(here)
    return None


def recorded_model_config(dcp_path: str) -> Optional[tuple[str, ModelConfig]]:
    """(file, model) a trainer checkpoint was recorded with: its own config.yaml, or for checkpoints written before
    they carried one the run's model_config.json; None where neither exists. The checkpoint's own wins: every later
    launch in the run dir rewrites model_config.json, and non-shape settings such as rope_theta may have changed."""
    own = os.path.join(dcp_path, RUN_CONFIG)
    if os.path.isfile(own):
        return own, model_config_from_run(own)
    run_dir = find_run_model_config(dcp_path)
    if run_dir is None:
        return None
    return os.path.join(run_dir, RUN_MODEL_CONFIG), read_config(run_dir, RUN_MODEL_CONFIG)


def read_run_config(config_path: str) -> dict:
    """A run's saved config (yaml or json) as plain containers."""
    import yaml
    from omegaconf import OmegaConf

    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: no such config file (--config)")
    try:
        run = OmegaConf.to_container(OmegaConf.load(config_path))
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # yaml explains on several lines, with the position
        raise CheckpointError(f"{config_path}: not valid YAML or JSON ({' '.join(str(e).split())})") from None
    if not isinstance(run, dict):
        raise CheckpointError(f"{config_path}: expected a mapping with a model: section, got a {type(run).__name__}")
    return run


def model_config_from_run(config_path: str) -> ModelConfig:
    """The model section of a run's saved config (a checkpoint's config.yaml or a Hydra config.yaml)."""
    model = read_run_config(config_path).get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{config_path}: no 'model:' section")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise CheckpointError(f"{config_path}: unknown model keys {unknown}")
    # keys a from_init run left to its checkpoint: the schema defaults here (a checkpoint's own config.yaml, or
    # the run's model_config.json, has them all)
    return ModelConfig(**{key: value for key, value in model.items() if value != UNSET})


def recorded_origin(path: str) -> Optional[str]:
    """The checkpoint `path` was made from, as recorded: `model.init_from` of a consolidated dir's config.json,
    or of the model_config.json of the run that holds a DCP checkpoint (or of a run dir). None for a HF dir."""
    config_path = os.path.join(path, hf.CONFIG_FILE)
    if os.path.isfile(config_path):
        data = hf.read_json(config_path)
        return data["model"].get("init_from") if data.get("format") == FORMAT else None
    run_dir = find_run_model_config(path)
    return read_config(run_dir, RUN_MODEL_CONFIG).init_from if run_dir else None


def lineage(path: str) -> Iterator[str]:
    """`path`, then the checkpoints it descends from by recorded `init_from` links, nearest first (a trainer
    checkpoint -> the checkpoint its run started from -> ... -> the HF dir at the root)."""
    seen = set()
    while path and os.path.abspath(path) not in seen:
        seen.add(os.path.abspath(path))
        if os.path.isdir(path):
            yield path
        elif find_run_model_config(path) is None:  # gone, and no run above it records where it came from
            return
        path = recorded_origin(path)  # a pruned <run>/checkpoints/step_N: its run's record goes on


def tokenizer_dir(path: str, marks: tuple[str, ...] = TOKENIZER_MARKS) -> Optional[str]:
    """The nearest checkpoint in `path`'s lineage that holds a tokenizer (trainer checkpoints hold none); with
    marks=TOKENIZER_FILES, any of the files that go with one (e.g. only generation_config.json)."""
    return next((d for d in lineage(path) if any(os.path.isfile(os.path.join(d, name)) for name in marks)), None)


def special_token_ids(path: str) -> dict[str, int]:
    """bos/eos/pad token ids of the HF config at the root of `path`'s lineage (our configs do not carry them)."""
    for p in lineage(path):
        config_path = os.path.join(p, hf.CONFIG_FILE)
        if not os.path.isfile(config_path):
            continue
        data = hf.read_json(config_path)
        if data.get("format") != FORMAT:  # a HF config (checkpoint_kind's test, on the one read)
            return {k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None}
    return {}


def checkpoint_step(path: str) -> int:
    """The step of a trainer checkpoint from its dir name (step_00001000 -> 1000); -1 when it has no number."""
    digits = "".join(c if c.isdigit() else " " for c in os.path.basename(os.path.normpath(path))).split()
    return int(digits[-1]) if digits else -1


def find_checkpoint(path: str, option: str = "model.init_from") -> str:
    """A checkpoint dir itself, or the newest DCP checkpoint inside a run dir (largest step number); errors name
    `option`, the setting the path came from."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: {_not_a_dir(path)} ({option})")
    if is_dcp_dir(path) or os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
        return path
    found = []
    for root, dirs, _ in os.walk(path):
        depth = root[len(path):].count(os.sep)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .tmp-* saves in progress, .hydra
        if is_dcp_dir(root) and os.path.isfile(os.path.join(root, "manifest.json")):  # published only
            found.append((checkpoint_step(root), root))
            dirs[:] = []
        elif depth >= 2:
            dirs[:] = []
    if not found:
        raise CheckpointError(f"{path}: no checkpoint in this directory (expected config.json + safetensors, "
                              "a DCP checkpoint, or a run dir holding DCP checkpoints)")
    return max(found)[1]


def resolve_model_config(model_cfg: ModelConfig, explicit: Optional[Collection[str]] = None) -> ModelConfig:
    """The architecture a run trains: `model.*` itself, or with `model.init_from` the checkpoint's config with
    the run's overrides (`config_overrides`) on top. A DCP checkpoint's architecture is the model of its own
    config.yaml, or for older checkpoints the `model_config.json` of the run that wrote it (or `model.*` itself
    for runs that recorded neither)."""
    if not model_cfg.init_from:
        return model_cfg
    if model_cfg.init_from == REQUIRED:
        raise ConfigError("model.init_from is required (model=from_init takes the architecture from a checkpoint): "
                          "give model.init_from=<HF Llama dir, moba-train checkpoint dir or run dir>")
    path = find_checkpoint(model_cfg.init_from)
    if is_dcp_dir(path):
        recorded = recorded_model_config(path)
        if recorded is None:  # written before runs recorded their architecture: model.* must describe it
            return dataclasses.replace(model_cfg, init_from=os.path.abspath(path))
        config_path, ckpt_cfg = recorded
    elif checkpoint_kind(path) == "hf":
        config_path = os.path.join(path, hf.CONFIG_FILE)
        ckpt_cfg = hf.config_from_hf(hf.read_json(config_path), where=config_path)
    else:
        config_path, ckpt_cfg = os.path.join(path, hf.CONFIG_FILE), read_config(path)
    overrides = _check_shapes(ckpt_cfg, config_overrides(model_cfg, explicit), config_path)
    return dataclasses.replace(ckpt_cfg, **overrides, init_from=os.path.abspath(path))


def init_model(model_cfg: ModelConfig, attn_cfg: AttentionConfig, device: Union[str, torch.device],
               resolved: bool = False) -> Llama:
    """The model a run starts from: random (no `init_from`), or loaded from `model.init_from` (HF dir,
    consolidated moba-train dir, trainer DCP checkpoint or run dir). `resolved`: `model_cfg` comes from `to_config`
    (or `resolve_model_config`), so its non-shape values are the run's, even those equal to the schema defaults;
    otherwise the values that differ from the defaults override the checkpoint's."""
    if not model_cfg.init_from:
        with torch.device(device):
            return Llama(model_cfg, attn_cfg)
    cfg = resolve_model_config(model_cfg, RUN_FIELDS if resolved else None)
    if is_dcp_dir(cfg.init_from):
        from moba_train.model.dcp_import import load_dcp_model

        model, kind = load_dcp_model(cfg.init_from, cfg, attn_cfg, device), "DCP checkpoint"
    else:
        keep = {name: getattr(cfg, name) for name in RUN_FIELDS}
        model = load_pretrained(cfg.init_from, attn_cfg, dtype="float32", device=device, **keep)
        kind = "HF Llama" if checkpoint_kind(cfg.init_from) == "hf" else "moba-train checkpoint"
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("initialized from %s %s (%.1fM parameters, rope_theta=%g, rope_scaling=%s)", kind, cfg.init_from,
                 sum(p.numel() for p in model.parameters()) / 1e6, cfg.rope_theta, cfg.rope_scaling)
    return model
