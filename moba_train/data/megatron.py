"""Megatron indexed datasets (`.bin`/`.idx`, e.g. from scripts/prepare_data.py) read through megatron-core.

`data.path` takes Megatron's blend syntax: one prefix (`/data/corpus`), several (`/data/a /data/b`, weighted
by their sizes) or weight-prefix pairs (`0.3 /data/a 0.7 /data/b`). megatron-core's GPTDataset cuts the
token stream into `data.seq_len + 1` windows, shuffles them from the seed (`train.seed`) and, for several
prefixes, BlendedDataset interleaves them by weight. The index covers one pass over the data (a blend: as many
samples as the prefixes hold together, each prefix repeated or cut to its weight); the Loader takes further
epochs in new seeded orders. Sample i is a pure function of (files, seed, seq_len, split), not of train.steps:
a run resumed with more steps continues the same stream, and the Loader hands out consecutive samples across
dp ranks, so resuming at any dp size does too.

`data.reset_at_eod=true`: each end-of-document token closes a document; the sample carries `doc_lens`
(-> cu_seqlens: attention and MoBA blocks never cross documents; the model restarts positions at each).
The target after an end-of-document token (the next document's first token) then carries no loss.

Sample indices are cached in `data.megatron.cache_dir` (default `<dir of the first prefix>/index_cache`),
in a subdirectory named by a fingerprint of the data files (path, size, mtime), so a prefix rewritten with
new data gets a new index rather than a stale one; the indexes of the files' earlier versions (same prefixes,
another fingerprint) are then removed, so rewrites do not pile up index files. Rank 0 builds them, the other
ranks read them after a barrier, so on several nodes it must be a shared filesystem (as in Megatron-LM).
Reading is synchronous in the training process (memory-mapped; cheap next to a long-context step).
"""

import hashlib
import json
import logging
import os
import shutil
import struct
import warnings
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

from moba_train.data.config import DataConfig
from moba_train.data.tokenizer import MegatronTokenizerView, check_vocab, load_tokenizer
from moba_train.errors import UserError
from moba_train.model.llama import IGNORE_INDEX

log = logging.getLogger(__name__)

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
SAMPLE_CHUNKS, SAMPLE_CHUNK_TOKENS = 16, 1 << 16  # tokens read to check a dataset that names no tokenizer (2-4 MB)


class DatasetFileError(UserError):
    """A missing or damaged dataset file; the message names it."""


def parse_blend(path: str) -> tuple[list[str], Optional[list[float]]]:
    """Megatron blend string -> (prefixes, weights or None). Entries led by a number are a blend and must
    alternate weights and prefixes; otherwise they are prefixes (one entry is a prefix, whatever its name)."""
    parts = str(path).split()
    if not parts:
        raise UserError("data.path is empty")
    if len(parts) == 1 or not _is_number(parts[0]):
        return parts, None
    if len(parts) % 2 or not all(map(_is_number, parts[0::2])):
        raise UserError(f"data.path={path!r}: a blend alternates weights and prefixes ('0.3 /data/a 0.7 /data/b'); "
                        f"got {len(parts)} entries")
    weights = [float(w) for w in parts[0::2]]
    if not all(0 < w < float("inf") for w in weights):  # NaN fails the test too
        raise UserError(f"data.path={path!r}: blend weights must be finite and > 0 (leave a prefix out instead of "
                        "weighting it 0)")
    return parts[1::2], weights


