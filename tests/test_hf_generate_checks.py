"""hf_generate.py and convert_hf.py refuse bad input (model dirs, flags, files) with one line, not a traceback."""

import json
import re

import pytest
import torch

from test_hf_attention import hf_model, load_script
from test_hf_interop import convert_script, make_hf

ARGS = ["--max-new-tokens", "1", "--device", "cpu"]


def test_moba_train_checkpoint_asks_for_conversion(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "moba-train", "version": 1, "model": {}}))
    with pytest.raises(SystemExit, match=rf"convert_hf\.py ours-to-hf {tmp_path} ") as exit_info:
        load_script().main(["--model", str(tmp_path), *ARGS])
    assert "\n" not in str(exit_info.value)


def test_unreadable_config_fails_cleanly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(SystemExit, match=rf"hf_generate: error: .*{tmp_path}.*no_such_architecture") as exit_info:
        load_script().main(["--model", str(tmp_path), *ARGS])
    assert "\n" not in str(exit_info.value)


def test_run_and_dcp_dirs_ask_for_conversion(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000002"  # a published trainer checkpoint: DCP + manifest
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (step / "manifest.json").write_text("{}")
    for given in (step, tmp_path / "run"):
        with pytest.raises(SystemExit, match=rf"{given} is a moba-train .*convert_hf\.py ours-to-hf {step} DST"):
            load_script().main(["--model", str(given), *ARGS])


@pytest.fixture
def llama_dir(tmp_path):
    """A Llama config.json: enough for the checks made before weights and tokenizer load."""
    hf_model("sdpa").config.save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "0"], "block_size=0 must be an integer >= 1"),
    (["--top-k", "0"], "top_k=0 must be an integer >= 1"),
    (["--backend", "foo"], "backend='foo' is not one of"),
    (["--full-attn-last-k", "-1"], "full_attn_last_k=-1 must be an integer >= 0"),
    (["--full-attn-last-k", "3"], "--full-attn-last-k 3: the model has only 2 layers"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt-file", "missing.txt"], "--prompt-file missing.txt: cannot read it"),
    (["--prompt-file", "latin1.txt"], "--prompt-file latin1.txt: not UTF-8 text"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["--device", "tpu"], "--device tpu: not a device name"),
    pytest.param(["--device", "cuda"], "--device cuda: 0 CUDA GPUs visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")),
])
def test_bad_flags_fail_cleanly(llama_dir, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(SystemExit, match=rf"hf_generate: error: .*{re.escape(message)}") as exit_info:
        load_script().main(["--model", llama_dir, *ARGS, *flags])
    assert "\n" not in str(exit_info.value)


def test_a_model_dir_without_a_tokenizer_says_so(llama_dir):
    """transformers' own message blamed a missing sentencepiece or tiktoken install."""
    with pytest.raises(SystemExit, match=rf"hf_generate: error: {re.escape(llama_dir)}: no tokenizer \(tokenizer.json, "
                                         r"tokenizer_config.json, tokenizer.model\)") as exit_info:
        load_script().main(["--model", llama_dir, *ARGS])
    assert "\n" not in str(exit_info.value)

@pytest.fixture(scope="module")
def convert_inputs(tmp_path_factory):
    """A tiny HF Llama dir, its moba-train copy, a DCP checkpoint dir of a run that recorded no architecture,
    a run dir without checkpoints, a broken yaml and a plain file."""
    root = tmp_path_factory.mktemp("convert")
    _, hf_dir = make_hf(root)
    assert convert_script().main(["hf-to-ours", hf_dir, str(root / "ours")]) == 0
    (root / "step_00000002").mkdir()
    (root / "step_00000002" / ".metadata").write_bytes(b"")
    (root / "run").mkdir()
    (root / "bad.yaml").write_text("model: {dim: [\n")
    (root / "out.txt").write_text("")
    return root


@pytest.mark.parametrize("argv, message", [
    (["hf-to-ours", "hf", "out.txt"], "out.txt: exists and is not a directory"),
    (["ours-to-hf", "ours", "out.txt"], "out.txt: exists and is not a directory"),
    (["ours-to-hf", "ours", "new", "--max-shard-gb", "0"], "--max-shard-gb 0.0: must be > 0"),
    (["ours-to-hf", "step_00000002", "new", "--config", "bad.yaml"], "bad.yaml: not valid YAML or JSON (while parsing"),
    (["ours-to-hf", "run", "new"], "run: no config.json; ours-to-hf takes a consolidated moba-train dir "
     "(config.json + model.safetensors) or a trainer DCP checkpoint dir"),
])
def test_convert_refuses_bad_output_and_options(convert_inputs, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(convert_inputs)
    assert convert_script().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (convert_inputs / "new").exists()
