r"""Generate with a local Hugging Face causal LM using MoBA attention (or sdpa), timing prefill and decode.

    PYTHONPATH=$PWD python scripts/hf_generate.py --model /path/to/llama --attn moba --max-new-tokens 64 \
        --prompt-tokens 32768 --block-size 4096 --top-k 12

Without --prompt/--prompt-file the prompt is a long filler text with a "pass key" hidden in it and a question
at the end (a quick needle check). Decoding is greedy; MoBA decode is gated unless --full-decode.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
# MoBA settings given by flags, else by the model config's moba_* keys, else these defaults
MOBA_DEFAULTS = {"block_size": 4096, "top_k": 12, "full_attn_last_k": 0}


def fail(message: str) -> None:
    raise SystemExit(f"hf_generate: error: {message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (config.json, weights, tokenizer)")
    p.add_argument("--attn", default="moba", choices=["moba", "moba_naive", "sdpa"])
    p.add_argument("--max-new-tokens", type=int, default=32, help="at least 1")
    p.add_argument("--prompt", help="prompt text (default: filler text with a hidden pass key)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--prompt-tokens", type=int, default=8192, help="length of the default prompt, in tokens")
    p.add_argument("--block-size", type=int, default=None,
                   help="default: the model's moba_block_size (ours-to-hf writes it), else 4096")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's moba_top_k, else 12")
    p.add_argument("--backend", default="auto", help="MoBA op backend for prefill: auto | naive | varlen | triton")
    p.add_argument("--full-attn-last-k", type=int, default=None,
                   help="the last N layers use full attention (default: the model's moba_full_attn_last_k, else 0)")
    p.add_argument("--full-decode", action="store_true", help="decode with full attention (reference behaviour)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def check_not_moba_train_checkpoint(path: Path) -> None:
    """Our checkpoints (what model.init_from takes: consolidated dirs, trainer DCP checkpoints and the run dirs
    holding them) are not HF models; say how to convert one."""
    from moba_train.errors import UserError
    from moba_train.model.pretrained import checkpoint_kind, find_checkpoint, is_dcp_dir

    try:
        checkpoint = find_checkpoint(str(path))  # a run dir -> its newest DCP checkpoint
    except UserError:  # none of ours: check_model_dir says what a HF model dir needs
        return
    try:
        ours = is_dcp_dir(checkpoint) or checkpoint_kind(checkpoint) == "ours"
    except UserError as err:  # config.json is not valid JSON
        fail(str(err))
    if ours:
        kind = "checkpoint" if checkpoint == str(path) else "run dir"
        fail(f"{path} is a moba-train {kind}, not a HF model; convert it first: "
             f"python scripts/convert_hf.py ours-to-hf {checkpoint} DST")


def check_model_dir(path: Path):
    """The model's config, or a clear error for a missing directory or an architecture we cannot run."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    check_not_moba_train_checkpoint(path)
    if not (path / "config.json").is_file():
        fail(f"no model at {path} (expected a local directory with config.json and weights)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except ValueError as err:  # e.g. an unknown model_type; transformers explains on several lines
        fail(f"cannot read the model config in {path}: {str(err).splitlines()[0]}")
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        fail(f"{path} holds a {config.model_type!r} model, which is not a causal (decoder-only) language model")
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if encoder or getattr(config, "is_causal", True) is False:
        fail(f"{path} holds a non-causal {config.model_type!r} model; MoBA is causal attention")
    return config


def check_moba_support(config) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True):
        fail(f"{config.model_type!r} uses sliding-window attention, which MoBA does not model; use --attn sdpa")
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        fail(f"{config.model_type!r} mixes attention kinds {sorted(kinds)}; only full-attention layers can be MoBA")


def prompt_text(args: argparse.Namespace) -> str | None:
    """The text of --prompt-file or --prompt; None for the default prompt."""
    if args.prompt_file is None:
        source, text = "--prompt", args.prompt
    else:
        source = f"--prompt-file {args.prompt_file}"
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as err:
            fail(f"{source}: cannot read it ({err.strerror})")
        except UnicodeDecodeError as err:
            fail(f"{source}: not UTF-8 text (byte {err.start}); convert it to UTF-8")
    if text == "":  # a mistake, not a request for the default prompt
        fail(f"{source} is empty; give some text, or neither flag for the default pass-key prompt")
    return text


