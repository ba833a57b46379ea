"""The sample-index cache follows the data files: rewriting a prefix with new documents builds a new index and
removes the old one; other datasets' indexes under the same root stay."""

import os

import pytest

from moba_train.data import build_dataset
from moba_train.data.megatron import DatasetFileError
from moba_train.data.tokenizer import BYTE_EOS, load_tokenizer

from test_data_megatron import cfg_for, prepare_data, write_corpus


def test_rewritten_prefix_gets_a_new_sample_index(tmp_path):
    prefix, other = str(tmp_path / "out" / "data"), str(tmp_path / "out" / "other")
    old, _ = write_corpus(str(tmp_path), n=200, seed=20, alphabet="a")
    prepare_data.prepare([old], prefix, workers=1, progress=False)
    prepare_data.prepare([old], other, workers=1, progress=False)
    assert len(build_dataset(cfg_for(prefix, seq_len=16), seed=0)) >= 64
    assert len(build_dataset(cfg_for(other, seq_len=16), seed=0)) >= 64
    cache_root = tmp_path / "out" / "index_cache"
    before = set(os.listdir(cache_root))
    assert len(before) == 2  # one index directory per dataset

    new, texts = write_corpus(str(tmp_path), n=20, seed=21, alphabet="bcd")  # fewer documents, other tokens
    prepare_data.prepare([new], prefix, workers=1, progress=False)
    ds = build_dataset(cfg_for(prefix, seq_len=16, reset_at_eod=True), seed=0)
    tok = load_tokenizer("byte")
    documents = {tuple(tok.encode(t) + [BYTE_EOS]) for t in texts}
    for i in range(len(ds)):  # a stale index points past the 20 new documents (IndexError) or cuts them wrongly
        ids, lens = ds[i]["input_ids"].tolist(), ds[i]["doc_lens"].tolist()
        assert set(ids) <= {BYTE_EOS, *b"bcd"}
        starts = [sum(lens[:j]) for j in range(len(lens))]
        inner = [tuple(ids[s:s + n]) for s, n in zip(starts[1:-1], lens[1:-1])]  # documents seen whole
        assert all(doc in documents for doc in inner)
    after = set(os.listdir(cache_root))
    assert len(after) == 2 and len(after & before) == 1  # the rewritten prefix's old index went, the other stayed
    assert len(build_dataset(cfg_for(other, seq_len=16), seed=0)) >= 64
    assert set(os.listdir(cache_root)) == after


def test_unwritable_index_cache_is_a_clear_error(tmp_path):
    prefix = str(tmp_path / "out" / "data")
    corpus, _ = write_corpus(str(tmp_path), n=20, seed=22, alphabet="a")
    prepare_data.prepare([corpus], prefix, workers=1, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetFileError, match="cache_dir to a writable directory"):
        build_dataset(cfg_for(prefix, seq_len=16, cache_dir=str(tmp_path / "file" / "cache")), seed=0)
