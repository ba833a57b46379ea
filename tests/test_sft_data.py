"""SFT data: assistant-only loss mask, packing equals one-by-one losses, clear errors for bad samples."""

import json

import pytest
import torch

from moba_train.data.config import DataConfig, SFTDataConfig
from moba_train.data.loader import Loader, collate
from moba_train.data.sft import (BOS, EOT, HEADER, ByteTemplate, HFTemplate, SFTDataError, SFTDataset, pack,
                                 read_jsonl, to_example)
from moba_train.errors import UserError
from moba_train.model import AttentionConfig, IGNORE_INDEX, Llama, ModelConfig

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the answer?"},
        {"role": "assistant", "content": "the answer is 42"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def make_tokenizer(path, template=TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "<|start|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["what is the answer?", "the answer is 42", "hello world", "user assistant"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="<|end|>")
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_byte_mask_is_exactly_assistant_tokens():
    ids, mask = ByteTemplate().encode(CHAT, "x")
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == list(b"the answer is 42") + [EOT] + list(b"world") + [EOT]
    assert ids[0] == BOS and ids.count(HEADER) == len(CHAT)
    x, labels = to_example(ids, mask)  # labels are next tokens where the next token is an assistant token
    assert [int(t) for t in labels if t != IGNORE_INDEX] == trained
    assert labels[-1] == IGNORE_INDEX


def test_hf_chat_template_mask(tmp_path):
    tpl = HFTemplate(make_tokenizer(tmp_path / "tok"))
    ids, mask = tpl.encode(CHAT, "x")
    assert tpl.tok.decode([i for i, m in zip(ids, mask) if m]) == "the answer is 42<|end|>\nworld<|end|>\n"
    assert tpl.tok.decode(ids) == tpl.tok.apply_chat_template(CHAT, tokenize=False)


def test_hf_mask_of_a_chat_that_starts_with_the_assistant(tmp_path):
    """An assistant-first chat trained on everything before its reply too (BOS, the role header and any default
    system prompt the template adds), since the first turn's prefix was taken as empty."""
    template = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start|>system\nbe brief<|end|>\n"
                "{% endif %}" + TEMPLATE.removeprefix("{{ bos_token }}"))
    tpl = HFTemplate(make_tokenizer(tmp_path / "tok", template))
    chat = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "what"},
            {"role": "assistant", "content": "the answer"}]
    ids, mask = tpl.encode(chat, "x")
    assert tpl.tok.decode([i for i, m in zip(ids, mask) if m]) == "hello<|end|>\nthe answer<|end|>\n"


def test_hf_mask_trains_a_reply_word_merged_with_the_prompts_space(tmp_path):
    """A generation prompt ending in a space ("assistant: "): byte-level BPE merges that space into the reply's
    first word, and a token starting inside the prompt must still be trained (it was masked, so the first word of
    every reply was never learned)."""
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tpl = HFTemplate(make_tokenizer(str(tmp_path / "tok"), template))
    chat = [{"role": "user", "content": "what is the answer?"}, {"role": "assistant", "content": "the answer is 42"}]
    ids, mask = tpl.encode(chat, "x")
    assert tpl.tok.decode([i for i, m in zip(ids, mask) if m]) == " the answer is 42<|end|>"


def test_template_of_a_run_dir_comes_from_the_checkpoint_it_started_from(tmp_path):
    """SFT from a run dir (`model.init_from=runs/continue`, the tokenizer defaulting to it): the run holds no
    tokenizer, so the template is the one of the HF dir recorded as the run's init_from."""
    from moba_train.data.sft import build_template
    from moba_train.model.pretrained import write_run_model_config

    hf_dir = make_tokenizer(tmp_path / "hf")
    write_run_model_config(ModelConfig(init_from=hf_dir), str(tmp_path / "run"))
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    for spec in ("run", "run/checkpoints/step_00000002"):
        tpl = build_template(str(tmp_path / spec))
        assert tpl.path == hf_dir and tpl.encode(CHAT, "x") == HFTemplate(hf_dir).encode(CHAT, "x")


