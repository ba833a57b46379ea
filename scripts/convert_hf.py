"""Convert between Hugging Face Llama checkpoints and moba-train consolidated checkpoints.

    python scripts/convert_hf.py hf-to-ours  HF_DIR   OUT_DIR [--dtype float32|bfloat16|auto]
    python scripts/convert_hf.py ours-to-hf  CKPT_DIR OUT_DIR [--dtype bfloat16] [--max-shard-gb 5]

CKPT_DIR is a consolidated moba-train dir (config.json + model.safetensors, what hf-to-ours writes) or a
trainer DCP checkpoint dir; its architecture is the run's model_config.json (<run>/checkpoints/step_N), or
--config FILE (a yaml/json with a model: section, e.g. <run>/.hydra/config.yaml) for older runs.
Tokenizer files found next to the weights are copied along. Bad input exits with status 2 and one line.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_train.errors import UserError  # noqa: E402
from moba_train.model import hf, pretrained  # noqa: E402


def hf_to_ours(args: argparse.Namespace) -> None:
    model = hf.from_hf(args.src, dtype=args.dtype or "auto")
    pretrained.save_consolidated(model, args.dst)
    copied = pretrained.copy_tokenizer_files(args.src, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n / 1e6:.1f}M parameters, {model.cfg.n_layers} layers, dtype "
          f"{model.embed_tokens.weight.dtype}" + (f", copied {', '.join(copied)}" if copied else ""))


def ours_to_hf(args: argparse.Namespace) -> None:
    model = load_ours(args.src, args.dtype, args.config)
    hf.to_hf(model, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    copied = pretrained.copy_tokenizer_files(args.src, args.dst)
    print(f"wrote {args.dst} (LlamaForCausalLM)" + (f", copied {', '.join(copied)}" if copied else ""))


def find_run_config(path: str) -> str:
    """The Hydra config of the run that wrote a DCP checkpoint: <run>/.hydra/config.yaml above it."""
    here = os.path.abspath(path)
    for _ in range(4):
        candidate = os.path.join(here, ".hydra", "config.yaml")
        if os.path.isfile(candidate):
            return candidate
        here = os.path.dirname(here)
    raise UserError(f"{path}: a DCP checkpoint carries no model config and no .hydra/config.yaml was found above "
                    "it; give --config <run>/.hydra/config.yaml")


def model_config_from_run(config_path: str):
    import dataclasses

    from omegaconf import OmegaConf

    from moba_train.model import ModelConfig

    if not os.path.isfile(config_path):
        raise UserError(f"{config_path}: no such config file (--config)")
    model = OmegaConf.to_container(OmegaConf.load(config_path)).get("model")
    if not isinstance(model, dict):
        raise UserError(f"{config_path}: no 'model:' section")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise UserError(f"{config_path}: unknown model keys {unknown}")
    return ModelConfig(**model)


def load_ours(path: str, dtype, config_path):
    if os.path.isdir(path) and pretrained.is_dcp_dir(path):  # a trainer checkpoint
        from moba_train.model import AttentionConfig
        from moba_train.model.dcp_import import load_dcp_model

        run_dir = pretrained.find_run_model_config(path)
        if config_path is None and run_dir is not None:  # the architecture the run recorded
            cfg = pretrained.read_config(run_dir, pretrained.RUN_MODEL_CONFIG)
        else:
            cfg = model_config_from_run(config_path or find_run_config(path))
        cfg.init_from = None
        return load_dcp_model(path, cfg, AttentionConfig(kind="full"), "cpu")
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
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        print(f"error: {args.dst}: output dir must differ from the input dir", file=sys.stderr)
        return 2
    try:
        args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