def build_prompt(tokenizer, user_prompt: str | None, prompt_tokens: int) -> list[int]:
    if user_prompt is not None:
        return tokenizer(user_prompt)["input_ids"]
    filler = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=71432), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    head = tokenizer("", add_special_tokens=True)["input_ids"]
    body = max(0, prompt_tokens - len(head) - len(needle) - len(question))
    text = (filler * (body // max(1, len(filler)) + 1))[:body]
    cut = int(len(text) * 0.37)
    return head + text[:cut] + needle + text[cut:] + question


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    if args.max_new_tokens < 1:
        fail("--max-new-tokens must be >= 1")
    if args.prompt_tokens < 1:
        fail("--prompt-tokens must be >= 1")
    from moba_train.device import device_arg
    from moba_train.errors import UserError

    try:
        device_arg(args.device)
    except UserError as err:
        fail(str(err))
    user_prompt = prompt_text(args)
    path = Path(args.model).expanduser()
    config = check_model_dir(path)
    if args.attn != "sdpa":
        check_moba_support(config)
        from moba_train.hf import register_moba

        for flag, default in MOBA_DEFAULTS.items():
            if getattr(args, flag) is None:  # what the model was trained with, as its config records it
                setattr(args, flag, getattr(config, f"moba_{flag}", None) or default)
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        if args.full_attn_last_k > n_layers:
            fail(f"--full-attn-last-k {args.full_attn_last_k}: the model has only {n_layers} layers")
        try:
            register_moba(args.block_size, args.top_k, args.backend, args.full_attn_last_k, args.full_decode)
        except ValueError as err:  # the settings' own check, naming the bad value
            fail(f"MoBA settings (--block-size, --top-k, --backend, --full-attn-last-k): {err}")
    from moba_train.model.pretrained import TOKENIZER_MARKS

    if not any((path / name).is_file() for name in TOKENIZER_MARKS):  # transformers would blame sentencepiece
        fail(f"{path}: no tokenizer ({', '.join(TOKENIZER_MARKS)}); copy the tokenizer files of the model it came "
             "from into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        fail(f"no usable tokenizer in {path}: {err}")
    prompt = build_prompt(tokenizer, user_prompt, args.prompt_tokens)
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if context is not None and len(prompt) + args.max_new_tokens > context:
        fail(f"prompt ({len(prompt)} tokens) + {args.max_new_tokens} new tokens exceed the model's context of "
             f"{context} tokens")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=args.attn, dtype=dtype,
                                                     local_files_only=True).to(args.device).eval()
    except (OSError, ValueError) as err:  # OSError: no weights file
        fail(f"cannot load {path} with attn_implementation={args.attn!r}: {err}")

    if args.attn != "sdpa":  # config keys win over registered settings: set them to the effective ones
        for flag in (*MOBA_DEFAULTS, "backend", "full_decode"):
            setattr(model.config, f"moba_{flag}", getattr(args, flag))
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    if args.attn != "sdpa" and not attention:
        fail(f"{type(model).__name__} has no attention modules that use transformers' attention interface")
    if not all(m.is_causal for m in attention):
        fail(f"{type(model).__name__} has non-causal attention layers; MoBA is causal attention")

    ids = torch.tensor([prompt], device=args.device)
    cache = DynamicCache(config=model.config)
    sync(args.device)
    start = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    sync(args.device)
    prefill_s = time.perf_counter() - start
    new: list[int] = []
    steps = 0
    start = time.perf_counter()
    while True:
        token = int(logits[0, -1].argmax())
        new.append(token)
        if len(new) >= args.max_new_tokens or token == tokenizer.eos_token_id:
            break
        logits = model(torch.tensor([[token]], device=args.device), past_key_values=cache, use_cache=True).logits
        steps += 1
    sync(args.device)
    decode_s = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    result = dict(attn=args.attn, prompt_tokens=len(prompt), new_tokens=len(new), prefill_s=prefill_s,
                  decode_s=decode_s, decode_ms_per_token=1e3 * decode_s / max(1, steps), text=text)
    moba = "" if args.attn == "sdpa" else (f" | block_size {args.block_size} top_k {args.top_k}"
                                           f"{' | full decode' if args.full_decode else ''}")
    print(f"--- {args.attn} | prompt {len(prompt)} tokens{moba}")
    print(text)
    print(f"--- prefill {prefill_s:.3f} s ({len(prompt) / prefill_s:.0f} tok/s) | decode {steps} steps "
          f"{decode_s:.3f} s ({result['decode_ms_per_token']:.1f} ms/token)")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
