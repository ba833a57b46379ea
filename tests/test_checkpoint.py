"""Checkpoints: exact resume, SIGTERM save-and-exit, kill during a save, retention, 2 ranks -> 1 rank, async saves,
rollback, changed optimizer settings on resume, clear errors."""

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from moba_train.config import register_configs, to_config
from moba_train.errors import CheckpointError, UserError
from moba_train.train import checkpoint as ckpt
from moba_train.train.optim import lr_factor
from moba_train.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["+exp=tiny", "data.seq_len=128", "data.batch_size=2", "attention.block_size=32",
         "attention.top_k=2", "attention.backend=naive", "train.device=cpu", "train.log_every=1",
         "train.warmup_steps=2", "train.steps=6", "model.dim=64", "model.ffn_dim=128"]
DATA = []  # data=megatron over a small prepared corpus (the fixture below)
register_configs()


@pytest.fixture(scope="module", autouse=True)
def megatron_data(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "scripts", "prepare_data.py"))
    prepare_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_data)
    d = tmp_path_factory.mktemp("data")
    text = d / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i}: " + "abc xyz " * (i % 17)}) + "\n"
                            for i in range(300)))
    prepare_data.prepare([str(text)], str(d / "data"), workers=1, progress=False)
    DATA[:] = ["data=megatron", f"data.path={d / 'data'}", "data.reset_at_eod=true"]


def config(out_dir, *overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=[*SMALL, *DATA, f"train.out_dir={out_dir}",
                                                                  *overrides]))


def losses(out_dir, key="loss"):
    """{step: loss} (or another logged metric) from metrics.jsonl; a step logged twice (re-run after a crash) must
    repeat it exactly."""
    out = {}
    for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))):
        assert out.setdefault(r["step"], r[key]) == r[key], r
    return out


def kill_tree(pid):
    """SIGKILL the process group of `pid` and those of its children: torchrun starts each worker in a session of
    its own, and a surviving worker would hold the output pipes open."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for group in (pid, *map(int, children)):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_group(cmd, timeout=300, env=None):
    """Run a command in its own process group; on timeout kill the whole group (torchrun workers included)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop_after(trainer, n):
    """Send this process SIGTERM during train step n, as a preemption would."""
    step = trainer.train_step
    calls = [0]

    def wrapped():
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return step()

    trainer.train_step = wrapped


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    trainer = Trainer(config(out, "checkpoint.resume=none"))
    trainer.train()
    return out, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_sigterm_save_resume_is_bit_identical(straight, tmp_path):
    ref_dir, ref_weights = straight
    first = Trainer(config(tmp_path))
    stop_after(first, 3)
    first.train()  # SIGTERM at step 3: saves, returns normally
    assert first.step == 3 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [3]
    second = Trainer(config(tmp_path))  # checkpoint.resume=auto
    assert second.step == 3 and second.loader.consumed == 3 * 2
    second.train()
    assert losses(tmp_path) == losses(ref_dir)  # every step, bit for bit
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, ref_weights[name]), name
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [3, 6]


def test_retention_async_and_explicit_path(straight, tmp_path):
    trainer = Trainer(config(tmp_path, "checkpoint.interval=1", "checkpoint.keep=2", "train.steps=4",
                             "checkpoint.async_save=true"))
    trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    path = str(tmp_path / "checkpoints" / "step_00000003")
    again = Trainer(config(tmp_path / "other", f"checkpoint.resume={path}", "train.steps=4"))
    assert again.step == 3
    with pytest.raises(UserError, match=r"nowhere: no such checkpoint \(checkpoint.resume is auto, none, or a"):
        Trainer(config(tmp_path / "x", f"checkpoint.resume={tmp_path}/nowhere"))


@pytest.mark.parametrize("stage", ["metadata", "manifest"])
def test_crash_before_publish_keeps_previous(straight, tmp_path, monkeypatch, stage):
    class Killed(BaseException):  # like os._exit: nothing may catch it on the way out
        pass

    def die(code):
        raise Killed

    monkeypatch.setenv(ckpt.FAULT_ENV, f"{stage}@4")
    monkeypatch.setattr(ckpt.os, "_exit", die)
    trainer = Trainer(config(tmp_path, "checkpoint.interval=2"))
    with pytest.raises(BaseException) as died:  # DCP re-raises a failure inside its writer as CheckpointException
        trainer.train()
    assert died.type is Killed or "Killed" in str(died.value)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2] and os.path.isdir(root / ".tmp-step_00000004")
    resumed = Trainer(config(tmp_path, "checkpoint.interval=2"))
    assert resumed.step == 2 and not os.path.exists(root / ".tmp-step_00000004")


