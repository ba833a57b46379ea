"""Supervised fine-tuning data: chat JSONL -> token ids with an assistant-only loss mask, packed with cu_seqlens.

Input, one JSON object per line:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..." (optional)}
`data.path=builtin:long_qa` is an embedded synthetic long-context question-answering set (no download).

Templates: a local HF tokenizer (`data.sft.tokenizer=/dir`) renders with its chat template; the default
`byte` tokenizer uses a built-in template over the 260-token byte vocabulary of the synthetic tasks.
Loss falls only on the assistant turns' tokens plus their end-of-turn token; headers, system and user
turns carry no loss. Several conversations are packed into one `data.seq_len` row: each is its own document
in `cu_seqlens` (no attention across them; the model restarts positions at each); the tail is padding, a
document of its own without loss. Conversations longer than `data.seq_len` are dropped or truncated (`data.sft.overlength`),
with counts in the log.
"""

import logging
import os
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from moba_train.data.config import DataConfig
from moba_train.data.jsonl import json_lines
from moba_train.data.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_SEP, BYTE_VOCAB, check_vocab
from moba_train.model.pretrained import tokenizer_dir
from moba_train.errors import ConfigError, UserError
from moba_train.model.llama import IGNORE_INDEX

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
OVERLENGTH = ("drop", "truncate")
BUILTIN_PREFIX = "builtin:"
# the byte vocabulary (moba_train.data.tokenizer): bytes 0..255, then BOS, EOS (our end of turn), PAD, SEP (header)
BOS, EOT, PAD, HEADER = BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_SEP


def check_sft_config(cfg) -> None:
    """What launch/sft.py needs beyond the schema: a checkpoint to start from and SFT data."""
    if not cfg.model.init_from:
        raise ConfigError("SFT starts from a checkpoint: give model.init_from=<HF Llama dir, moba-train "
                          "checkpoint dir or run dir>")
    if cfg.data.name != "sft":
        raise ConfigError(f"data.name={cfg.data.name!r}: launch/sft.py trains on data.name=sft")


class SFTDataError(UserError):
    """A bad SFT sample, file or template; the message names the file (and line)."""


# ------------------------------------------------------------------------------------------ reading


