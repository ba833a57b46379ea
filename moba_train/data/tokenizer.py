"""Tokenizers for data preparation and training: the byte-level default or a local HF `tokenizer.json`.

    tok = load_tokenizer("byte")              # bytes 0..255 + BOS 256, EOS 257, PAD 258, SEP 259 (vocab 260)
    tok = load_tokenizer("/path/to/hf_dir")   # a directory with tokenizer.json (or the file itself)
    ids = tok.encode("text")                  # no special tokens added
    tok.eod, tok.pad, tok.bos, tok.vocab_size, tok.name

`tok.eod` ends every document in prepared datasets. `pad` is None when the tokenizer has none.
The byte vocabulary is the one of moba_train.data.synthetic (and the SFT byte template).
"""

import json
import os
from typing import Optional

from moba_train.errors import UserError

BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_SEP = 256, 257, 258, 259
BYTE_VOCAB = 260

# eos names, tried in order when tokenizer_config.json does not name one
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


class ByteTokenizer:
    name = "byte"
    vocab_size = BYTE_VOCAB
    bos, eod, pad = BYTE_BOS, BYTE_EOS, BYTE_PAD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _token_name(entry) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


class HFTokenizer:
    """A fast HF tokenizer read from a local tokenizer.json (with tokenizer_config.json beside it, if any)."""

    def __init__(self, path: str):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise UserError(f"{file}: no such tokenizer file (give 'byte' or a directory with tokenizer.json)")
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception for malformed JSON
            raise UserError(f"{file}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
        # documents are text: "<|end_of_text|>" written in one is those characters, not the end of a document (the
        # eod id is appended by the caller); nor would a pad id then occur in the data, where megatron-core drops it
        self.tok.encode_special_tokens = True
        self.name = os.path.abspath(file)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = {}
        config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        self.bos = self._id(_token_name(config.get("bos_token")))
        names = [_token_name(config.get("eos_token"))] + list(EOS_NAMES)
        self.eod = next((i for i in map(self._id, names) if i is not None), None)
        if self.eod is None:
            raise UserError(f"{file}: no end-of-document token found (set eos_token in tokenizer_config.json)")
        self.pad = self._id(_token_name(config.get("pad_token")))
        if self.pad == self.eod:
            self.pad = None

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def check_vocab(what: str, tokens: int, vocab_size: Optional[int]) -> None:
    """A tokenizer must fit the model's embedding (vocab_size None: not known yet, nothing to check)."""
    if vocab_size is not None and tokens > vocab_size:
        raise UserError(f"{what} has {tokens} tokens but model.vocab_size={vocab_size}")


def load_tokenizer(spec: Optional[str]):
    """'byte' (or empty) -> ByteTokenizer; anything else is a local tokenizer directory or tokenizer.json."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec)


class MegatronTokenizerView:
    """The few attributes megatron-core's GPTDataset reads from its `tokenizer` argument."""

    def __init__(self, tok):
        self.eod = tok.eod
        self.pad = -1 if tok.pad is None else tok.pad  # -1 never occurs in data: nothing is masked as pad
        self.vocab_size = tok.vocab_size
        self.unique_identifiers = {"name": tok.name, "vocab_size": tok.vocab_size, "eod": tok.eod}