def test_kill_during_save_resumes_from_previous(straight, tmp_path):
    """A real process dies between the shard writes and the rest of the save of step 4."""
    ref = losses(straight[0])
    cmd = [sys.executable, "launch/pretrain.py", *SMALL, *DATA, "checkpoint.interval=2",
           f"train.out_dir={tmp_path}"]
    env = dict(os.environ, **{ckpt.FAULT_ENV: "shards@4"})
    run = run_group(cmd, env=env)
    assert run.returncode == 17, run.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert os.path.exists(root / ".tmp-step_00000004" / ".metadata")  # shards were written, never published
    ckpt.verify(str(root / "step_00000002"))
    resumed = Trainer(config(tmp_path, "checkpoint.interval=2"))
    assert resumed.step == 2
    resumed.train()
    assert losses(tmp_path) == ref  # steps 3, 4 logged twice: identical both times, and equal to the straight run
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 6]


def test_changed_model_shape_is_one_clear_error(straight, tmp_path):
    Trainer(config(tmp_path, "train.steps=1")).train()
    with pytest.raises(UserError, match=r"step_00000001: checkpoint model shape differs.*64\] in checkpoint, "
                                        r"\[.*32\] in model"):
        Trainer(config(tmp_path, "train.steps=1", "model.dim=32", "model.ffn_dim=64"))


def damage_checkpoint(path, damage):
    """Damage the checkpoint dir `path` one way; returns the file (or dir) an error should name."""
    shard = path / "__0_0.distcp"
    if damage == "truncate_shard":
        with open(shard, "r+b") as f:
            f.truncate(100)
        return shard
    if damage == "zero_shard":  # torn at its full size (what a power loss can leave): the manifest's sizes match
        shard.write_bytes(b"\0" * os.path.getsize(shard))
        return path
    if damage == "missing_train_state":
        (path / "train_state.pt").unlink()
        return path / "train_state.pt"
    if damage == "zero_train_state":
        victim = path / "train_state.pt"
        victim.write_bytes(b"\0" * os.path.getsize(victim))
        return victim
    if damage == "missing_manifest":
        (path / "manifest.json").unlink()
        return path / "manifest.json"
    victim = path / ".metadata"
    victim.write_bytes(b"\0" * os.path.getsize(victim))
    return victim


@pytest.mark.parametrize("damage", ["truncate_shard", "zero_shard", "missing_train_state", "zero_train_state",
                                    "missing_manifest", "bad_metadata"])
def test_corrupt_checkpoint_names_the_file(straight, tmp_path, damage):
    Trainer(config(tmp_path, "train.steps=2", "checkpoint.interval=1")).train()
    victim = damage_checkpoint(tmp_path / "checkpoints" / "step_00000002", damage)
    with pytest.raises(UserError, match=str(victim).replace(".", r"\.")) as err:
        Trainer(config(tmp_path, "train.steps=2"))
    assert str(err.value).endswith(f"checkpoint.resume={tmp_path}/checkpoints/step_00000001")
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)  # torch's text suggests unsafe loads


@pytest.mark.parametrize("damage", ["truncate_shard", "zero_shard"])
def test_damaged_init_from_is_one_clear_error(straight, tmp_path, damage):
    """model.init_from (and the export and eval scripts, which load the same way) of a damaged DCP checkpoint."""
    Trainer(config(tmp_path / "a", "train.steps=1")).train()
    path = tmp_path / "a" / "checkpoints" / "step_00000001"
    damage_checkpoint(path, damage)
    with pytest.raises(UserError, match=f"{path}: cannot load checkpoint") as err:
        Trainer(config(tmp_path / "b", f"model.init_from={path}", "checkpoint.resume=none"))
    assert "\n" not in str(err.value)


