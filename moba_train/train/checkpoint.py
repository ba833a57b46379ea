"""Distributed checkpoints (torch.distributed.checkpoint) with atomic publish, retention and exact resume.

Layout under `<train.out_dir>/checkpoints/`:

    step_00000100/            a complete checkpoint (only complete ones carry this name)
      .metadata, __*_*.distcp   model + optimizer (DCP; sharded under FSDP2, resharded on load)
      train_state.pt          step, LR schedule, data position (consumed samples), run facts
      config.yaml             the run's resolved config as trained (init_from dropped): what exports and evals
                              read, since <out_dir>/.hydra/config.yaml is rewritten by every later launch there
      rng_<rank>.pt           torch CPU/CUDA, numpy and python RNG states of each rank
      manifest.json           every file of the checkpoint with its size; written last
    .tmp-step_00000100/       a save in progress (or one that died): never read, removed on the next start
    .abandoned-<UTC time>/    what a run does not continue: at a resume, the checkpoints newer than the one it
                              resumed (a rollback) and the metrics.jsonl lines past its step (a crash after the
                              last save); at a fresh start (resume=none) an earlier run's checkpoints,
                              metrics.jsonl and model_config.json

A save writes everything under the temporary name, then rank 0 renames it (atomic on one filesystem).
An async save is published at the first step boundary at which every rank has finished writing it.
Older checkpoints beyond `checkpoint.keep` are deleted only after the new one is published. The data
position is a global sample count, so a run may resume at another dp size with the same global batch.

Fault injection for tests: MOBA_TRAIN_CKPT_FAULT=<stage> makes the process die (os._exit(17), like a kill)
at that stage of a save (`<stage>@<step>`: only the save of that step): `metadata` (shard files written,
DCP's .metadata not), `shards` (DCP complete, train/rng state not written), `manifest` (all files written,
before the rename).
"""

import dataclasses
import itertools
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moba_train.errors import CheckpointError
from moba_train.model.dcp_import import dcp_causes, interrupted, read_dcp
from moba_train.model.pretrained import RUN_CONFIG, RUN_MODEL_CONFIG
from moba_train.train.metrics import METRICS_FILE

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load (no process group) that it assumes a single process: intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

CHECKPOINT_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
FULL_DISK_BYTES = 64 * 2**20  # free space below which a failed save is put down to a full disk
RESUME_EFFECTS = {  # what a run fact that differs from the checkpoint's means for the resumed run
    "attention": "the layers go on with other attention",
    "steps": "the learning-rate schedule and the stage boundaries (fractions of train.steps) are recomputed; the "
             "data stream goes on where it was",
    "global_batch": "each step now takes another number of samples; the data stream goes on where it was",
    "data_index": "megatron data comes from another sample index than the saved run's (checkpoints written before "
                  "the index covered one pass): the resumed stream differs, samples may repeat or be skipped"}
RECORDED_SINCE = {"data_index"}  # facts whose absence from a checkpoint is itself a difference
ABANDONED_PREFIX = ".abandoned-"
FAULT_ENV = "MOBA_TRAIN_CKPT_FAULT"


def _split_metrics(path: str, step: int) -> tuple[list[str], list[str]]:
    """The lines of a metrics.jsonl up to `step` and those past it (a line cut short by a crash counts as past)."""
    if not os.path.isfile(path):
        return [], []
    kept, late = [], []
    with open(path) as f:
        for line in f:
            try:
                done = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                done = False
            (kept if done and line.endswith("\n") else late).append(line)
    return kept, late


def _fault(stage: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) in (stage, f"{stage}@{step}"):
        log.error("fault injected at checkpoint stage %r", stage)
        os._exit(17)


class _Writer(dcp.FileSystemWriter):
    """The DCP filesystem writer, with the `metadata` fault stage: every rank's shards written, no .metadata."""

    def __init__(self, path: str, step: int):
        super().__init__(path)
        self.step = step

    def finish(self, metadata, results) -> None:
        _fault("metadata", self.step)
        super().finish(metadata, results)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Published checkpoints under `root`, oldest first: [(step, path)]."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_resume(resume: str, out_dir: str) -> Optional[str]:
    """checkpoint.resume -> the checkpoint directory to load, or None for a fresh start."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = list_checkpoints(os.path.join(out_dir, CHECKPOINT_DIR))
        return found[-1][1] if found else None
    path = resume
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint (checkpoint.resume is auto, none, or a checkpoint or run "
                              "directory)")
    if os.path.isfile(os.path.join(path, "manifest.json")) or STEP_DIR.match(os.path.basename(path.rstrip("/"))):
        return path
    for root in (os.path.join(path, CHECKPOINT_DIR), path):  # a run directory or its checkpoints/ folder
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    raise CheckpointError(f"{path}: not a checkpoint (no manifest.json) and holds no step_* checkpoints")


def _save_failure(err: BaseException, causes: list[BaseException], root: str) -> str:
    """The cause of a failed save in a few words: the first OS error among its `dcp_causes`; else a full disk
    (torch.save reports one as a zip-writer position mismatch); else the error's last line."""
    for e in causes:
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    free = shutil.disk_usage(root).free
    if free < FULL_DISK_BYTES:
        return f"the disk holding {root} is full ({free // 2**20} MiB free)"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def init_source(init_from: Optional[str]) -> Optional[str]:
    """model.init_from as a run fact: the path made absolute (also one gone since the run started), or None."""
    return os.path.abspath(init_from) if init_from else None


