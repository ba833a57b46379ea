"""Megatron indexed data: prepare_data.py round trip through megatron-core, sampling, blends, reset_at_eod, errors."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from moba_train.data import Loader, build_dataset
from moba_train.data.config import DataConfig, MegatronDataConfig
from moba_train.data.tokenizer import BYTE_EOS, load_tokenizer
from moba_train.errors import UserError
from moba_train.model.llama import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "scripts", "prepare_data.py"))
prepare_data = importlib.util.module_from_spec(spec)
sys.modules["prepare_data"] = prepare_data  # its worker functions pickle by module name
spec.loader.exec_module(prepare_data)


def indexed_dataset(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def write_corpus(directory, n=60, seed=0, alphabet="abcdefgh xyzé\n"):
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(alphabet), size=int(rng.integers(1, 200)))) for _ in range(n)]
    path = os.path.join(directory, f"corpus{seed}.jsonl")
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path, texts


def cfg_for(path, seq_len=32, **kw):
    return DataConfig(name="megatron", seq_len=seq_len, batch_size=2, path=path,
                      reset_at_eod=kw.pop("reset_at_eod", False), megatron=MegatronDataConfig(**kw))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    jsonl, texts = write_corpus(str(d))
    (d / "plain.txt").write_text("one plain document\nwith two lines ✓")
    (d / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    prefix = str(d / "out" / "data")
    summary = prepare_data.prepare([jsonl, str(d / "plain.txt"), str(d / "empty.jsonl")], prefix, workers=2,
                                   progress=False)
    return prefix, texts + ["one plain document\nwith two lines ✓"], summary


def test_prepare_round_trips_through_megatron_reader(corpus):
    prefix, texts, summary = corpus
    assert summary["documents"] == len(texts) and summary["skipped_empty"] == 1
    ds = indexed_dataset(prefix)
    assert len(ds.document_indices) - 1 == len(texts)
    tok = load_tokenizer("byte")
    for i, text in enumerate(texts):
        got = ds[i]
        assert got.tolist() == tok.encode(text) + [BYTE_EOS]
        assert tok.decode(got) == text
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["data.bin", "data.idx", "data.json"]  # no temporaries


def test_prepare_with_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    jsonl, texts = write_corpus(str(tmp_path), n=30, seed=3, alphabet="ab cd ef\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    prefix = str(tmp_path / "hf")
    prepare_data.prepare([jsonl], prefix, tokenizer=str(tok_dir), workers=2, progress=False)
    hf = load_tokenizer(str(tok_dir))
    assert hf.eod == tok.token_to_id("</s>")
    ds = indexed_dataset(prefix)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text).ids + [hf.eod]
    # training reads it only with the same tokenizer
    with pytest.raises(UserError, match=r"hf\.json.*tokenized with"):
        build_dataset(cfg_for(prefix), seed=0)
    assert len(build_dataset(cfg_for(prefix, tokenizer=str(tok_dir)), seed=0)) >= 8
    # and only into a model whose embedding holds the tokenizer's ids
    with pytest.raises(UserError, match=r"has 300 tokens but model.vocab_size=256"):
        build_dataset(cfg_for(prefix, tokenizer=str(tok_dir)), seed=0, vocab_size=256)
    # a document that writes the end token's text is text: no eod id inside it (it split the document in two)
    assert hf.eod not in hf.encode("ab </s> cd")


def test_samples_deterministic_and_split_over_dp(corpus):
    prefix = corpus[0]
    a = build_dataset(cfg_for(prefix), seed=1)
    b = build_dataset(cfg_for(prefix), seed=1)
    c = build_dataset(cfg_for(prefix), seed=2)
    assert len(a) >= 64
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(16))
    assert not all(torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(16))
    s = a[3]
    assert s["input_ids"].shape == s["labels"].shape == (32,)
    assert torch.equal(s["labels"][:-1], s["input_ids"][1:])  # next-token targets
    # dp=2 ranks together see exactly what one rank sees with a double batch, step after step
    one = Loader(a, batch_size=4)
    ranks = [Loader(a, batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch()["input_ids"]
        parts = torch.cat([r.next_batch()["input_ids"] for r in ranks])
        assert torch.equal(whole, parts)
    assert one.consumed == ranks[0].consumed == 12


def test_reset_at_eod_gives_document_bounds(corpus):
    prefix = corpus[0]
    ds = build_dataset(cfg_for(prefix, seq_len=64, reset_at_eod=True), seed=0)
    seen_multi = False
    for i in range(32):
        s = ds[i]
        ids, labels, lens = s["input_ids"], s["labels"], s["doc_lens"]
        assert int(lens.sum()) == 64 and (lens > 0).all()
        ends = torch.cumsum(lens.long(), 0)
        assert (ids[ends[:-1] - 1] == BYTE_EOS).all()  # every document but the last ends with eod
        assert int((ids == BYTE_EOS).sum()) in (len(lens) - 1, len(lens))
        assert (labels[ids == BYTE_EOS] == IGNORE_INDEX).all()  # no target across a document boundary
        seen_multi |= len(lens) > 1
    assert seen_multi
    batch = Loader(ds, batch_size=2).next_batch()
    assert batch["cu_seqlens"][-1] == 128 and "positions" not in batch  # the model derives them per document


def test_blend_weights(tmp_path):
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    pa, _ = write_corpus(str(tmp_path), n=40, seed=10, alphabet="a")
    pb, _ = write_corpus(str(tmp_path), n=40, seed=11, alphabet="b")
    prepare_data.prepare([pa], a, workers=1, progress=False)
    prepare_data.prepare([pb], b, workers=1, progress=False)
    ds = build_dataset(cfg_for(f"0.25 {a} 0.75 {b}", seq_len=16), seed=0)
    from_a = sum(int((ds[i]["input_ids"] == ord("a")).any()) for i in range(400))
    assert 70 <= from_a <= 130, from_a
    # without weights: the mixture of the sizes, reshuffled every epoch (megatron-core builds an unweighted blend
    # for one epoch, which the loader replayed in the same order)
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    for prefix, seed in ((c, 12), (d, 13)):
        prepare_data.prepare([write_corpus(str(tmp_path), n=8, seed=seed)[0]], prefix, workers=1, progress=False)
    one_epoch = sum(len(build_dataset(cfg_for(p, seq_len=16), seed=0)) for p in (c, d))
    ds = build_dataset(cfg_for(f"{c} {d}", seq_len=16), seed=0)
    n = len(ds)
    assert abs(n - one_epoch) <= 2  # one pass over both prefixes
    order = [Loader(ds, batch_size=1).index(i) for i in range(2 * n)]
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n)) and order[:n] != order[n:]



def test_blend_pass_counts_the_train_parts_only(tmp_path):
    """A blend's one pass holds as many samples as its prefixes' train parts (it counted every split, so with
    split 50,50,0 each sample came twice per pass)."""
    prefixes = []
    for seed in (21, 22):
        prefixes.append(str(tmp_path / f"p{seed}"))
        prepare_data.prepare([write_corpus(str(tmp_path), n=60, seed=seed)[0]], prefixes[-1], workers=1,
                             progress=False)
    alone = sum(len(build_dataset(cfg_for(p, seq_len=16, split="50,50,0"), seed=0)) for p in prefixes)
    blend = len(build_dataset(cfg_for(f"0.5 {prefixes[0]} 0.5 {prefixes[1]}", seq_len=16, split="50,50,0"), seed=0))
    assert abs(blend - alone) <= 0.1 * alone, (blend, alone)


def test_split_must_leave_training_documents(corpus, tmp_path):
    """A split whose train part rounds to no documents used to hang in megatron-core's epoch count; a damaged
    index cache gave a bare ValueError."""
    prefix = corpus[0]
    with pytest.raises(UserError, match=r"split='1,999,0' leaves .* no training documents"):
        build_dataset(cfg_for(prefix, split="1,999,0", cache_dir=str(tmp_path / "c")), seed=0)
    for split, message in (("0,0,0", "positive sum"), ("1.2.3", "not comma-separated numbers")):
        with pytest.raises(UserError, match=message):
            build_dataset(cfg_for(prefix, split=split, cache_dir=str(tmp_path / "c")), seed=0)
    build_dataset(cfg_for(prefix, cache_dir=str(tmp_path / "c")), seed=0)
    (index,) = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "c") for f in files
                if f.endswith("shuffle_index.npy")]
    with open(index, "r+b") as f:
        f.truncate(os.path.getsize(index) // 2)
    with pytest.raises(UserError, match="damaged sample-index cache"):
        build_dataset(cfg_for(prefix, cache_dir=str(tmp_path / "c")), seed=0)



def test_data_shorter_than_one_sample_is_one_error(tmp_path, caplog):
    """A single prefix of at most seq_len tokens holds no sample (one takes seq_len + 1): it warned that every
    sample repeats the data, then failed with 'yields no training samples'. Now one error names the minimum."""
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "abcdefgh" * 5}) + "\n")
    prefix = str(tmp_path / "short")
    prepare_data.prepare([str(path)], prefix, workers=1, progress=False)
    reader = indexed_dataset(prefix)  # kept alive: its lengths are a view of its memory map
    tokens = int(reader.sequence_lengths.sum())
    with pytest.raises(UserError, match=rf"holds {tokens} tokens; a sample of data.seq_len={tokens} takes "
                                        rf"{tokens + 1}"):
        build_dataset(cfg_for(prefix, seq_len=tokens, cache_dir=str(tmp_path / "c")), seed=0)
    assert "repeats the data" not in caplog.text
    assert len(build_dataset(cfg_for(prefix, seq_len=tokens - 1, cache_dir=str(tmp_path / "c")), seed=0)) == 1

def test_blend_strings():
    from moba_train.data.megatron import parse_blend

    assert parse_blend("0.3 /d/a 0.7 /d/b") == (["/d/a", "/d/b"], [0.3, 0.7])
    assert parse_blend("/d/a /d/b /d/c") == (["/d/a", "/d/b", "/d/c"], None)
    assert parse_blend("2024") == (["2024"], None)  # one prefix, whatever its name
    with pytest.raises(UserError, match=r"alternates weights and prefixes .*got 3 entries"):
        parse_blend("0.3 /d/a 0.7")  # a weight without its prefix was read as a prefix named 0.3
    with pytest.raises(UserError, match=r"alternates weights and prefixes .*got 4 entries"):
        parse_blend("0.3 /d/a /d/b 0.7")  # weight and prefix swapped: was read as four prefixes, one named 0.3
    for weights in ("nan /d/a 1 /d/b", "inf /d/a 1 /d/b", "-1 /d/a 2 /d/b", "0 /d/a 0 /d/b", "0 /d/a 1 /d/b"):
        with pytest.raises(UserError, match="blend weights must be finite"):
            parse_blend(weights)


def test_missing_and_corrupt_dataset_files(corpus, tmp_path):
    prefix = corpus[0]
    with pytest.raises(UserError, match=r"/nope\.idx: no such dataset file"):
        build_dataset(cfg_for(str(tmp_path / "nope")), seed=0)
    broken = str(tmp_path / "broken")
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as f, open(broken + suffix, "wb") as g:
            g.write(f.read())
    with open(broken + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(broken + ".bin") - 10)
    with pytest.raises(UserError, match=r"broken\.bin: .*truncated"):
        build_dataset(cfg_for(broken), seed=0)
    with open(broken + ".idx", "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(UserError, match=r"broken\.idx: not a Megatron"):
        build_dataset(cfg_for(broken), seed=0)


def test_tiny_trains_on_prepared_data(corpus, tmp_path):
    prefix = corpus[0]
    run = subprocess.run(
        [sys.executable, "launch/pretrain.py", "+exp=tiny", "data=megatron", f"data.path={prefix}",
         "data.seq_len=128", "data.batch_size=2", "data.reset_at_eod=true", "attention.block_size=32",
         "attention.top_k=2", "train.device=cpu", "train.steps=3", "train.log_every=1",
         f"train.out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 3.0  # ~ln(260) at start
    run = subprocess.run(
        [sys.executable, "launch/pretrain.py", "+exp=tiny", "data=megatron", f"data.path={tmp_path}/missing",
         "train.device=cpu", f"train.out_dir={tmp_path}/other"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.idx" in run.stderr


def test_data_without_a_tokenizer_record_is_checked_on_its_tokens(tmp_path, caplog, monkeypatch):
    """Data from Megatron-LM's own preprocessing has no <prefix>.json: ids of a 50K vocabulary read with the default
    byte tokenizer cut documents at id 257 (an ordinary token there) silently, and crashed the embedding later.
    Now ids past the tokenizer's vocabulary stop the run at start with one line; a sample without the
    end-of-document id warns; an id the start-up sample missed stops at its sample."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def build(name, docs):
        prefix = str(tmp_path / name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for doc in docs:
            builder.add_document(torch.tensor(doc), [len(doc)])
        builder.finalize(prefix + ".idx")
        return prefix

    rng = np.random.default_rng(0)
    gpt2 = build("gpt2", [list(rng.integers(0, 50256, 300)) + [50256] for _ in range(8)])
    with pytest.raises(UserError, match=r"gpt2.bin holds token id \d+ .* but data.megatron.tokenizer='byte' has 260"):
        build_dataset(cfg_for(gpt2, reset_at_eod=True), seed=0)
    no_eod = build("no_eod", [list(rng.integers(0, 256, 300)) for _ in range(8)])
    with caplog.at_level("WARNING"):
        build_dataset(cfg_for(no_eod, reset_at_eod=True), seed=0)
    assert "none of 2400 sampled tokens is data.megatron.tokenizer='byte''s end-of-document id 257" in caplog.text
    # an id between the sampled chunks (two of 100 tokens here: the start and the end of a 2400-token file)
    from moba_train.data import megatron

    monkeypatch.setattr(megatron, "SAMPLE_CHUNKS", 2)
    monkeypatch.setattr(megatron, "SAMPLE_CHUNK_TOKENS", 100)
    docs = [[1] * 299 + [BYTE_EOS] for _ in range(8)]
    docs[3][150] = 300
    late = build("late", docs)
    ds = build_dataset(cfg_for(late, seq_len=64), seed=0)
    with pytest.raises(UserError, match=r"sample \d+ holds token ids 1..300, but data.megatron.tokenizer='byte' "
                                        r"has 260"):
        for i in range(len(ds)):
            ds[i]
