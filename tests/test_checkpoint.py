"""Checkpoints: exact resume, SIGTERM save-and-exit, kill during a save, retention, 2 ranks -> 1 rank, clear errors."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from moba_train.config import register_configs, to_config
from moba_train.errors import UserError
from moba_train.train import checkpoint as ckpt
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


def losses(out_dir):
    """{step: loss} from metrics.jsonl; a step logged twice (re-run after a crash) must repeat its loss exactly."""
    out = {}
    for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))):
        assert out.setdefault(r["step"], r["loss"]) == r["loss"], r
    return out


def run_group(cmd, timeout=300, env=None):
    """Run a command in its own process group; on timeout kill the whole group (torchrun workers included)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
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
    with pytest.raises(UserError, match="nowhere: no such checkpoint"):
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


@pytest.mark.parametrize("damage", ["truncate_shard", "missing_train_state", "missing_manifest", "bad_metadata"])
def test_corrupt_checkpoint_names_the_file(straight, tmp_path, damage):
    Trainer(config(tmp_path, "train.steps=2", "checkpoint.interval=1")).train()
    path = tmp_path / "checkpoints" / "step_00000002"
    if damage == "truncate_shard":
        victim = path / "__0_0.distcp"
        with open(victim, "r+b") as f:
            f.truncate(100)
    elif damage == "missing_train_state":
        victim = path / "train_state.pt"
        victim.unlink()
    elif damage == "missing_manifest":
        victim = path / "manifest.json"
        victim.unlink()
    else:
        victim = path / ".metadata"
        size = os.path.getsize(victim)
        victim.write_bytes(b"\0" * size)
    with pytest.raises(UserError, match=str(victim).replace(".", r"\.")) as err:
        Trainer(config(tmp_path, "train.steps=2"))
    assert str(err.value).endswith(f"checkpoint.resume={tmp_path}/checkpoints/step_00000001")


def test_two_ranks_resume_on_one(tmp_path):
    """dp=2 (FSDP2, gloo) on Megatron data saves at step 3; one rank with grad_accum=2 continues like the 2-rank
    run (same global batch, consumed samples carried over)."""
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "launch/pretrain.py", *SMALL, *DATA, "checkpoint.interval=3", "checkpoint.keep=3", f"train.out_dir={two}"]
    run = run_group(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    one = tmp_path / "one"
    trainer = Trainer(config(one, "train.grad_accum=2", f"checkpoint.resume={two}/checkpoints/step_00000003"))
    assert trainer.step == 3 and trainer.loader.consumed == 3 * 4
    assert type(trainer.loader.dataset).__name__ == "MegatronData"
    trainer.train()
    ref, got = losses(two), losses(one)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, got[step], ref[step])


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
