"""Convert between Hugging Face Llama checkpoints and moba-train consolidated checkpoints.

    python scripts/convert_hf.py hf-to-ours  HF_DIR   OUT_DIR [--dtype float32|bfloat16|auto]
    python scripts/convert_hf.py ours-to-hf  CKPT_DIR OUT_DIR [--dtype bfloat16] [--max-shard-gb 5]

CKPT_DIR is a consolidated moba-train dir (config.json + model.safetensors, what hf-to-ours writes) or a
trainer DCP checkpoint dir (<run>/checkpoints/step_N); its architecture is the model section of the checkpoint's
own config.yaml (older checkpoints: the run's model_config.json, else <run>/.hydra/config.yaml), or --config FILE
(a yaml/json with a model: section) where given.
The tokenizer (and generation config) comes along from the nearest checkpoint that has one, following the
recorded `init_from` links back (a trainer checkpoint -> the HF dir its run started from); so do the HF config's
bos/eos/pad token ids. A trainer checkpoint's config.json also gets the attention it was last trained with
(`moba_block_size`, `moba_top_k`, `moba_full_attn_last_k`), which `moba_train.hf.register_moba` reads.
Bad input exits with status 2 and one line.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_train.errors import UserError  # noqa: E402
from moba_train.model import AttentionConfig, hf, pretrained  # noqa: E402
from moba_train.train.schedule_attn import AttentionSchedule, describe  # noqa: E402


def hf_to_ours(args: argparse.Namespace) -> None:
    model = hf.from_hf(args.src, dtype=args.dtype or "auto")
    pretrained.save_consolidated(model, args.dst)
    copied = pretrained.copy_tokenizer_files(args.src, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n / 1e6:.1f}M parameters, {model.cfg.n_layers} layers, dtype "
          f"{model.embed_tokens.weight.dtype}" + (f", copied {', '.join(copied)}" if copied else ""))


def ours_to_hf(args: argparse.Namespace) -> None:
    if args.max_shard_gb <= 0:
        raise UserError(f"--max-shard-gb {args.max_shard_gb}: must be > 0")
    model = load_ours(args.src, args.dtype, args.config)
    extra = {**pretrained.special_token_ids(args.src), **moba_settings(args.src, args.config, model.cfg.n_layers)}
    hf.to_hf(model, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024 ** 3), extra=extra)
    source = pretrained.tokenizer_dir(args.src) or pretrained.tokenizer_dir(args.src, pretrained.TOKENIZER_FILES)
    copied = pretrained.copy_tokenizer_files(source, args.dst) if source else []
    print(f"wrote {args.dst} (LlamaForCausalLM)" + (f", copied {', '.join(copied)} from {source}" if copied else
                                                    ", no tokenizer found in the checkpoint's lineage"))


def moba_settings(path: str, config_path, n_layers: int) -> dict:
    """The attention a trainer checkpoint was last trained with, as the `moba_*` config.json keys of
    `moba_train.hf.register_moba`: the HF model then runs the blocks and hybrid layers it learned."""
    if not pretrained.is_dcp_dir(path):
        return {}  # consolidated dirs carry weights only
    try:
        run = pretrained.read_run_config(config_path or find_run_config(path))
    except UserError as e:
        print(f"note: no moba_* settings written ({e})")
        return {}
    known = {f.name for f in dataclasses.fields(AttentionConfig)}
    attn = AttentionConfig(**{k: v for k, v in (run.get("attention") or {}).items() if k in known})
    steps = int((run.get("train") or {}).get("steps", 0))
    kinds = AttentionSchedule(attn, n_layers, steps).kinds_saved_at(pretrained.checkpoint_step(path))
    n_full = next((i for i, kind in enumerate(reversed(kinds)) if kind != "full"), n_layers)
    if n_full == n_layers:
        print("note: the checkpoint was last trained with full attention in every layer (attn_implementation="
              "\"sdpa\" runs it so); the moba_* settings describe its MoBA layers")
        n_full = 0
    elif "full" in kinds[:n_layers - n_full]:
        print(f"warning: layer kinds {describe(kinds)} are not MoBA followed by full layers; "
              f"moba_full_attn_last_k={n_full} covers only the last ones")
    return {"moba_block_size": attn.block_size, "moba_top_k": attn.top_k, "moba_full_attn_last_k": n_full}


def find_run_config(path: str) -> str:
    """The config a DCP checkpoint was trained with: its own config.yaml, or for checkpoints written before they
    carried one, the Hydra config of the run above it (<run>/.hydra/config.yaml, which a later launch in that
    out_dir rewrites)."""
    if os.path.isfile(os.path.join(path, pretrained.RUN_CONFIG)):
        return os.path.join(path, pretrained.RUN_CONFIG)
    here = os.path.abspath(path)
    for _ in range(4):
        candidate = os.path.join(here, ".hydra", "config.yaml")
        if os.path.isfile(candidate):
            return candidate
        here = os.path.dirname(here)
    raise UserError(f"{path}: a DCP checkpoint carries no model config and no .hydra/config.yaml was found above "
                    "it; give --config <run>/.hydra/config.yaml")


def load_ours(path: str, dtype, config_path):
    if os.path.isdir(path) and pretrained.is_dcp_dir(path):  # a trainer checkpoint
        from moba_train.model.dcp_import import load_dcp_model

        recorded = None if config_path else pretrained.recorded_model_config(path)
        if recorded is not None:
            cfg = recorded[1]
        else:  # --config, or a run that recorded neither: its Hydra config
            cfg = pretrained.model_config_from_run(config_path or find_run_config(path))
        cfg.init_from = None
        return load_dcp_model(path, cfg, AttentionConfig(kind="full"), "cpu")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
        raise UserError(f"{path}: no {hf.CONFIG_FILE}; ours-to-hf takes a consolidated moba-train dir (config.json + "
                        "model.safetensors) or a trainer DCP checkpoint dir (<run>/checkpoints/step_N)")
    if pretrained.checkpoint_kind(path) != "ours":
        raise UserError(f"{os.path.join(path, hf.CONFIG_FILE)}: this is a HF checkpoint already; "
                        "use hf-to-ours to import it")
    return pretrained.load_consolidated(path, dtype=dtype or "auto")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-ours", help="HF Llama dir -> consolidated moba-train checkpoint dir")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (default: as stored)")
    a.set_defaults(fn=hf_to_ours)
    b = sub.add_parser("ours-to-hf", help="consolidated or DCP moba-train checkpoint -> HF Llama dir")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="split the safetensors above this size")
    b.add_argument("--config", default=None, help="for a DCP dir: the run's config (yaml/json with model: ...)")
    b.set_defaults(fn=ours_to_hf)
    args = parser.parse_args(argv)
    try:
        if os.path.abspath(args.src) == os.path.abspath(args.dst):
            raise UserError(f"{args.dst}: output dir must differ from the input dir")
        if os.path.exists(args.dst) and not os.path.isdir(args.dst):
            raise UserError(f"{args.dst}: exists and is not a directory; give a new or existing output dir")
        args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