def test_resume_refuses_another_init_from(tmp_path, caplog):
    """A run dir resumed with a new model.init_from would train on from its checkpoint, silently dropping the
    new weights; relaunching with the same init_from, or without it, resumes."""
    Trainer(config(tmp_path / "other", "train.steps=1")).train()
    other = tmp_path / "other" / "checkpoints" / "step_00000001"
    run = tmp_path / "run"
    Trainer(config(run, "train.steps=1", f"model.init_from={other}")).train()
    assert Trainer(config(run, "train.steps=2", f"model.init_from={other}")).step == 1
    assert Trainer(config(run, "train.steps=2")).step == 1
    # a run dir as init_from resolves to its newest checkpoint; the source training on must not block the resume
    # (it was refused: SFT from a pretraining run still saving could not be resumed)
    sft = tmp_path / "sft"
    Trainer(config(sft, "train.steps=1", f"model.init_from={tmp_path / 'other'}")).train()
    Trainer(config(tmp_path / "other", "train.steps=2", "model.rope_theta=50000.0")).train()
    assert (tmp_path / "other" / "checkpoints" / "step_00000002").is_dir()
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(config(sft, "train.steps=2", f"model.init_from={tmp_path / 'other'}"))
    # the model its own checkpoint was trained with, not the source's newer settings (rope_theta went along)
    assert resumed.step == 1 and resumed.cfg.model.rope_theta != 50000.0
    assert "step_00000002; the run started from" in caplog.text and "step_00000001 of the same source" in caplog.text
    # two sources that merely sit in folders named checkpoints are two sources (only <run>/checkpoints/step_N
    # checkpoints are one run's)
    for name in ("m1", "m2"):
        shutil.copytree(tmp_path / "other" / "checkpoints" / "step_00000001", tmp_path / "hub" / "checkpoints" / name)
    Trainer(config(tmp_path / "from_m1", "train.steps=1", f"model.init_from={tmp_path / 'hub/checkpoints/m1'}")).train()
    with pytest.raises(UserError, match="would be ignored"):
        Trainer(config(tmp_path / "from_m1", "train.steps=2", f"model.init_from={tmp_path / 'hub/checkpoints/m2'}"))
    Trainer(config(tmp_path / "random", "train.steps=1")).train()
    cases = ((run, tmp_path / "random", other), (tmp_path / "random", other, "random weights"))
    for target, init_from, started in cases:
        with pytest.raises(UserError, match=f"model.init_from={init_from}.* would be ignored: {target}.* started "
                                            f"from {started}"):
            Trainer(config(target, "train.steps=2", f"model.init_from={init_from}"))


def test_resume_after_the_source_is_gone(tmp_path, monkeypatch):
    """A pruned or moved init_from source: the run resumes from its own checkpoint, whose model it takes with the
    run's model.* overrides (it failed on the missing source, so a crashed SFT run whose source was pruned was
    lost); init_from given relative resolves the same."""
    monkeypatch.chdir(tmp_path)
    Trainer(config(tmp_path / "other", "train.steps=1")).train()
    Trainer(config(tmp_path / "run", "train.steps=1", "model.init_from=other")).train()
    shutil.move(tmp_path / "other", tmp_path / "moved")
    resumed = Trainer(config(tmp_path / "run", "train.steps=2", "model.init_from=other", "model.rope_theta=50000.0"))
    assert resumed.step == 1 and resumed.cfg.model.rope_theta == 50000.0
    resumed.train()
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    with pytest.raises(UserError, match="checkpoint has n_layers=2 but the config sets model.n_layers=3"):
        config(tmp_path / "run", "train.steps=3", "model.init_from=other", "model.n_layers=3")
    with pytest.raises(UserError, match="no such checkpoint directory"):  # nothing to resume: the source is needed
        config(tmp_path / "fresh", "train.steps=1", "model.init_from=other")


def run_two_ranks(out_dir, *overrides, timeout=300):
    """launch/pretrain.py under torchrun: dp=2 (FSDP2, gloo) on Megatron data."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "launch/pretrain.py", *SMALL, *DATA, *overrides, f"train.out_dir={out_dir}"]
    run = run_group(cmd, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A 2-rank run with synchronous saves at steps 3 and 6."""
    out = tmp_path_factory.mktemp("two")
    run_two_ranks(out, "checkpoint.interval=3", "checkpoint.keep=3")
    return out