def test_run_dir_without_a_tokenizer_in_its_lineage_is_one_line(tmp_path):
    """A byte-vocabulary run dir as the tokenizer (sft_hybrid's default data.sft.tokenizer=${model.init_from}):
    transformers' cut-off ValueError before; now what to set."""
    from moba_train.data.sft import build_template
    from moba_train.model.pretrained import write_run_model_config

    write_run_model_config(ModelConfig(), str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"run: no tokenizer there or in the checkpoints it descends from; set "
                                        r"data.sft.tokenizer=<HF tokenizer dir>, or byte"):
        build_template(str(tmp_path / "run"))


def test_hf_template_errors(tmp_path):
    with pytest.raises(SFTDataError, match="nope: no such tokenizer directory"):
        HFTemplate(str(tmp_path / "nope"))
    with pytest.raises(SFTDataError, match="has no chat_template"):
        HFTemplate(make_tokenizer(tmp_path / "plain", template=None))
    bad = HFTemplate(make_tokenizer(tmp_path / "bad", template="{{ raise_exception('no system role') }}"))
    with pytest.raises(SFTDataError, match=r"data.jsonl:3: chat template of .*bad failed .*no system role"):
        bad.encode(CHAT, "data.jsonl:3")


def test_bad_samples_name_file_and_line(tmp_path):
    ok = {"prompt": "p", "response": "r"}
    cases = [("{not json", "invalid JSON"), ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
             ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"), ({"text": "x"}, "expected a 'messages'"),
             ({"messages": [{"role": "user"}]}, "needs 'role' and 'content'")]
    for i, (row, msg) in enumerate(cases):
        path = write_jsonl(tmp_path / f"d{i}.jsonl", [ok, "", row])
        with pytest.raises(SFTDataError, match=rf"d{i}.jsonl:3: .*{msg}"):
            read_jsonl(path)
    with pytest.raises(SFTDataError, match="no such SFT data file"):
        read_jsonl(str(tmp_path / "missing.jsonl"))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(f'{json.dumps(ok)}\n\n{{"prompt": "café", "response": "r"}}\n'.encode("latin-1"))
    with pytest.raises(SFTDataError, match="latin1.jsonl:3: not UTF-8 text"):
        read_jsonl(str(latin1))



def test_jsonl_line_endings(tmp_path):
    """LF, CRLF and lone-CR files read the same samples, and a bad line is named by the same number in each
    (a lone-CR file was one line, so its first sample's JSON ended in 'Extra data')."""
    rows = [json.dumps({"prompt": f"p{i}", "response": "r"}) for i in range(3)]
    for name, sep in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        good = tmp_path / f"{name}.jsonl"
        good.write_bytes(sep.join([rows[0], "", *rows[1:]]).encode() + sep.encode())
        samples = read_jsonl(str(good))
        assert [where.rsplit(":", 1)[1] for where, _ in samples] == ["1", "3", "4"], name
        assert [messages[0]["content"] for _, messages in samples] == ["p0", "p1", "p2"], name
        bad = tmp_path / f"bad_{name}.jsonl"
        bad.write_bytes(sep.join([rows[0], "", "{oops", rows[1]]).encode())
        with pytest.raises(SFTDataError, match=rf"bad_{name}.jsonl:3: invalid JSON"):
            read_jsonl(str(bad))


