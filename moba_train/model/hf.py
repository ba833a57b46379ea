"""The one adapter between Hugging Face Llama checkpoints and our model: config keys and parameter names.

    cfg = config_from_hf(json.load(open("llama/config.json")))
    model = from_hf("llama/", attn_cfg, rope_theta=8e6, max_seq_len=131072)   # overrides: ModelConfig fields
    to_hf(model, "out/")            # config.json + model.safetensors that AutoModelForCausalLM loads

Our parameter names are HF's without the leading `model.` (`lm_head.weight` is the same). Files are read
tensor by tensor with safetensors, so a large checkpoint is never held twice in memory.
"""

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moba_train.errors import CheckpointError, UserError
from moba_train.model.config import SHAPE_FIELDS, AttentionConfig, ModelConfig
from moba_train.model.llama import Llama
from moba_train.model.rope import ROPE_SCALING_KEYS, inv_frequencies

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "model."
# Tensors some HF checkpoints carry that are derived, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_STORED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' dtype names


# ----------------------------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from either the transformers 4 keys or the transformers 5 `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling:
        return float(theta), None
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"{where}: rope_type {kind!r} is not supported (supported: {tuple(ROPE_SCALING_KEYS)})")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise CheckpointError(f"{where}: rope scaling {kind!r} lacks {missing}")
    return float(theta), {"rope_type": kind, **{k: scaling[k] for k in ROPE_SCALING_KEYS[kind]}}


def config_from_hf(hf: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig from a HF Llama config.json dict; anything we cannot represent is an error."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise CheckpointError(f"{where}: model_type={model_type!r} architectures={archs}; only Llama "
                              "(model_type 'llama', LlamaForCausalLM) is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported (our Llama has no biases)")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: missing keys {missing}")
    theta, scaling = _rope_from_hf(hf, where)
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or None,
        ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", ModelConfig.max_seq_len),
        init_std=hf.get("initializer_range", ModelConfig.init_std))


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A HF LlamaConfig dict (readable by transformers 4.x and 5.x) for our ModelConfig."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
        "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True,
    }


def hf_dtype(hf: dict[str, Any], files: list[str] = ()) -> torch.dtype:
    """The dtype of a HF checkpoint's weights: what config.json declares, else what the first tensor of `files`
    is stored in, else float32."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name:
        return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)
    try:
        with safe_open(files[0], framework="pt") as f:
            return _STORED.get(f.get_slice(next(iter(f.keys()))).get_dtype(), torch.float32)
    except Exception:  # no files, no tensors, or unreadable: load_weights names the problem
        return torch.float32


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON {type(data).__name__}, not an object of config keys")
    return data


# ----------------------------------------------------------------------------------------------- names


def hf_name(name: str) -> str:
    """Our parameter name -> HF name."""
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def our_name(name: str) -> str:
    """HF parameter name -> ours."""
    return name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name


# ----------------------------------------------------------------------------------------------- weights


def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint dir: model.safetensors, or the shards its index lists."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: empty weight_map")
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


def iter_tensors(files: list[str]) -> Iterator[tuple[str, str, Tensor]]:
    """(file, name, tensor) for every tensor of the files, one at a time."""
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield file, name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def load_weights(model: nn.Module, files: list[str], rename=lambda n: n) -> None:
    """Copy the tensors of `files` into `model`'s parameters; missing, unknown and mis-shaped tensors are errors."""
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(params)
    seen: set[str] = set()
    with torch.no_grad():
        for file, name, tensor in iter_tensors(files):
            ours = rename(name)
            if ours.endswith(_IGNORED_SUFFIXES) or ours in tied:
                continue
            if ours not in params:
                raise CheckpointError(f"{file}: tensor {name!r} has no counterpart in the model "
                                      f"(config has {model.cfg.n_layers} layers)")
            p = params[ours]
            if tuple(tensor.shape) != tuple(p.shape):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(tensor.shape)} but the config "
                                      f"gives {list(p.shape)}")
            p.copy_(tensor)
            seen.add(ours)
    missing = sorted(set(params) - seen)
    if missing:
        where = files[0] if len(files) == 1 else os.path.dirname(files[0])
        raise CheckpointError(f"{where}: missing {len(missing)} tensors, e.g. {missing[:3]}")


