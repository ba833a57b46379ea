"""prepare_data.py inputs: hidden files skipped, .gz decompressed, binary and JSON-array inputs refused by name."""

import gzip
import json

import pytest

from moba_train.data.tokenizer import BYTE_EOS, load_tokenizer
from moba_train.errors import UserError

from test_data_megatron import indexed_dataset, prepare_data


def test_directory_skips_hidden_files_and_reads_gzip(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / ".cache").mkdir(parents=True)
    (corpus / ".cache" / "notes.txt").write_text("hidden directory")
    (corpus / ".DS_Store").write_bytes(b"Bud1\x00\x00\x00\x01binary")
    (corpus / "a.txt").write_text("plain text")
    with gzip.open(corpus / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "first line"}) + "\n" + json.dumps({"text": "second line"}) + "\n")
    with gzip.open(corpus / "c.txt.gz", "wt") as f:
        f.write("gzipped text ✓")
    prefix = str(tmp_path / "data")
    summary = prepare_data.prepare([str(corpus)], prefix, workers=1, progress=False)
    texts = ["plain text", "first line", "second line", "gzipped text ✓"]
    assert summary["documents"] == len(texts)
    tok = load_tokenizer("byte")
    ds = indexed_dataset(prefix)
    assert [ds[i].tolist() for i in range(len(texts))] == [tok.encode(t) + [BYTE_EOS] for t in texts]


@pytest.mark.parametrize("name, content, message", [
    ("blob.dat", b"text\x00more", "binary"),
    ("shard.parquet", b"PAR1 looks like text", "binary"),
    ("archive.txt.gz", gzip.compress(b"\x00\x01\x02"), "binary"),
    ("rows.json", b' [{"text": "a"},\n {"text": "b"}]', "JSON Lines"),
])
def test_unusable_inputs_are_refused_by_name(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=rf"{name}: .*{message}"):
        prepare_data.prepare([str(tmp_path / name)], str(tmp_path / "data"), workers=1, progress=False)
    assert not list(tmp_path.glob("data*"))  # nothing written


def test_script_reports_binary_input_in_one_line(tmp_path, capsys):
    (tmp_path / "x.bin").write_bytes(b"\x01\x02")
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--input", str(tmp_path / "x.bin"), "--output-prefix", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'x.bin'}: ")