def test_overlength_drop_and_truncate(tmp_path):
    # byte lengths: 1 + 6 + (prompt + 1) + 11 + (response + 1) = 35, 125 (answer past 64), 90 (answer cut at 64)
    rows = [{"prompt": "q" * 10, "response": "a" * 5}, {"prompt": "q" * 100, "response": "a" * 5},
            {"prompt": "q" * 40, "response": "a" * 30}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    drop = SFTDataset(DataConfig(name="sft", path=path, seq_len=64), seed=0)
    assert (drop.stats["dropped_overlength"], drop.stats["kept"]) == (2, 1)
    trunc = SFTDataset(DataConfig(name="sft", path=path, seq_len=64, sft=SFTDataConfig(overlength="truncate")), 0)
    assert (trunc.stats["truncated"], trunc.stats["dropped_no_target"], trunc.stats["kept"]) == (1, 1, 2)
    assert max(len(x) for x, _ in trunc.examples) == 64
    with pytest.raises(Exception, match="data.sft.overlength='cut' is not one of"):
        SFTDataset(DataConfig(name="sft", path=path, sft=SFTDataConfig(overlength="cut")), 0)


def test_pack_next_fit():
    assert pack([5, 4, 3, 8, 1], 9) == [[0, 1], [2], [3, 4]]


def test_packed_loss_equals_one_by_one(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "question %d " % i * (i + 1)},
                          {"role": "assistant", "content": "answer %d" % i * (3 - i % 3)}]} for i in range(7)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = SFTDataset(DataConfig(name="sft", path=path, seq_len=160, batch_size=2), seed=1)
    assert len(ds) < 7 and any(len(p) > 1 for p in ds.packs)
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
                  AttentionConfig(kind="moba", block_size=16, top_k=2, backend="naive")).eval()
    packed_sum, packed_n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ds), 2):
            batch = collate([ds[i] for i in range(start, min(start + 2, len(ds)))])
            s, n = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"])
            packed_sum, packed_n = packed_sum + s.item(), packed_n + n.item()
        one_sum, one_n = 0.0, 0
        for x, y in ds.examples:
            s, n = model(torch.as_tensor(x)[None], labels=torch.as_tensor(y)[None])
            one_sum, one_n = one_sum + s.item(), one_n + n.item()
    assert packed_n == one_n == ds.stats["target_tokens"]
    assert abs(packed_sum / packed_n - one_sum / one_n) < 1e-5


def test_builtin_long_qa():
    ds = SFTDataset(DataConfig(name="sft", path="builtin:long_qa", seq_len=4096,
                               sft=SFTDataConfig(num_synthetic=16)), seed=0)
    row = ds[0]
    assert row["input_ids"].shape == (4096,) and int(row["doc_lens"].sum()) == 4096
    assert ds.stats["kept"] + ds.stats["dropped_overlength"] == 16 and ds.stats["kept"] > 8
    with pytest.raises(SFTDataError, match="unknown built-in"):
        SFTDataset(DataConfig(name="sft", path="builtin:nope"), seed=0)


def test_dataset_with_hf_tokenizer(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"prompt": "hello", "response": "world"}])
    cfg = DataConfig(name="sft", path=path, seq_len=128, sft=SFTDataConfig(tokenizer=tok, shuffle=False))
    ds = SFTDataset(cfg, seed=0, vocab_size=300)
    row = ds[0]
    assert ds.stats["kept"] == 2 and len(ds) == 1 and row["doc_lens"].tolist()[:2] == [len(x) for x, _ in ds.examples]
    assert int(row["input_ids"][-1]) == ds.template.pad_id  # padding tail, its own document, no loss
    assert (row["labels"][sum(len(x) for x, _ in ds.examples):] == IGNORE_INDEX).all()
    with pytest.raises(Exception, match=r"tok. has \d+ tokens but model.vocab_size=260"):
        SFTDataset(cfg, seed=0, vocab_size=260)


def test_epochs_past_the_end_are_reshuffled_and_resumable():
    """A finite dataset (SFT packs) trained for several epochs: each epoch after the first in a new order (every
    epoch replayed the first one's before), the same on a resume from any position."""
    data = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(10)]
    loader = Loader(data, batch_size=5, seed=3)
    seen = [loader.next_batch()["input_ids"].flatten().tolist() for _ in range(6)]
    epochs = [seen[2 * e] + seen[2 * e + 1] for e in range(3)]
    assert epochs[0] == list(range(10)) and all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1]
    resumed = Loader(data, batch_size=5, seed=3)
    resumed.load_state_dict({"consumed": 15})
    assert resumed.next_batch()["input_ids"].flatten().tolist() == seen[3]
