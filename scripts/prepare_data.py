r"""Tokenize text into a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`) for `data=megatron`.

    python scripts/prepare_data.py --input corpus.jsonl more/*.txt --output-prefix data/corpus \
        [--tokenizer byte | /path/to/hf_tokenizer_dir] [--json-key text] [--workers 4]

Inputs: `.jsonl` / `.json` files hold one JSON object per line with the text under `--json-key`; any other
file is one plain-text document; `.gz` files are decompressed (`x.jsonl.gz` is JSON Lines, `x.txt.gz` text).
A directory stands for the files in it (sorted, recursively; hidden files and directories skipped). Binary
files (a NUL byte near the start, or .parquet/.arrow/.bin/.idx/.zst/.bz2/.xz/.zip) are refused, and so is text
that is not UTF-8 (naming the file and line). Every document is tokenized without special tokens and ends with
the tokenizer's end-of-document token; empty documents are skipped. Writing uses megatron-core's
IndexedDatasetBuilder, so Megatron-LM reads the result too. `<prefix>.json` records the tokenizer (training
checks it against `data.megatron.tokenizer`). Outputs appear only when complete (written under temporary names,
then renamed).
"""

import argparse
import codecs
import gzip
import json
import os
import sys
import warnings
from multiprocessing import Pool
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moba_train.data.jsonl import json_lines, not_utf8  # noqa: E402
from moba_train.data.tokenizer import load_tokenizer  # noqa: E402
from moba_train.errors import UserError, one_line_errors  # noqa: E402

JSON_SUFFIXES = (".jsonl", ".json")
BINARY_SUFFIXES = (".parquet", ".arrow", ".bin", ".idx", ".zst", ".bz2", ".xz", ".zip")
SNIFF_BYTES = 8192


def input_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache: not corpus data
                files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]  # .DS_Store
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such input file or directory")
    return files


def open_input(file: str, mode: str = "rt", **kwargs):
    """The file, decompressed when it ends in .gz."""
    return (gzip.open if file.endswith(".gz") else open)(file, mode, **kwargs)


def is_json(file: str) -> bool:
    return file.removesuffix(".gz").endswith(JSON_SUFFIXES)


def check_input(file: str) -> None:
    """Refuse, naming the file, input that would be tokenized as garbage: binary data or a JSON array."""
    if file.removesuffix(".gz").endswith(BINARY_SUFFIXES):
        raise UserError(f"{file}: binary input (by its suffix); give text, JSON Lines or their .gz")
    try:
        with open_input(file, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{file}: unreadable ({e})") from None
    if b"\0" in head:
        raise UserError(f"{file}: binary input (NUL bytes); give text, JSON Lines or their .gz")
    if is_json(file) and head.lstrip().startswith(b"["):
        raise UserError(f"{file}: a JSON array; expected JSON Lines (one object per line, text under --json-key)")
    try:  # the common case of another encoding, found before a long run; documents() checks the rest
        codecs.getincrementaldecoder("utf-8")().decode(head)  # not final: a character cut at the end is fine
    except UnicodeDecodeError as e:
        raise not_utf8(file, head.count(b"\n", 0, e.start) + 1) from None


def documents(files: list[str], json_key: str) -> Iterator[str]:
    for file in files:
        if not is_json(file):
            with open_input(file, encoding="utf-8", newline="") as f:  # line endings as written
                try:
                    text = f.read()
                except UnicodeDecodeError as e:  # read() decodes the whole file at once: e.object is all of it
                    raise not_utf8(file, e.object.count(b"\n", 0, e.start) + 1) from None
            yield text
            continue
        with open_input(file, "rb") as f:
            for lineno, obj in json_lines(f, file):
                if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                    raise UserError(f"{file}:{lineno}: no string field {json_key!r} (--json-key)")
                yield obj[json_key]


_tokenizer = None


def _init_worker(spec: str) -> None:
    global _tokenizer
    _tokenizer = load_tokenizer(spec)


def _encode(text: str) -> list[int]:
    return _tokenizer.encode(text)


def prepare(inputs: list[str], output_prefix: str, tokenizer: str = "byte", json_key: str = "text",
            workers: int = 1, progress: bool = True) -> dict:
    """Write `<output_prefix>.bin/.idx/.json`; returns the summary written to the .json file."""
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    if not os.path.basename(output_prefix) or os.path.isdir(output_prefix):
        raise UserError(f"--output-prefix {output_prefix}: names a directory; give a file name prefix in it, e.g. "
                        f"{os.path.join(output_prefix, 'corpus')}")
    with warnings.catch_warnings():  # megatron.core warns about missing optional GPU packages on import
        warnings.simplefilter("ignore")
        import torch
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_tokenizer(tokenizer)
    files = input_files(inputs)
    for file in files:  # before tokenizing: a bad file late in the list should not cost a long run
        check_input(file)
    dtype = DType.optimal_dtype(tok.vocab_size)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
        open(tmp + ".bin", "wb").close()  # writable: fail before tokenizing
    except OSError as e:
        raise UserError(f"--output-prefix {output_prefix}: cannot write there ({e.strerror or e})") from None
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_tokens = n_empty = 0
    pool = Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    try:
        if pool is None:
            encoded = map(tok.encode, documents(files, json_key))
        else:
            encoded = pool.imap(_encode, documents(files, json_key), chunksize=16)
        for ids in tqdm(encoded, desc="tokenize", unit="doc", disable=not progress):
            if not ids:
                n_empty += 1
                continue
            builder.add_item(torch.from_numpy(np.asarray(ids + [tok.eod], dtype=np.int64)))
            builder.end_document()
            n_docs += 1
            n_tokens += len(ids) + 1
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if n_docs == 0:
        for suffix in (".bin", ".idx"):
            os.remove(tmp + suffix)
        raise UserError(f"no non-empty documents in {inputs}")
    summary = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eod": tok.eod, "documents": n_docs,
               "tokens": n_tokens, "skipped_empty": n_empty, "dtype": np.dtype(dtype).name}
    with open(tmp + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    for suffix in (".bin", ".idx", ".json"):
        os.replace(tmp + suffix, output_prefix + suffix)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL / text files or directories")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, <prefix>.idx, <prefix>.json")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local HF tokenizer dir / tokenizer.json")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    with one_line_errors():  # Ctrl-C too: prepare removes its partial files, then one line
        summary = prepare(args.input, args.output_prefix, args.tokenizer, args.json_key, args.workers)
    print(f"{args.output_prefix}: {summary['documents']} documents, {summary['tokens']} tokens "
          f"({summary['skipped_empty']} empty skipped)")


if __name__ == "__main__":
    main()