def source_run(source: Optional[str]) -> Optional[str]:
    """The run a recorded init_from belongs to: the run dir of a trainer checkpoint (<run>/checkpoints/step_N),
    any other source as it is. A run dir given as init_from resolves to its newest checkpoint, which moves on while
    that run trains: the same source for a resume."""
    if not source:
        return source
    path = os.path.normpath(source)
    parent = os.path.dirname(path)
    if STEP_DIR.match(os.path.basename(path)) and os.path.basename(parent) == CHECKPOINT_DIR:
        return os.path.dirname(parent)
    return path


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a damaged file (torch's text suggests an unsafe load: not repeated)
        raise CheckpointError(f"{path}: unreadable checkpoint file, damaged or not written by moba-train "
                              f"({type(e).__name__})") from None


def verify(path: str) -> dict:
    """Check a checkpoint directory against its manifest (presence and size of every file)."""
    manifest_file = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_file):
        raise CheckpointError(f"{manifest_file}: missing; {path} is not a complete checkpoint")
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_file}: corrupt manifest ({e})") from None
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing checkpoint file")
        if os.path.getsize(file) != size:
            raise CheckpointError(f"{file}: corrupt checkpoint file ({os.path.getsize(file)} bytes, expected {size})")
    return manifest


class ShapeMismatch(CheckpointError):
    """A checkpoint of another architecture than the configured model (every checkpoint of its run is)."""


