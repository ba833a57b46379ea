"""The Hydra entry point end to end, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["+exp=tiny", "data.seq_len=256", "data.batch_size=2", "data.num_needles=4", "attention.block_size=32",
         "attention.top_k=2", "train.device=cpu"]


def launch(*args, script="launch/pretrain.py"):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_tiny_run_writes_metrics(tmp_path):
    run = launch(*SMALL, "train.steps=4", "train.log_every=2", f"train.out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r)
        assert r["loss"] > 0 and r["tokens_per_s"] > 0


def test_bad_input_is_one_clear_line(tmp_path):
    run = launch(*SMALL, "attention.top_k=0", f"train.out_dir={tmp_path}")
    assert run.returncode == 2
    assert run.stderr.strip() == "error: attention.top_k=0 must be >= 1"
    run = launch("+exp=moba_128k", "data.path=/nonexistent/prefix", "train.device=cuda",
                 f"train.out_dir={tmp_path}")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    import torch

    expected = "no CUDA GPU" if not torch.cuda.is_available() else "/nonexistent/prefix"
    assert expected in run.stderr


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    """Hydra makes train.out_dir before the run starts: a file there (or above it) was a FileExistsError traceback."""
    (tmp_path / "afile").write_text("")
    for script, key, out in (("launch/pretrain.py", "train.out_dir", "afile"),
                             ("launch/sft.py", "train.out_dir", "afile/sub"),
                             ("launch/pretrain.py", "++train.out_dir", "afile")):
        run = launch(*SMALL, f"{key}={tmp_path / out}", script=script)
        assert run.returncode == 2 and run.stderr.strip() == (f"error: {key}={tmp_path / out}: "
                                                              f"{tmp_path / 'afile'} is a file, not a directory")


def test_unknown_key_fails_without_traceback(tmp_path):
    run = launch(*SMALL, "attention.topk=3", f"train.out_dir={tmp_path}")
    assert run.returncode != 0 and "topk" in run.stderr and "Traceback" not in run.stderr


def test_wandb_offline_logs_without_network(tmp_path):
    run = launch(*SMALL, "train.steps=2", "logger.wandb.enabled=true", f"train.out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    offline = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(offline) == 1
    assert any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / offline[0]))


def test_launchers_report_errors_and_interrupts_in_one_line(capsys):
    """What a launcher's main raises: a UserError is `error: ...` and exit 2; Ctrl-C before training (setup:
    tokenizing, index building), where no checkpoint is due, was a KeyboardInterrupt traceback."""
    from moba_train.errors import one_line_errors
    from moba_train.errors import ConfigError

    bad = "attention.top_k=0 must be >= 1"
    for raised, code, line in ((ConfigError(bad), 2, f"error: {bad}"),
                               (KeyboardInterrupt(), 130, "interrupted (SIGINT): stopped without saving")):
        with pytest.raises(SystemExit) as exit_info:
            with one_line_errors():
                raise raised
        assert exit_info.value.code == code and capsys.readouterr().err == line + "\n"