def check_split(split: str, prefixes: list[str], documents: list[int]) -> float:
    """data.megatron.split must leave every prefix's train part at least one document: megatron-core rounds each
    part to whole documents, and with none in the train part its sample index loops forever. Returns the train
    part's share."""
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        raise UserError(f"data.megatron.split={split!r}: not comma-separated numbers") from None
    if not all(0 <= p < float("inf") for p in parts) or sum(parts) <= 0:
        raise UserError(f"data.megatron.split={split!r}: weights must be finite, >= 0, with a positive sum")
    share = parts[0] / sum(parts)
    for prefix, n in zip(prefixes, documents):
        if int(round(share * n)) < 1:
            raise UserError(f"data.megatron.split={split!r} leaves {prefix} no training documents (train share "
                            f"{share:.3g} of its {n}); give the train part a larger weight")
    return share


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_indexed(prefix: str) -> tuple[int, int, type]:
    """Validate `<prefix>.idx` / `<prefix>.bin` (presence, header, sizes); returns (documents, tokens, dtype)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for file in (idx, bin_):
        if not os.path.isfile(file):
            raise DatasetFileError(f"{file}: no such dataset file (data.path gives prefixes of .bin/.idx pairs; "
                                   "make them with scripts/prepare_data.py)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DatasetFileError(f"{idx}: not a Megatron indexed-dataset index (bad header)")
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if code not in DTYPES or n_doc < 1 or size != 34 + n_seq * 12 + n_doc * 8:
        raise DatasetFileError(f"{idx}: damaged index (dtype code {code}, {n_seq} sequences, {n_doc - 1} documents, "
                               f"{size} bytes)")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=34, shape=(n_seq,)) if n_seq else np.zeros(0)
    tokens = int(lengths.sum(dtype=np.int64))
    expected = tokens * np.dtype(DTYPES[code]).itemsize
    if os.path.getsize(bin_) != expected:
        raise DatasetFileError(f"{bin_}: {os.path.getsize(bin_)} bytes, but {idx} describes {expected} "
                               "(truncated or mismatched .bin/.idx pair)")
    if tokens == 0:
        raise DatasetFileError(f"{bin_}: the dataset holds no tokens")
    return n_doc - 1, tokens, DTYPES[code]


def check_sidecar(prefix: str, tok, tokens: int, dtype: type) -> None:
    """prepare_data.py writes `<prefix>.json` naming its tokenizer; a different data tokenizer is an error. Data
    without one (Megatron-LM's own preprocessing) is checked on a sample of its tokens instead."""
    file = prefix + ".json"
    if not os.path.isfile(file):
        check_sample(prefix, tok, tokens, dtype)
        return
    try:
        with open(file) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetFileError(f"{file}: unreadable dataset description ({e})") from None
    if info.get("vocab_size") != tok.vocab_size or info.get("eod") != tok.eod:
        raise UserError(f"{file}: dataset was tokenized with {info.get('tokenizer')!r} (vocab {info.get('vocab_size')}, "
                        f"eod {info.get('eod')}), but data.megatron.tokenizer={tok.name!r} has vocab "
                        f"{tok.vocab_size}, eod {tok.eod}")


def check_sample(prefix: str, tok, tokens: int, dtype: type) -> None:
    """Ids past the tokenizer's vocabulary mean the data was made with another tokenizer (its end-of-document id
    would then cut documents at an ordinary token): an error. No end-of-document id at all: a warning."""
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(tokens,))
    span = min(SAMPLE_CHUNK_TOKENS, tokens)
    starts = np.linspace(0, tokens - span, SAMPLE_CHUNKS, dtype=np.int64)
    sample = np.concatenate([data[start:start + span] for start in np.unique(starts)])
    top = sample.max()
    if top >= tok.vocab_size or sample.min() < 0:
        raise UserError(f"{prefix}.bin holds token id {top} (of {sample.min()}..{top} in {sample.size} sampled tokens) "
                        f"but data.megatron.tokenizer={tok.name!r} has {tok.vocab_size} tokens: set it to the "
                        "tokenizer the data was made with")
    if not (sample == tok.eod).any():
        log.warning("%s.bin: none of %d sampled tokens is data.megatron.tokenizer=%r's end-of-document id %d; "
                    "documents are told apart by that id (data.reset_at_eod): is it the tokenizer the data was "
                    "made with?", prefix, sample.size, tok.name, tok.eod)