def test_two_ranks_resume_on_one(two_ranks, tmp_path):
    """dp=2 saves at step 3; one rank with grad_accum=2 continues like the 2-rank run (same global batch,
    consumed samples carried over). The gradient norms match too: Adam would hide gradients scaled by the
    accumulation count from the losses."""
    one = tmp_path / "one"
    trainer = Trainer(config(one, "train.grad_accum=2", f"checkpoint.resume={two_ranks}/checkpoints/step_00000003"))
    assert trainer.step == 3 and trainer.loader.consumed == 3 * 4
    assert type(trainer.loader.dataset).__name__ == "MegatronData"
    trainer.train()
    ref, got = losses(two_ranks), losses(one)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, got[step], ref[step])
    ref, got = losses(two_ranks, "grad_norm"), losses(one, "grad_norm")
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5 * ref[step], (step, got[step], ref[step])



def test_two_ranks_async_save_every_step(two_ranks, tmp_path):
    """DCP's background collectives of an async save must not meet the step's on one group (gloo: deadlock)."""
    run_two_ranks(tmp_path, "checkpoint.interval=1", "checkpoint.keep=2", "checkpoint.async_save=true", timeout=90)
    assert losses(tmp_path) == losses(two_ranks)
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [5, 6]
    assert not [n for n in os.listdir(root) if n.startswith(".")]
    ckpt.verify(str(root / "step_00000006"))


def test_async_save_is_published_at_the_next_step_boundary(tmp_path, monkeypatch):
    """A finished async save is published before the next save starts, not by it."""
    async_save = ckpt.dcp.async_save

    def finished_at_once(*args, **kwargs):
        future = async_save(*args, **kwargs)
        future.result()
        return future

    monkeypatch.setattr(ckpt.dcp, "async_save", finished_at_once)
    trainer = Trainer(config(tmp_path, "checkpoint.async_save=true", "checkpoint.interval=2", "train.steps=4"))
    seen, step = [], trainer.train_step

    def look_during_step_4():
        if trainer.step == 3:
            seen.append(sorted(os.listdir(tmp_path / "checkpoints")))
        return step()

    trainer.train_step = look_during_step_4
    trainer.train()
    assert seen == [["step_00000002"]]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_grad_clip_zero_or_negative_means_no_clipping(tmp_path):
    def one_step(grad_clip):
        out = tmp_path / str(grad_clip)
        trainer = Trainer(config(out, "train.steps=1", f"train.grad_clip={grad_clip}"))
        trainer.train()
        record = json.loads(open(out / "metrics.jsonl").readline())
        return trainer.model.state_dict(), record["grad_norm"]

    never_clipped, norm = one_step(1e9)
    assert norm > 0
    for grad_clip in (0, -1):
        weights, logged_norm = one_step(grad_clip)
        assert logged_norm == norm
        for name, value in weights.items():
            assert torch.equal(value, never_clipped[name]), (grad_clip, name)


def test_rollback_moves_the_newer_checkpoints_aside(tmp_path):
    """Resuming from an older checkpoint of the same run: its newer ones go to .abandoned-*, so retention and a
    later resume=auto see only the branch trained from the rollback."""
    Trainer(config(tmp_path, "checkpoint.interval=2", "checkpoint.keep=3")).train()
    root = tmp_path / "checkpoints"
    rolled_back = Trainer(config(tmp_path, "checkpoint.interval=2", "checkpoint.keep=3", "train.steps=4",
                                 f"checkpoint.resume={root / 'step_00000002'}"))
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    (aside,) = [n for n in os.listdir(root) if n.startswith(ckpt.ABANDONED_PREFIX)]
    assert sorted(os.listdir(root / aside)) == ["metrics.jsonl", "step_00000004", "step_00000006"]
    assert sorted(losses(root / aside)) == [3, 4, 5, 6]  # the rolled-back branch's log goes with it
    rolled_back.train()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert Trainer(config(tmp_path, "checkpoint.interval=2", "checkpoint.keep=3")).step == 4