def check_model_shapes(path: str, model_state: dict, optim_state: Optional[dict] = None) -> None:
    """One clear error when the checkpoint's model parameters differ from the model being trained, or the
    optimizer's (tied embeddings train one tensor under both names, so the model's names and shapes match)."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{os.path.join(path, '.metadata')}: unreadable ({type(e).__name__}: {e})") from None
    saved = {k[len("model."):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    current = {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    problems = [f"{k}: {list(saved[k])} in checkpoint, {list(current[k])} in model"
                for k in sorted(saved.keys() & current.keys()) if saved[k] != current[k]]
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    if missing:
        problems.append(f"not in checkpoint: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"not in model: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    saved_opt = {k[len("optim.state."):].rsplit(".", 1)[0] for k in metadata.state_dict_metadata
                 if k.startswith("optim.state.")}
    current_opt = set((optim_state or {}).get("state", {}))
    if not problems and saved_opt and current_opt and saved_opt != current_opt:
        differ = sorted(saved_opt ^ current_opt)
        problems.append(f"trained tensors differ ({', '.join(differ[:4])}; model.tie_embeddings changed?)")
    if problems:
        raise ShapeMismatch(f"{path}: checkpoint model shape differs from the configured model "
                              f"({len(problems)} problems; {problems[0]}{'; ' + problems[1] if len(problems) > 1 else ''}); "
                              "resume with the model config it was saved with, or checkpoint.resume=none")


class Checkpointer:
    """Saves and restores a Trainer (model, optimizer, scheduler, loader, step) plus RNG states."""

    def __init__(self, cfg, out_dir: str, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self.root = os.path.join(out_dir, CHECKPOINT_DIR)
        self.last_saved: Optional[int] = None
        self._pending = None  # (future, tmp, final, step) of an async save
        # DCP runs an async save's collectives in a background thread: on a gloo group of their own, so they never
        # interleave with the training step's (a deadlock), and have the CPU backend NCCL lacks. The main thread
        # agrees on their completion over another group, which the background thread never uses.
        self._save_group = self._poll_group = None
        if cfg.async_save and dist.is_initialized():
            self._save_group = dist.new_group(backend="gloo")
            self._poll_group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ save

    def due(self, step: int, final: bool = False) -> bool:
        if self.last_saved == step:
            return False
        return final or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def save(self, trainer, run_info: Optional[dict] = None) -> str:
        """Write a checkpoint of `trainer` at trainer.step and publish it; returns the published path."""
        self.wait()
        step = trainer.step
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, TMP_PREFIX + step_dir_name(step))
        if self.is_main:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with self._failing_save(tmp, step):
            if self.cfg.async_save:
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self._save_group,
                                        no_dist=not dist.is_initialized())
                self._write_small_files(trainer, tmp, run_info)
                self._pending = (future, tmp, final, step)
                self.last_saved = step
                return final
            dcp.save(state, storage_writer=_Writer(tmp, step), no_dist=not dist.is_initialized())
            _fault("shards", step)
            self._write_small_files(trainer, tmp, run_info)
        self._publish(tmp, final, step)
        return final

    @contextmanager
    def _failing_save(self, tmp: str, step: int):
        """A save that fails (a full disk, say) ends the run with one line naming the cause, not DCP's wrapped
        per-rank tracebacks, and leaves no partial directory behind (the published checkpoints stay)."""
        try:
            yield
        except (Exception, CheckpointException) as err:  # noqa: BLE001 (DCP's is a BaseException; torch.save and
            # DCP raise several types for the same I/O failure)
            causes = dcp_causes(err)
            if interrupted(causes):
                raise  # an interrupt inside DCP's writer stays one, as the same interrupt elsewhere in the save
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{tmp}: saving step {step} failed: {_save_failure(err, causes, self.root)}") \
                from None

    def _write_small_files(self, trainer, tmp: str, run_info: Optional[dict]) -> None:
        torch.save(_rng_state(), os.path.join(tmp, f"rng_{_rank()}.pt"))
        if self.is_main:
            torch.save({"step": trainer.step, "scheduler": trainer.scheduler.state_dict(),
                        "loader": trainer.loader.state_dict(), "run": json.dumps(run_info or {})},
                       os.path.join(tmp, "train_state.pt"))
            cfg = dataclasses.replace(trainer.cfg, model=dataclasses.replace(trainer.cfg.model, init_from=None))
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    def _publish(self, tmp: str, final: str, step: int) -> None:
        _barrier()  # every rank's files are written
        if self.is_main:
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
                     if os.path.isfile(os.path.join(tmp, name))}
            with open(os.path.join(tmp, "manifest.json.part"), "w") as f:
                json.dump({"step": step, "files": files}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, "manifest.json.part"), os.path.join(tmp, "manifest.json"))
            _fault("manifest", step)
            if os.path.exists(final):  # a re-save of the same step (e.g. after resuming it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._retain()
        _barrier()
        self.last_saved = step
        if self.is_main:
            log.info("checkpoint saved: %s", final)

    def wait(self) -> None:
        """Finish an async save in flight and publish it."""
        if self._pending is None:
            return
        future, tmp, final, step = self._pending
        self._pending = None
        with self._failing_save(tmp, step):
            future.result()
        self._publish(tmp, final, step)

    def poll(self) -> None:
        """At a step boundary (all ranks): publish the async save in flight once every rank has written it, so
        that a crash before the next save does not lose it."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending[0].done())])
        if self._poll_group is not None:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_group)
        if done.item():
            self.wait()

    def _retain(self) -> None:
        if self.cfg.keep <= 0:
            return
        for _, path in list_checkpoints(self.root)[:-self.cfg.keep]:
            doomed = os.path.join(self.root, TMP_PREFIX + "del-" + os.path.basename(path))
            os.replace(path, doomed)  # never half-deleted under a complete name
            shutil.rmtree(doomed, ignore_errors=True)

    def _abandon_newer(self, step: int, out_dir: str) -> None:
        """Set aside (rank 0) what belongs to a branch this run does not continue: the checkpoints newer than the
        resumed `step` (retention, by step number, and resume=auto must not take them for this run's) and the
        metrics.jsonl lines past it. A fresh start (step -1) sets an earlier run in the same out_dir aside whole,
        with the model_config.json its checkpoints were saved with (this run writes its own)."""
        if self.is_main:
            newer = [path for s, path in list_checkpoints(self.root) if s > step]
            metrics = os.path.join(out_dir, METRICS_FILE)
            kept, late = _split_metrics(metrics, step)
            if newer or late:
                stamp = os.path.join(self.root, ABANDONED_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
                names = itertools.chain([stamp], (f"{stamp}-{n}" for n in itertools.count(1)))  # two in a second
                aside = next(name for name in names if not os.path.exists(name))
                os.makedirs(aside)
                for path in newer:
                    os.replace(path, os.path.join(aside, os.path.basename(path)))
                config = os.path.join(out_dir, RUN_MODEL_CONFIG)
                if step < 0 and newer and os.path.isfile(config):
                    shutil.copyfile(config, os.path.join(aside, RUN_MODEL_CONFIG))
                if late:
                    with open(os.path.join(aside, METRICS_FILE), "w") as f:
                        f.writelines(late)
                    with open(metrics + ".part", "w") as f:
                        f.writelines(kept)
                    os.replace(metrics + ".part", metrics)
                moved = [os.path.basename(p) for p in newer] + [f"{len(late)} {METRICS_FILE} lines"] * bool(late)
                if step < 0:
                    log.warning("a fresh start in an out_dir with an earlier run: moved %s to %s", ", ".join(moved),
                                aside)
                else:
                    log.warning("resumed at step %d: moved %s past it to %s", step, ", ".join(moved), aside)
        _barrier()

    def cleanup_stale(self) -> None:
        """Remove temporary directories of saves that died (rank 0, before the first save)."""
        if self.is_main and os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.startswith(TMP_PREFIX):
                    log.warning("removing incomplete checkpoint %s", os.path.join(self.root, name))
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ load

    def load(self, trainer, path: str) -> dict:
        """Restore `trainer` from the checkpoint at `path`; returns the run info saved with it."""
        verify(path)
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        check_model_shapes(path, model_state, optim_state)
        state = {"model": model_state, "optim": optim_state}
        read_dcp(state, path, no_dist=not dist.is_initialized())  # the manifest check above caught missing files
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        train_state = _load_file(os.path.join(path, "train_state.pt"))
        trainer.step = int(train_state["step"])
        trainer.scheduler.load_state_dict(train_state["scheduler"])
        trainer.loader.load_state_dict(train_state["loader"])
        rng_file = os.path.join(path, f"rng_{_rank()}.pt")
        _set_rng_state(_load_file(rng_file if os.path.isfile(rng_file) else os.path.join(path, "rng_0.pt")))
        self.last_saved = trainer.step
        log.info("resumed from %s at step %d", path, trainer.step)
        return json.loads(train_state.get("run", "{}"))

    def resume(self, trainer, out_dir: str, run_info: Optional[dict] = None,
               init_from: Optional[str] = None) -> Optional[str]:
        """Apply checkpoint.resume: load the newest (auto) or the given checkpoint; None when starting fresh.
        Facts of the run (`run_info`: global batch, data...) that differ from the saved ones are logged."""
        path = resolve_resume(self.cfg.resume, out_dir)
        self.cleanup_stale()
        if path is None:  # a fresh start: an earlier run's checkpoints would be resumed by a later resume=auto
            if init_from and os.path.abspath(init_from).startswith(os.path.abspath(self.root) + os.sep):
                raise CheckpointError(f"model.init_from={init_from} is a checkpoint of this train.out_dir, which "
                                      "checkpoint.resume=none starts afresh: write the new run to another "
                                      "train.out_dir")
            self._abandon_newer(-1, out_dir)
            return None
        try:
            saved = self.load(trainer, path)
        except CheckpointError as err:
            older = [p for _, p in list_checkpoints(os.path.dirname(path)) if p != path]
            if self.cfg.resume != "auto" or not older or isinstance(err, ShapeMismatch):  # older: same shapes
                raise
            raise CheckpointError(f"{err}; to resume from the previous one: checkpoint.resume={older[-1]}") from None
        started_from = (run_info or {}).get("init_from")
        if started_from and "init_from" in saved and source_run(saved["init_from"]) != source_run(started_from):
            raise CheckpointError(f"model.init_from={init_from} would be ignored: {path} continues a run started "
                                  f"from {saved['init_from'] or 'random weights'}; write the new run to another "
                                  "train.out_dir (or checkpoint.resume=none to start afresh here)")
        if started_from and saved.get("init_from") not in (None, started_from):
            log.warning("model.init_from now resolves to %s; the run started from %s of the same source and goes on "
                        "from its own checkpoint", started_from, saved["init_from"])
        self._abandon_newer(trainer.step, out_dir)
        for key, value in (run_info or {}).items():
            if key == "init_from":  # checked above; leaving it out on a relaunch is fine
                continue
            if (key in saved or key in RECORDED_SINCE) and saved.get(key) != value:
                log.warning("resuming with %s=%r, saved with %r: %s", key, value, saved.get(key),
                            RESUME_EFFECTS.get(key, "sample order or schedule may differ from the saved run"))
        return path