def data_fingerprint(prefixes: list[str]) -> str:
    """Identifies the current version of the data files. megatron-core's cache hash covers their paths but not
    their contents, so a prefix rewritten by prepare_data.py would otherwise reuse an index of the old data."""
    stats = []
    for prefix in prefixes:
        for file in (prefix + ".bin", prefix + ".idx"):
            st = os.stat(file)
            stats.append((os.path.abspath(file), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


MANIFEST = "prefixes.json"  # in each index directory: the prefixes it indexes


def prune_stale_indexes(cache_root: str, prefixes: list[str], current: str) -> None:
    """Remove the index directories of earlier versions of these data files (the same prefixes under another
    fingerprint; those files no longer exist, so nothing can use them), then record the prefixes of `current`.
    Indexes of other blends under the same root are kept."""
    names = [os.path.abspath(p) for p in prefixes]
    for entry in os.scandir(cache_root) if os.path.isdir(cache_root) else ():
        if entry.name == os.path.basename(current) or not entry.is_dir():
            continue
        try:
            with open(os.path.join(entry.path, MANIFEST)) as f:
                stale = json.load(f) == names
        except (OSError, ValueError):
            continue  # not ours to judge (no manifest, or one written by something else)
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed the sample index of an earlier version of %s: %s", prefixes, entry.path)
    os.makedirs(current, exist_ok=True)
    with open(os.path.join(current, MANIFEST), "w") as f:
        json.dump(names, f)


def doc_lengths(tokens: np.ndarray, eod: int) -> np.ndarray:
    """Lengths of the documents in a window: each eod token is the last token of its document."""
    ends = np.flatnonzero(tokens == eod) + 1
    bounds = np.unique(np.concatenate([[0], ends, [len(tokens)]]))
    return np.diff(bounds)


@contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16 BlendedDataset calls torch.distributed.get_rank() even without a process group
    (a single-process run with a cached blend); answer 0 there, as a single process is rank 0."""
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


class MegatronData:
    """Indexable: {input_ids [S], labels [S] (IGNORE_INDEX where no loss)[, doc_lens]}."""

    def __init__(self, cfg: DataConfig, seed: int, vocab_size: Optional[int] = None):
        mcfg = cfg.megatron
        self.seq_len, self.reset_at_eod = cfg.seq_len, cfg.reset_at_eod
        self.tokenizer = load_tokenizer(mcfg.tokenizer)
        check_vocab(f"data.megatron.tokenizer={mcfg.tokenizer!r}", self.tokenizer.vocab_size, vocab_size)
        self.eod = self.tokenizer.eod
        prefixes, weights = parse_blend(cfg.path)
        sizes = [check_indexed(prefix) for prefix in prefixes]  # (documents, tokens, dtype)
        for prefix, (_, tokens, dtype) in zip(prefixes, sizes):
            check_sidecar(prefix, self.tokenizer, tokens, dtype)
        train_share = check_split(mcfg.split, prefixes, [docs for docs, _, _ in sizes])
        total = sum(tokens for _, tokens, _ in sizes)
        if total <= cfg.seq_len and len(prefixes) == 1 and weights is None:
            raise UserError(f"data.path={cfg.path!r} holds {total} tokens; a sample of data.seq_len={cfg.seq_len} "
                            f"takes {cfg.seq_len + 1} (its inputs and the next token)")
        if total <= cfg.seq_len:  # a weighted part this small is sampled again and again
            log.warning("data.path=%r holds %d tokens, fewer than one sample of data.seq_len=%d: every sample "
                        "repeats the data", cfg.path, total, cfg.seq_len)
        if weights is None and len(prefixes) > 1:
            # megatron-core builds an unweighted blend for one epoch, which the loader would replay in the same
            # order; weights in proportion to the tokens sample the same mixture and reshuffle every epoch
            weights = [float(tokens) for _, tokens, _ in sizes]
        cache_root = mcfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
        cache = os.path.join(cache_root, data_fingerprint(prefixes))
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            try:
                prune_stale_indexes(cache_root, prefixes, cache)
            except OSError as e:
                raise DatasetFileError(f"{cache}: cannot build the sample index ({e.strerror or e}); set "
                                       "data.megatron.cache_dir to a writable directory") from None
        with warnings.catch_warnings():  # megatron.core warns about missing optional GPU packages on import
            warnings.simplefilter("ignore")
            from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
            from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=cfg.seq_len, blend=(prefixes, weights), split=mcfg.split,
            path_to_cache=cache, tokenizer=MegatronTokenizerView(self.tokenizer), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=mcfg.eod_mask_loss, create_attention_mask=False,
            mid_level_dataset_surplus=mcfg.mid_level_surplus)
        try:
            # one pass (None: one epoch of the train split); a blend as many samples as its train parts hold
            samples = [None, None, None] if weights is None else [max(1, int(total * train_share) // cfg.seq_len), 0, 0]
            with _rank_zero_without_process_group():
                train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, samples, lambda: True, config).build()
        except OSError as e:
            raise DatasetFileError(f"{getattr(e, 'filename', None) or cache}: cannot build the sample index "
                                   f"({e.strerror or e}); set data.megatron.cache_dir to a writable directory") from None
        except ValueError as e:  # an index file cut short: megatron-core writes them in place, reads any that exist
            raise DatasetFileError(f"{cache}: damaged sample-index cache ({e}; a run killed while writing it?); "
                                   "delete that directory and the next run rebuilds it") from None
        except AssertionError as e:  # megatron-core's own checks, e.g. a blend part smaller than one sample
            reason = str(e) or "a blend or size check failed"
            raise UserError(f"data.path={cfg.path!r}: megatron-core cannot build the dataset ({reason}); "
                            f"data.seq_len={cfg.seq_len} may exceed what a blend part holds") from None
        if train is None or len(train) == 0:
            raise UserError(f"data.path={cfg.path!r} with data.megatron.split={mcfg.split!r} yields no training "
                            f"samples of data.seq_len={cfg.seq_len}")
        self.dataset = train
        log.info("megatron data %s: %d samples of %d tokens", cfg.path, len(train), cfg.seq_len)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        ids, labels = sample["tokens"].long(), sample["labels"].long().clone()
        if int(ids.max()) >= self.tokenizer.vocab_size or int(ids.min()) < 0:  # what the start-up sample missed
            raise UserError(f"data.path sample {index} holds token ids {int(ids.min())}..{int(ids.max())}, but "
                            f"data.megatron.tokenizer={self.tokenizer.name!r} has {self.tokenizer.vocab_size} tokens")
        labels[sample["loss_mask"] == 0] = IGNORE_INDEX
        out = {"input_ids": ids, "labels": labels}
        if self.reset_at_eod:
            is_eod = ids == self.eod
            labels[is_eod] = IGNORE_INDEX  # the next token belongs to another document
            out["doc_lens"] = torch.from_numpy(doc_lengths(ids.numpy(), self.eod).astype(np.int32))
        return out