def normalize(obj: Any, where: str) -> list[dict[str, str]]:
    """A sample (chat or prompt/response) -> a validated list of {role, content} messages."""
    if not isinstance(obj, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
    elif "prompt" in obj and "response" in obj:
        messages = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        raise SFTDataError(f"{where}: expected a 'messages' list or 'prompt' and 'response' keys, got keys "
                           f"{sorted(obj)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SFTDataError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SFTDataError(f"{where}: message {i} has role {m['role']!r}, not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise SFTDataError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(f"{where}: no assistant turn (nothing to train on)")
    return out


def read_jsonl(path: str) -> list[tuple[str, list[dict[str, str]]]]:
    """[(where, messages)] with where = 'file:line', for every non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise SFTDataError(f"{path}: no such SFT data file (data.path)")
    samples = []
    with open(path, "rb") as f:
        for lineno, obj in json_lines(f, path, SFTDataError):
            where = f"{path}:{lineno}"
            samples.append((where, normalize(obj, where)))
    if not samples:
        raise SFTDataError(f"{path}: no samples")
    return samples


# ------------------------------------------------------------------------------------------ templates


class ByteTemplate:
    """Built-in chat template over bytes: BOS, then per turn HEADER role '\\n' content EOT."""

    vocab_size = BYTE_VOCAB
    pad_id = PAD
    name = "byte"

    def encode(self, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[bool]]:
        ids, mask = [BOS], [False]
        for m in messages:
            header = [HEADER] + list(f"{m['role']}\n".encode())
            body = list(m["content"].encode("utf-8")) + [EOT]
            ids += header + body
            mask += [False] * len(header) + [m["role"] == "assistant"] * len(body)
        return ids, mask


REPLY_PROBE = "<moba-train reply probe>"  # stands in for a first reply, to find where a reply starts


class HFTemplate:
    """A local HF tokenizer and its chat template. Assistant spans come from rendering prefixes of the
    conversation: the text added by turn i after the generation prompt of turns < i (content + end of turn)."""

    name = "hf"

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise SFTDataError(f"{path}: no such tokenizer directory (data.sft.tokenizer: a local HF tokenizer dir "
                               "or byte)")
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises several kinds for a broken dir
            raise SFTDataError(f"{path}: cannot load a tokenizer for data.sft.tokenizer (give a local HF tokenizer "
                               f"dir or byte; {type(e).__name__}: {e})".splitlines()[0]) from None
        if not getattr(self.tok, "chat_template", None):
            raise SFTDataError(f"{path}: the tokenizer has no chat_template (tokenizer_config.json / "
                               "chat_template.jinja); use data.sft.tokenizer=byte for the built-in template")
        if not self.tok.is_fast:
            raise SFTDataError(f"{path}: a fast tokenizer (tokenizer.json) is needed for the assistant mask")
        self.path = path
        self.vocab_size = len(self.tok)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def _render(self, messages, where: str, generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() inside templates
            raise SFTDataError(f"{where}: chat template of {self.path} failed ({type(e).__name__}: {e})") from None

    def encode(self, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[bool]]:
        text = self._render(messages, where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i:
                before = self._render(messages[:i], where, generation_prompt=True)
            else:  # no empty conversation renders: what precedes a placeholder reply (BOS, header, default system)
                probe = self._render([{**m, "content": REPLY_PROBE}], where)
                before = probe[:probe.find(REPLY_PROBE)] if REPLY_PROBE in probe else None
            after = self._render(messages[:i + 1], where)
            if before is None or not (after.startswith(before) and text.startswith(after)):
                raise SFTDataError(f"{where}: chat template of {self.path} does not render turn {i} as an "
                                   "extension of the earlier turns; cannot locate the assistant tokens")
            spans.append((len(before), len(after)))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # a token is the assistant's if it overlaps a reply: byte-level BPE merges a generation prompt's trailing
        # space into the reply's first word (" the"), which a start-inside rule would never train
        mask = [any(start < hi and (end > lo if end > start else start >= lo) for lo, hi in spans)
                for start, end in offsets]
        return list(ids), mask


def build_template(spec: Optional[str]):
    """The byte template, or a HF tokenizer dir's. A checkpoint without a tokenizer (a run dir, a trainer
    checkpoint) takes the one of the checkpoint it descends from (recorded init_from links)."""
    if spec in (None, "", "byte"):
        return ByteTemplate()
    found = tokenizer_dir(spec)
    if found is None and os.path.isdir(spec):
        raise UserError(f"data.sft.tokenizer={spec}: no tokenizer there or in the checkpoints it descends from; set "
                        "data.sft.tokenizer=<HF tokenizer dir>, or byte for a byte-vocabulary model")
    return HFTemplate(found or spec)


# ------------------------------------------------------------------------------------------ synthetic set


def synthetic_long_qa(n: int, seed: int, seq_len: int = 4096) -> list[tuple[str, list]]:
    """Long-context QA chats: a user message lists many `record <id>: <value>` lines among filler, then asks
    for one or two records; the assistant answers with the values. Conversations take ~1/4 to ~all of
    `seq_len` byte tokens (a few are longer: over-length handling is exercised). Deterministic."""
    rng = np.random.default_rng(seed)
    records = (max(2, seq_len // 120), max(4, seq_len // 30))
    fillers = ["The archive was quiet today.", "Nothing else of note was filed.", "See the index for details.",
               "This line is padding.", "Clerks sorted the boxes again."]
    samples = []
    for i in range(n):
        count = int(rng.integers(*records))
        ids = rng.choice(10000, size=count, replace=False)
        values = rng.integers(100000, 999999, size=count)
        lines = []
        for rid, val in zip(ids, values):
            lines.append(f"record {rid}: {val}")
            if rng.random() < 0.3:
                lines.append(fillers[int(rng.integers(len(fillers)))])
        asked = rng.choice(count, size=1 + int(rng.random() < 0.3), replace=False)
        messages = [{"role": "system", "content": "Answer from the records."},
                    {"role": "user", "content": "\n".join(lines) + f"\n\nWhat is record {ids[asked[0]]}?"},
                    {"role": "assistant", "content": str(values[asked[0]])}]
        for a in asked[1:]:
            messages += [{"role": "user", "content": f"And record {ids[a]}?"},
                         {"role": "assistant", "content": str(values[a])}]
        samples.append((f"{BUILTIN_PREFIX}long_qa:{i}", messages))
    return samples


def load_samples(path: str, num_synthetic: int, seed: int, seq_len: int) -> list[tuple[str, list]]:
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name != "long_qa":
            raise SFTDataError(f"data.path={path!r}: unknown built-in SFT set (known: builtin:long_qa)")
        return synthetic_long_qa(num_synthetic, seed, seq_len)
    return read_jsonl(path)


# ------------------------------------------------------------------------------------------ packing


def to_example(ids: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels): label i is token i+1 where token i+1 is an assistant token; the last is ignored."""
    ids_a = np.asarray(ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    m = np.asarray(mask[1:], dtype=bool)
    labels[:-1][m] = ids_a[1:][m]
    return ids_a, labels


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Next-fit packing in the given order: each pack is a list of indices whose lengths sum to <= seq_len."""
    packs, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > seq_len:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


class SFTDataset:
    """Indexable packed SFT rows: {input_ids [S], labels [S], doc_lens [n_docs]}."""

    def __init__(self, cfg: DataConfig, seed: int, vocab_size: Optional[int] = None):
        sft = cfg.sft
        if sft.overlength not in OVERLENGTH:
            raise UserError(f"data.sft.overlength={sft.overlength!r} is not one of {OVERLENGTH}")
        self.seq_len = cfg.seq_len
        self.template = build_template(sft.tokenizer)
        check_vocab(f"tokenizer {sft.tokenizer!r}", self.template.vocab_size, vocab_size)
        samples = load_samples(cfg.path, sft.num_synthetic, seed, cfg.seq_len)
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        self.stats = {"samples": len(samples), "dropped_overlength": 0, "truncated": 0, "dropped_no_target": 0}
        other_rank = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0  # one bar per job
        for where, messages in tqdm(samples, desc="sft tokenize", unit="conversation", disable=other_rank):
            ids, mask = self.template.encode(messages, where)
            cut = len(ids) > self.seq_len
            if cut and sft.overlength == "drop":
                self.stats["dropped_overlength"] += 1
                continue
            if cut:
                ids, mask = ids[:self.seq_len], mask[:self.seq_len]
            if not any(mask[1:]):  # truncation cut every assistant token away
                self.stats["dropped_no_target"] += 1
                continue
            self.stats["truncated"] += cut
            self.examples.append(to_example(ids, mask))
        if not self.examples:
            raise SFTDataError(f"{cfg.path}: no sample left for data.seq_len={self.seq_len} ({self.stats})")
        order = np.random.default_rng(seed).permutation(len(self.examples)) if sft.shuffle else \
            np.arange(len(self.examples))
        lengths = [len(self.examples[i][0]) for i in order]
        self.packs = [[int(order[j]) for j in p] for p in (pack(lengths, self.seq_len) if sft.pack
                                                          else [[j] for j in range(len(order))])]
        self.stats.update(kept=len(self.examples), packs=len(self.packs),
                          target_tokens=int(sum((lab != IGNORE_INDEX).sum() for _, lab in self.examples)),
                          fill=round(sum(lengths) / (len(self.packs) * self.seq_len), 3))
        log.info("sft data %s: %s", cfg.path, self.stats)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = np.full(self.seq_len, self.template.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        doc_lens, used = [], 0
        for i in self.packs[index]:
            x, y = self.examples[i]
            n = len(x)
            ids[used:used + n], labels[used:used + n] = x, y
            doc_lens.append(n)
            used += n
        if used < self.seq_len:  # padding: a document of its own, without loss
            doc_lens.append(self.seq_len - used)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "doc_lens": torch.tensor(doc_lens, dtype=torch.int32)}