def test_fresh_start_sets_an_earlier_run_aside(tmp_path):
    """checkpoint.resume=none in a used out_dir: the earlier run's checkpoints and metrics go to .abandoned-*, so
    metrics.jsonl holds only the new run and a later resume=auto continues the new run, not the old one."""
    Trainer(config(tmp_path, "checkpoint.interval=3")).train()
    root = tmp_path / "checkpoints"
    Trainer(config(tmp_path, "checkpoint.interval=2", "checkpoint.resume=none", "train.steps=2")).train()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    (aside,) = [n for n in os.listdir(root) if n.startswith(ckpt.ABANDONED_PREFIX)]
    assert sorted(os.listdir(root / aside)) == ["metrics.jsonl", "model_config.json", "step_00000003",
                                                "step_00000006"]
    assert sorted(losses(tmp_path)) == [1, 2]
    assert sorted(losses(root / aside)) == [1, 2, 3, 4, 5, 6]
    assert Trainer(config(tmp_path, "checkpoint.interval=2")).step == 2
    with pytest.raises(UserError, match="is a checkpoint of this train.out_dir"):  # not moved from under itself
        Trainer(config(tmp_path, "checkpoint.resume=none", f"model.init_from={root / 'step_00000002'}"))
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]


def test_metrics_past_the_resumed_step_are_set_aside(tmp_path):
    """A crash after the last save, or before the first: the steps logged past the checkpoint resumed (or all of
    them, with none) leave metrics.jsonl for .abandoned-*, so it holds every step once, as an uninterrupted run's.
    Until the thirteenth session they stayed and the re-run steps were logged again."""
    Trainer(config(tmp_path, "checkpoint.interval=3")).train()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    os.rename(tmp_path / "checkpoints" / "step_00000006", tmp_path / "gone")  # died after step 6, saved at 3
    metrics.write_text("".join(lines) + lines[-1][:9])  # and mid-way through a line
    Trainer(config(tmp_path, "checkpoint.interval=3")).train()
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2, 3, 4, 5, 6]
    (aside,) = [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(ckpt.ABANDONED_PREFIX)]
    assert open(tmp_path / "checkpoints" / aside / "metrics.jsonl").read() == "".join(lines[3:]) + lines[-1][:9]
    for name in os.listdir(tmp_path / "checkpoints"):  # no checkpoint at all: a fresh start takes them all
        if name.startswith("step_"):
            os.rename(tmp_path / "checkpoints" / name, tmp_path / f"gone_{name}")
    Trainer(config(tmp_path, "train.steps=2")).train()
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2]


def test_refused_resume_keeps_the_run_model_config(tmp_path):
    """A resume refused for another architecture leaves model_config.json describing the run's checkpoints, and
    does not point at an older checkpoint of the same architecture as a way out."""
    Trainer(config(tmp_path, "checkpoint.interval=1", "train.steps=2")).train()
    before = (tmp_path / "model_config.json").read_text()
    with pytest.raises(UserError, match="checkpoint model shape differs") as err:
        Trainer(config(tmp_path, "model.n_layers=3"))
    assert "to resume from the previous one" not in str(err.value)
    assert (tmp_path / "model_config.json").read_text() == before


def test_resume_takes_the_optimizer_settings_of_the_config(tmp_path, caplog):
    """One warmup step, so every resumed step sits on the cosine where neighbouring steps' rates differ."""
    Trainer(config(tmp_path, "train.steps=2", "train.lr=1e-3", "train.warmup_steps=1")).train()
    cfg = config(tmp_path, "train.steps=4", "train.lr=1e-5", "train.beta2=0.99", "train.weight_decay=0.05",
                 "train.warmup_steps=1")
    with caplog.at_level(logging.WARNING, logger="moba_train.train.optim"):
        trainer = Trainer(cfg)
    assert trainer.step == 2
    assert "train.lr=1e-05 (checkpoint: 0.001)" in caplog.text and "train.beta2=0.99 (checkpoint: 0.95)" in caplog.text
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.99)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["initial_lr"] == no_decay["initial_lr"] == 1e-5 and trainer.scheduler.base_lrs == [1e-5, 1e-5]
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["lr"]) for r in logged[2:]] == [(3, 1e-5 * lr_factor(2, cfg.train)),
                                                          (4, 1e-5 * lr_factor(3, cfg.train))]


