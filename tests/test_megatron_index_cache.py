"""The sample-index cache follows the data files: rewriting a prefix with new documents builds a new index."""

from moba_train.data import build_dataset
from moba_train.data.tokenizer import BYTE_EOS, load_tokenizer

from test_data_megatron import cfg_for, prepare_data, write_corpus


def test_rewritten_prefix_gets_a_new_sample_index(tmp_path):
    prefix = str(tmp_path / "out" / "data")
    old, _ = write_corpus(str(tmp_path), n=200, seed=20, alphabet="a")
    prepare_data.prepare([old], prefix, workers=1, progress=False)
    assert len(build_dataset(cfg_for(prefix, seq_len=16), seed=0, num_samples=64)) >= 64

    new, texts = write_corpus(str(tmp_path), n=20, seed=21, alphabet="bcd")  # fewer documents, other tokens
    prepare_data.prepare([new], prefix, workers=1, progress=False)
    ds = build_dataset(cfg_for(prefix, seq_len=16, reset_at_eod=True), seed=0, num_samples=64)
    tok = load_tokenizer("byte")
    documents = {tuple(tok.encode(t) + [BYTE_EOS]) for t in texts}
    for i in range(len(ds)):  # a stale index points past the 20 new documents (IndexError) or cuts them wrongly
        ids, lens = ds[i]["input_ids"].tolist(), ds[i]["doc_lens"].tolist()
        assert set(ids) <= {BYTE_EOS, *b"bcd"}
        starts = [sum(lens[:j]) for j in range(len(lens))]
        inner = [tuple(ids[s:s + n]) for s, n in zip(starts[1:-1], lens[1:-1])]  # documents seen whole
        assert all(doc in documents for doc in inner)
