"""Model weights out of a trainer DCP checkpoint dir (torch.distributed.checkpoint), on one process.

The checkpoint may hold other state (optimizer, loader, ...): only the model's tensors are read, found by
their names (ours, possibly under a prefix such as `model.`). The architecture comes from the config.
"""

import pickle
import warnings
from typing import Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moba_train.model.config import AttentionConfig, ModelConfig
from moba_train.errors import CheckpointError
from moba_train.model.hf import build_empty
from moba_train.model.llama import Llama

ANCHOR = "embed_tokens.weight"


def dcp_causes(err: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and DCP's per-rank failures (rank -> (exception, traceback))."""
    seen, todo, out = set(), [err], []
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        failures = getattr(e, "failures", None) or {}
        todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()] + [e.__cause__, e.__context__]
    return out


def interrupted(causes: list[BaseException]) -> bool:
    """Whether a DCP failure (its `dcp_causes`) holds an interrupt (Ctrl-C, SystemExit), which must stay one."""
    return any(not isinstance(e, (Exception, CheckpointException)) for e in causes)


def read_dcp(state: dict, path: str, no_dist: bool = True) -> None:
    """dcp.load into `state`. A damaged checkpoint (a shard torn or zero-filled at its full size) becomes one
    CheckpointError naming the first real cause: DCP wraps per-rank failures in a CheckpointException, which is a
    BaseException. An interrupt stays one."""
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    except (Exception, CheckpointException) as err:  # noqa: BLE001
        causes = dcp_causes(err)
        if interrupted(causes):
            raise
        cause = next((e for e in causes if not isinstance(e, CheckpointException)), err)
        # torch.load's unpickling text suggests an unsafe load: a shard it cannot read is damaged, say that
        text = ("a damaged file" if isinstance(cause, pickle.UnpicklingError)
                else next((line for line in str(cause).splitlines() if line.strip()), "")[:200])
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(cause).__name__}: {text})") from None


def model_prefix(names: list[str], path: str) -> str:
    """The prefix under which the model's parameters are stored ('' or e.g. 'model.')."""
    hits = sorted((n[: -len(ANCHOR)] for n in names if n.endswith(ANCHOR)), key=len)
    if not hits:
        raise CheckpointError(f"{path}/.metadata: no model weights ({ANCHOR}) in this DCP checkpoint")
    return hits[0]


def load_dcp_model(path: str, model_cfg: ModelConfig, attn_cfg: AttentionConfig,
                   device: Union[str, torch.device] = "cpu") -> Llama:
    try:
        meta = FileSystemReader(path).read_metadata()
    except Exception as e:  # a torn or foreign dir
        raise CheckpointError(f"{path}/.metadata: cannot read DCP metadata ({type(e).__name__}: {e})") from None
    stored = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    prefix = model_prefix(list(stored), path)
    model = build_empty(model_cfg, attn_cfg, torch.float32, "cpu")
    params = dict(model.named_parameters())
    missing = [n for n in params if prefix + n not in stored]
    if missing:
        raise CheckpointError(f"{path}: DCP checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]} "
                              f"(does model.* match the run that wrote it?)")
    ours = [n[len(prefix):] for n in stored if n.startswith(prefix)]
    extra = sorted(n for n in ours if n.startswith(("layers.", "norm.")) and n not in params)
    if extra:
        raise CheckpointError(f"{path}: DCP checkpoint has model tensors the config lacks, e.g. {extra[:3]} "
                              f"(model.n_layers={model_cfg.n_layers})")
    for n, p in params.items():
        shape = tuple(stored[prefix + n].size)
        if shape != tuple(p.shape):
            raise CheckpointError(f"{path}: tensor {prefix + n!r} has shape {list(shape)} but the config gives "
                                  f"{list(p.shape)}")
    state = {prefix + n: p.detach() for n, p in params.items()}
    read_dcp(state, path)
    model = model.to(device)
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.cfg.init_from = path
    return model