def test_failed_save_is_one_line_and_leaves_no_partial_directory(tmp_path, monkeypatch):
    """A full disk during a save: DCP's wrapped per-rank traceback (or torch.save's zip-writer 'unexpected pos')
    became one line naming the cause; the partial .tmp-step_* directory is removed and the last published
    checkpoint still resumes."""
    import errno
    from shutil import _ntuple_diskusage as shutil_usage

    Trainer(config(tmp_path, "checkpoint.interval=1", "train.steps=2")).train()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "x"))

    monkeypatch.setattr(ckpt._Writer, "finish", full)  # DCP's own write path
    trainer = Trainer(config(tmp_path, "checkpoint.interval=1", "train.steps=3"))
    with pytest.raises(CheckpointError, match=r"saving step 3 failed: No space left on device \(.*checkpoints/x\)"):
        trainer.train()
    monkeypatch.undo()
    zip_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(zip_error))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil_usage(0, 0, 2**20))
    trainer = Trainer(config(tmp_path, "checkpoint.interval=1", "train.steps=3"))
    with pytest.raises(CheckpointError, match=r"saving step 3 failed: the disk holding .* is full \(1 MiB free\)"):
        trainer.train()
    monkeypatch.undo()
    names = os.listdir(tmp_path / "checkpoints")
    assert not any(n.startswith(ckpt.TMP_PREFIX) for n in names)
    assert sorted(n for n in names if not n.startswith(".")) == ["step_00000001", "step_00000002"]
    assert Trainer(config(tmp_path, "train.steps=3")).step == 2


def test_megatron_stream_does_not_depend_on_train_steps(tmp_path):
    """Runs of 2 and 200 steps draw the same batches, epoch after epoch: the sample index was built for steps x
    global batch samples, and past one epoch megatron-core shuffled every epoch anew, so a run resumed with more
    steps re-drew samples it had already seen instead of continuing its stream."""
    loaders = [Trainer(config(tmp_path / str(steps), f"train.steps={steps}")).loader for steps in (2, 200)]
    epoch = len(loaders[0].dataset)
    assert 200 * 2 > 2 * epoch  # the long run spans more than two epochs
    for _ in range(3 * epoch // 2):
        first, second = (loader.next_batch()["input_ids"] for loader in loaders)
        assert torch.equal(first, second)


def test_resume_of_a_checkpoint_from_before_the_one_pass_index_warns(tmp_path, caplog):
    """Checkpoints of megatron runs written before the sample index covered one pass carry no data_index fact:
    their resumed stream differs, which is said."""
    Trainer(config(tmp_path, "checkpoint.interval=1", "train.steps=1")).train()
    state_file = tmp_path / "checkpoints" / "step_00000001" / "train_state.pt"
    state = torch.load(state_file, weights_only=False)
    run = json.loads(state["run"])
    assert run.pop("data_index") == "one pass"
    state["run"] = json.dumps(run)
    torch.save(state, state_file)
    manifest_file = state_file.parent / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["train_state.pt"] = state_file.stat().st_size
    manifest_file.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        Trainer(config(tmp_path, "train.steps=2"))
    assert "data_index='one pass', saved with None: megatron data comes from another sample index" in caplog.text


def test_signal_during_a_save_stops_after_it(tmp_path, monkeypatch):
    """A SIGINT that arrives while step 2 is being saved: the run stops once that save is done (it trained and
    saved step 3 first, an extra step plus a save inside the scheduler's grace period)."""
    write = ckpt.Checkpointer._write_small_files

    def signalled(self, trainer, tmp, run_info):
        write(self, trainer, tmp, run_info)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ckpt.Checkpointer, "_write_small_files", signalled)
    trainer = Trainer(config(tmp_path, "checkpoint.interval=2", "train.steps=10"))
    trainer.train()
    assert trainer.step == 2 and [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2]


