"""hf_generate.py refuses model dirs transformers cannot read with one line instead of a traceback."""

import json

import pytest

from test_hf_attention import load_script

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
