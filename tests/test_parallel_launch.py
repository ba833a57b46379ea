"""The Hydra entry point under torchrun with context parallelism: same per-step losses as one process; bad
layouts fail before any work with one clear line."""

import json
import os
import subprocess
import sys

import pytest

from moba_train.config import Config, validate
from moba_train.errors import ConfigError
from moba_train.parallel.config import ParallelConfig
from moba_train.parallel.dims import resolve_dims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["+exp=tiny", "data.seq_len=256", "data.batch_size=2", "data.num_needles=4", "attention.block_size=32",
         "attention.top_k=2", "train.device=cpu", "train.steps=3", "train.log_every=1", "checkpoint.interval=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + ["launch/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


def metrics(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_torchrun_cp2_logs_the_losses_of_one_process(tmp_path):
    single = run(*SMALL, f"train.out_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-3000:]
    want = metrics(tmp_path / "one")
    for mode in ("ulysses", "allgather"):
        out = tmp_path / mode
        got = run(*SMALL, "parallel.cp=2", f"parallel.cp_mode={mode}", f"train.out_dir={out}", nproc=2)
        assert got.returncode == 0, got.stderr[-3000:]
        records = metrics(out)
        assert [r["step"] for r in records] == [r["step"] for r in want]
        for a, b in zip(records, want):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (mode, a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (mode, a, b)
        # allgather does cp x the MoBA work where ulysses would fit the heads: said once, by rank 0
        assert (got.stderr + got.stdout).count("parallel.cp_mode=allgather runs the MoBA kernels") == \
            (mode == "allgather")


def test_world_size_not_matching_the_layout_fails_before_any_work(tmp_path):
    got = run(*SMALL, "parallel.cp=2", f"train.out_dir={tmp_path}", nproc=3)
    assert got.returncode != 0
    assert "error: world size 3 is not divisible by parallel.cp=2" in got.stderr
    # every rank prints the same line; the only traceback is torchrun's own summary of a failed child
    assert "moba_train/" not in got.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_layout_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^world size 3 is not divisible by parallel.cp=2"):
        resolve_dims(ParallelConfig(cp=2), 3)
    with pytest.raises(ConfigError, match=r"dp_shard=2 x cp=2 != world size 8"):
        resolve_dims(ParallelConfig(cp=2, dp_shard=2), 8)
    assert resolve_dims(ParallelConfig(cp=2), 8) == (1, 4, 2)

    cfg = Config()
    cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads = 384, 24, 8
    cfg.parallel.cp, cfg.parallel.cp_mode = 3, "ulysses"
    cfg.data.seq_len = 3 * 1024
    with pytest.raises(ConfigError, match=r"^model.n_kv_heads=8 must be divisible by parallel.cp=3 for "
                                          r"parallel.cp_mode=ulysses"):
        validate(cfg)
    cfg.parallel.cp_mode = "allgather"
    cfg.data.seq_len = 1000
    with pytest.raises(ConfigError, match=r"^data.seq_len=1000 must be divisible by 6 for parallel.cp=3"):
        validate(cfg)
    cfg.data.seq_len = 1002
    validate(cfg)