def reset_rope(model: Llama) -> None:
    """Recompute the (non-persistent, fp32) RoPE frequencies after building on meta or casting."""
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    model.inv_freq = inv_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling).to(device)


def build_empty(cfg: ModelConfig, attn_cfg: Optional[AttentionConfig], dtype: torch.dtype,
                device: Union[str, torch.device]) -> Llama:
    """A Llama with uninitialised weights (no random init cost), ready to be filled from a checkpoint."""
    with torch.device("meta"):
        model = Llama(cfg, attn_cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # casting and to_empty untie parameters: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    reset_rope(model)
    return model


def resolve_dtype(dtype: Union[str, torch.dtype, None], declared: torch.dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return declared
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"dtype={dtype!r} is not one of {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[dtype]


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any], where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UserError(f"{where}: unknown ModelConfig overrides {bad} (known: {sorted(known)})")
    changed = sorted(k for k in set(SHAPE_FIELDS) & set(overrides) if overrides[k] != getattr(cfg, k))
    if changed:
        raise UserError(f"{where}: overrides {changed} change the architecture of the checkpoint; only "
                        "non-shape fields (rope_theta, rope_scaling, max_seq_len, norm_eps, ...) can be overridden")
    return dataclasses.replace(cfg, **overrides)


def from_hf(path: str, attn_cfg: Optional[AttentionConfig] = None, dtype: Union[str, torch.dtype, None] = "float32",
            device: Union[str, torch.device] = "cpu", **overrides: Any) -> Llama:
    """Our Llama from a local HF Llama directory (config.json + model.safetensors or a sharded index).

    dtype: parameter dtype ("float32" default, "auto" = what config.json declares, or a torch dtype).
    overrides: ModelConfig fields that do not change shapes, e.g. rope_theta=8e6 or
    rope_scaling={"rope_type": "linear", "factor": 4.0} for continued training at a longer context.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (expected a HF Llama checkpoint dir)")
    config_path = os.path.join(path, CONFIG_FILE)
    hf = read_json(config_path)
    cfg = config_from_hf(hf, where=config_path)
    cfg = apply_overrides(cfg, {"init_from": os.path.abspath(path), **overrides}, config_path)
    files = weight_files(path)
    model = build_empty(cfg, attn_cfg, resolve_dtype(dtype, hf_dtype(hf, files)), device)
    load_weights(model, files, rename=our_name)
    return model


def _full(t: Tensor) -> Tensor:
    """A plain local tensor (gathers a DTensor, e.g. an FSDP2 parameter)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def write_safetensors(tensors: dict[str, Tensor], out_dir: str, max_shard_bytes: int,
                  metadata: dict[str, str]) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than max_shard_bytes."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in os.listdir(out_dir):  # an earlier export's weights, whichever way it was sharded
        if stale in (WEIGHTS_FILE, INDEX_FILE) or SHARD_NAME.fullmatch(stale):
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, WEIGHTS_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def state_for_export(model: Llama, dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    """Our parameters (tied ones once), as contiguous CPU tensors in `dtype` (default: as they are)."""
    out = {}
    for name, p in model.named_parameters():  # remove_duplicate: a tied lm_head is not listed
        t = _full(p).to("cpu")
        out[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def to_hf(model: Llama, out_dir: str, dtype: Union[str, torch.dtype, None] = None,
          max_shard_bytes: int = 5 * 1024 ** 3, extra: Optional[dict[str, Any]] = None) -> str:
    """Write config.json + safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads; `extra`
    adds config.json keys (token ids, moba_* settings)."""
    os.makedirs(out_dir, exist_ok=True)
    state = state_for_export(model, resolve_dtype(dtype, None) if dtype is not None else None)
    out_dtype = next(iter(state.values())).dtype
    tensors = {hf_name(n): t for n, t in state.items()}
    write_safetensors(tensors, out_dir, max_shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({**config_to_hf(model.cfg, out_dtype), **(extra or {})}, f, indent=2)
    return out_dir
