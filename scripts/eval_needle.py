"""Needle-retrieval eval of a trained run on the embedded task: accuracy, loss and MoBA gate recall by how far
back the needle sits. Uses the run's newest checkpoint and the config it was trained with (its config.yaml; older
checkpoints: <run>/.hydra/config.yaml).

    python scripts/eval_needle.py --run runs/tiny [--samples 32] [--seed 12345] [--top-k 1]
"""

import argparse
import dataclasses
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moba_train.config import Config, to_config  # noqa: E402
from moba_train.device import device_arg  # noqa: E402
from moba_train.errors import UserError, one_line_errors  # noqa: E402
from moba_train.eval import evaluate_needles, summarize  # noqa: E402
from moba_train.model.pretrained import checkpoint_step, find_checkpoint, init_model, is_dcp_dir  # noqa: E402
from moba_train.train.checkpoint import RUN_CONFIG  # noqa: E402
from moba_train.train.schedule_attn import AttentionSchedule, describe  # noqa: E402


def load_run_config(run: str, checkpoint: str) -> Config:
    """The config the checkpoint was trained with (its config.yaml; older checkpoints: the run's Hydra config,
    which a later launch in the run dir rewrites)."""
    path = os.path.join(checkpoint, RUN_CONFIG)
    if not os.path.isfile(path):
        path = os.path.join(run, ".hydra", "config.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (--run must be a training run's train.out_dir)")
    cfg = to_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))
    if cfg.data.name != "synthetic":
        raise UserError(f"{path}: data.name={cfg.data.name!r}; this eval needs the synthetic needle task")
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="train.out_dir of a run on the synthetic task")
    p.add_argument("--samples", type=int, default=32, help="rows of the task to evaluate")
    p.add_argument("--seed", type=int, default=12345, help="task seed (differs from training by default)")
    p.add_argument("--top-k", type=int, default=None, help="evaluate with another attention.top_k")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    with one_line_errors():  # Ctrl-C during the eval too: one line, exit 130
        if args.samples < 1:
            raise UserError(f"--samples {args.samples}: must be >= 1")
        if args.top_k is not None and args.top_k < 1:
            raise UserError(f"--top-k {args.top_k}: must be >= 1 (leave it out to use the run's attention.top_k)")
        device_arg(args.device)
        checkpoint = find_checkpoint(args.run, "--run")
        cfg = load_run_config(args.run, checkpoint)
        top_k = cfg.attention.top_k if args.top_k is None else args.top_k
        # the layer kinds its newest checkpoint was trained with (attention.schedule may have switched layers); a
        # consolidated export carries no step: the run's end
        steps_done = checkpoint_step(checkpoint) if is_dcp_dir(checkpoint) else cfg.train.steps
        kinds = AttentionSchedule(cfg.attention, cfg.model.n_layers, cfg.train.steps).kinds_saved_at(steps_done)
        attn = dataclasses.replace(cfg.attention, top_k=top_k, layers=kinds, schedule=[])
        model = init_model(dataclasses.replace(cfg.model, init_from=checkpoint), attn, args.device, resolved=True)
        model.eval()
        answers = evaluate_needles(model, cfg.data, attn.block_size, args.seed, args.samples,
                                   torch.device(args.device), progress=True)
    print(f"{args.run}: layers {describe(kinds)}, block_size {attn.block_size}, top_k {attn.top_k}, "
          f"{len(answers)} answers, chance loss ln({cfg.data.needle_values}) = {math.log(cfg.data.needle_values):.2f}")
    print("| needle blocks back | answers | accuracy | loss | gate recall per MoBA layer |")
    print("|---|---|---|---|---|")
    for row in summarize(answers):
        recall = " ".join(f"{r:.2f}" for r in row["gate_recall"])
        print(f"| {row['blocks_back']} | {row['answers']} | {row['accuracy']:.3f} | {row['loss']:.3f} | {recall} |")


if __name__ == "__main__":
    main()