def test_finished_run_launched_again_says_so(tmp_path, caplog):
    """Launching a finished run again (e.g. with changed attention) trained nothing and said nothing: it now says
    why, and a resume with other attention settings is named as such."""
    Trainer(config(tmp_path, "train.steps=2")).train()
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(config(tmp_path, "train.steps=2", "attention.top_k=1"))
        trainer.train()
    assert trainer.step == 2
    assert "the checkpoint at step 2 has reached train.steps=2: nothing to train" in caplog.text
    assert "'top_k': 1" in caplog.text and "the layers go on with other attention" in caplog.text
    # more steps: the warning said the sample order may differ, though the stream goes on where it was
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(config(tmp_path, "train.steps=3", "attention.top_k=1"))
    assert "resuming with steps=3, saved with 2: the learning-rate schedule" in caplog.text
    assert "sample order" not in caplog.text


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path):
    import time

    cmd = [sys.executable, "launch/pretrain.py", *SMALL, *DATA, "train.steps=100000", f"train.out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = max(losses(tmp_path))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [last]


@pytest.mark.parametrize("broken", ["loss", "grad_norm"])
def test_divergence_stops_before_saving_it(tmp_path, broken):
    """A non-finite loss (the step's input weights) or grad norm (its update broke them) at a log or save step
    stops the run with one error naming the step; that step is not saved and the earlier checkpoint stays the
    newest (log_every 3, so step 4 is seen only because it saves)."""
    trainer = Trainer(config(tmp_path, "checkpoint.interval=2", "train.log_every=3"))
    step = trainer.train_step

    def nan_from_step_4():
        out = step()
        if trainer.step == 3:  # the step about to become step 4
            out[broken] = out[broken] * float("nan")
        return out

    trainer.train_step = nan_from_step_4
    with pytest.raises(UserError, match=r"loss .*, grad norm .* at step 4: training diverged"):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2]


def test_an_older_checkpoint_keeps_the_model_settings_it_was_trained_with(tmp_path):
    """A relaunch may change non-shape model settings (rope_theta here); the run's model_config.json then
    describes the new launch. init_from and ours-to-hf of a checkpoint saved before it took the new value
    (an export of step 1 declared rope_theta 50000) instead of its own config.yaml's."""
    from moba_train.model import ModelConfig
    from moba_train.model.pretrained import resolve_model_config

    Trainer(config(tmp_path, "train.steps=1")).train()
    Trainer(config(tmp_path, "train.steps=2", "model.rope_theta=50000.0")).train()
    first, second = (tmp_path / "checkpoints" / f"step_0000000{i}" for i in (1, 2))
    assert json.loads((tmp_path / "model_config.json").read_text())["model"]["rope_theta"] == 50000.0
    trained = config(tmp_path / "unused", "train.steps=1").model.rope_theta
    assert trained != 50000.0
    assert resolve_model_config(ModelConfig(init_from=str(first))).rope_theta == trained
    assert resolve_model_config(ModelConfig(init_from=str(second))).rope_theta == 50000.0
    spec = importlib.util.spec_from_file_location("convert_hf", os.path.join(ROOT, "scripts", "convert_hf.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    assert convert.load_ours(str(first), None, None).cfg.rope_theta == trained


@pytest.mark.parametrize("before, after", [("true", "false"), ("false", "true")])
def test_flipped_tied_embeddings_is_one_clear_error(tmp_path, before, after):
    """The model's parameter names and shapes are the same either way; only the optimizer trains one tensor or
    two. The resume ended in a traceback from set_state_dict (untied -> tied) or read as a damaged checkpoint."""
    Trainer(config(tmp_path, "train.steps=1", f"model.tie_embeddings={before}")).train()
    with pytest.raises(ckpt.ShapeMismatch, match=r"trained tensors differ \(lm_head.weight; model.tie_embeddings "
                                                  r"changed\?\)"):
        Trainer(config(tmp_path, "train.steps=2", f"model.tie_embeddings={after}"))


def test_tokenizer_lineage_passes_a_pruned_checkpoint(tmp_path):
    """A run started from <run>/checkpoints/step_N whose checkpoint retention later pruned: the lineage (tokenizer,
    special ids for exports and SFT templates) goes on through that run's model_config.json; it stopped at the
    missing dir, so an SFT resume and an ours-to-hf export found no tokenizer."""
    from moba_train.model.pretrained import tokenizer_dir

    Trainer(config(tmp_path / "a", "train.steps=1")).train()
    root = tmp_path / "a" / "checkpoints" / "step_00000001"
    (root / "tokenizer.json").write_text("{}")  # a tokenizer at the root of the lineage
    Trainer(config(tmp_path / "p", "train.steps=1", f"model.init_from={root}")).train()
    pruned = tmp_path / "p" / "checkpoints" / "step_00000001"
    Trainer(config(tmp_path / "k", "train.steps=1", f"model.init_from={pruned}")).train()
    shutil.rmtree(pruned)
    assert tokenizer_dir(str(pruned)) == str(root)
    assert tokenizer_dir(str(tmp_path / "k" / "checkpoints" / "step_00000001")) == str(root)
