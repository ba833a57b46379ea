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


def test_text_keeps_its_line_endings(tmp_path):
    """Plain text is stored byte for byte, as JSON Lines text is (universal newlines turned \r\n and \r into \n)."""
    text = "line one\r\nline two\rline three\n"
    (tmp_path / "t.txt").write_bytes(text.encode())
    prefix = str(tmp_path / "data")
    prepare_data.prepare([str(tmp_path / "t.txt")], prefix, workers=1, progress=False)
    ds = indexed_dataset(prefix)  # held: its memory map must outlive the row read from it
    assert ds[0].tolist() == load_tokenizer("byte").encode(text) + [BYTE_EOS]


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


@pytest.mark.parametrize("workers", [1, 2])
def test_text_that_is_not_utf8_is_refused_by_file_and_line(tmp_path, workers):
    """Within the first 8 KB (found before tokenizing) and past it (found while reading), with worker processes."""
    ok = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(1000)).encode()
    late = tmp_path / "late.jsonl"
    late.write_bytes(ok + '{"text": "café"}\n'.encode("latin-1"))
    late_text = tmp_path / "late.txt"
    late_text.write_bytes(b"x" * 9000 + b"\nline 2\n" + "café".encode("latin-1"))
    early = tmp_path / "early.txt"
    early.write_bytes("first line\ncafé".encode("latin-1"))
    for path, line in ((late, 1001), (late_text, 3), (early, 2)):
        with pytest.raises(UserError, match=rf"{path.name}:{line}: not UTF-8 text"):
            prepare_data.prepare([str(path)], str(tmp_path / "data"), workers=workers, progress=False)
    assert not list(tmp_path.glob("data*"))


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers 0: must be >= 1"),
    (["--output-prefix", "out/"], "--output-prefix out/: names a directory"),
    (["--output-prefix", "."], "--output-prefix .: names a directory"),
    (["--output-prefix", "a.txt/data"], "--output-prefix a.txt/data: cannot write there"),  # was a traceback
])
def test_script_refuses_bad_workers_and_prefix(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--input", "a.txt", "--output-prefix", "data", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
