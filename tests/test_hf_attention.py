"""MoBA as a transformers attention implementation: prefill, padding, gated decode, generate (CPU, fp32)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import moba_train.hf.decode as hf_decode  # noqa: E402
from moba_train.hf import register_moba  # noqa: E402
from moba_train.hf.decode import LayerMeans  # noqa: E402
from moba_train.hf.routing import score_blocks  # noqa: E402
from moba_train.model import AttentionConfig, Llama, ModelConfig  # noqa: E402

VOCAB, DIM, HEADS, KV_HEADS, FFN = 97, 64, 4, 2, 128
TOL = dict(atol=2e-5, rtol=1e-5)


def hf_model(attn: str = "moba", layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                      initializer_range=0.2, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def set_attn(model: LlamaForCausalLM, attn: str) -> LlamaForCausalLM:
    model.config._attn_implementation = attn
    return model


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


@pytest.fixture(autouse=True)
def _registered():
    register_moba(block_size=4, top_k=2)
    yield
    register_moba(block_size=4, top_k=2)


def our_model(hf: LlamaForCausalLM, attn_cfg: AttentionConfig) -> Llama:
    ours = Llama(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=hf.config.num_hidden_layers, n_heads=HEADS,
                             n_kv_heads=KV_HEADS, ffn_dim=FFN, norm_eps=1e-5, rope_theta=10000.0), attn_cfg)
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return ours.eval()


@torch.no_grad()
@pytest.mark.parametrize("full_last", [0, 1])
def test_prefill_equals_our_model(full_last):
    register_moba(block_size=4, top_k=2, full_attn_last_k=full_last)
    hf = hf_model("moba")
    ours = our_model(hf, AttentionConfig(block_size=4, top_k=2, backend="naive", full_attn_last_k=full_last))
    x = ids(2, 23)
    got = hf(x).logits
    torch.testing.assert_close(got, ours(x), **TOL)
    assert (got - set_attn(hf, "sdpa")(x).logits).abs().max() > 0.1  # the routing matters at this size


@torch.no_grad()
def test_naive_name_and_config_override():
    hf = hf_model("moba_naive")
    x = ids(1, 19)
    ref = our_model(hf, AttentionConfig(block_size=4, top_k=2, backend="naive"))(x)
    torch.testing.assert_close(hf(x).logits, ref, **TOL)
    hf.config.moba_block_size, hf.config.moba_top_k = 8, 2  # per-model settings travel in the config
    ref = our_model(hf, AttentionConfig(block_size=8, top_k=2, backend="naive"))(x)
    with pytest.warns(UserWarning, match=r"config sets \{'block_size': 8\}, which take precedence over "
                                         r"register_moba's \{'block_size': 4\}"):
        torch.testing.assert_close(hf(x).logits, ref, **TOL)


@torch.no_grad()
def test_cached_decode_of_packed_rows_is_refused():
    """position_ids that restart inside a row split the prefill into documents, but decoding takes each row's cache
    as one document: the continued tokens routed and attended across the restart (logits off by ~4) silently."""
    hf = hf_model("moba")
    x = ids(1, 23)
    pos = torch.cat([torch.arange(10), torch.arange(13)])[None]
    cache = DynamicCache(config=hf.config)
    hf(x[:, :22], position_ids=pos[:, :22], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="cached decoding of packed sequences"):
        hf(x[:, 22:], position_ids=pos[:, 22:], past_key_values=cache, use_cache=True)
    # the restart inside the continued chunk (its first token still follows on): second document routed over
    # the first, logits off by ~6, until the check looked past a chunk's first token
    cache = DynamicCache(config=hf.config)
    hf(x[:, :8], position_ids=pos[:, :8], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="cached decoding of packed sequences"):
        hf(x[:, 8:], position_ids=pos[:, 8:], past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_chunked_prefill_of_a_padded_batch_equals_one_prefill():
    """A right-padded row whose continued chunk starts on padding (position 1, as generate() writes for padding)
    is no packed row: it was refused before the check looked at real tokens only."""
    hf = hf_model("moba")
    x = ids(2, 23)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 15:] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    whole = hf(x, attention_mask=mask, position_ids=pos).logits
    cache = DynamicCache(config=hf.config)
    first = hf(x[:, :17], attention_mask=mask[:, :17], position_ids=pos[:, :17], past_key_values=cache,
               use_cache=True).logits
    rest = hf(x[:, 17:], attention_mask=mask, position_ids=pos[:, 17:], past_key_values=cache, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, rest], 1)[real], whole[real], **TOL)


@torch.no_grad()
@pytest.mark.parametrize("block_size,top_k", [(4, 6), (32, 1)])
def test_covering_selection_equals_sdpa(block_size, top_k):
    register_moba(block_size=block_size, top_k=top_k)
    hf = hf_model("moba")
    x = ids(2, 23)
    torch.testing.assert_close(hf(x).logits, set_attn(hf, "sdpa")(x).logits, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(side):
    hf = hf_model("moba")
    lengths, seq = [23, 17, 9], 23
    rows = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    batch = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(seq - len(row), seq) if side == "left" else slice(0, len(row))
        batch[i, span], mask[i, span] = row, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = hf(batch, attention_mask=mask, position_ids=positions).logits
    for i, row in enumerate(rows):
        span = slice(seq - len(row), seq) if side == "left" else slice(0, len(row))
        torch.testing.assert_close(got[i, span], hf(row[None]).logits[0], **TOL)


def step_logits(hf, x, cache, chunks):
    """Feed x [B, S] in chunks of the given sizes through one cache; logits of every position."""
    outs, at = [], 0
    for size in chunks:
        outs.append(hf(x[:, at:at + size], past_key_values=cache, use_cache=True).logits)
        at += size
    return torch.cat(outs, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("path,full_last", [("dense", 0), ("gather", 1)])
def test_token_by_token_decode_equals_prefill(path, full_last, monkeypatch):
    monkeypatch.setattr(hf_decode, "GATHER_FRACTION", 1e9 if path == "gather" else 0.0)
    register_moba(block_size=4, top_k=3, full_attn_last_k=full_last)
    hf = hf_model("moba", layers=3)
    x = ids(2, 41)
    want = hf(x).logits
    cache = DynamicCache(config=hf.config)
    got = step_logits(hf, x, cache, [1] * x.shape[1])
    torch.testing.assert_close(got, want, **TOL)
    state = cache._moba_train_states[0]  # the incremental path ran: one mean per complete past block
    assert isinstance(state, LayerMeans) and state.count == [40 // 4] * 2


@torch.no_grad()
def test_chunks_crop_and_reorder_stay_exact():
    hf = hf_model("moba")
    x = ids(2, 30)
    want = hf(x).logits
    cache = DynamicCache(config=hf.config)
    got = step_logits(hf, x, cache, [9, 1, 1, 5, 1, 1, 1])  # chunks > 1 on top of a cache: the general path
    torch.testing.assert_close(got, want[:, :19], **TOL)
    cache.crop(-4)  # drop 4 tokens, then decode them again: stale block means must not survive
    got = step_logits(hf, x[:, 15:], cache, [1] * 15)
    torch.testing.assert_close(got, want[:, 15:], **TOL)
    cache.reorder_cache(torch.tensor([1, 0]))  # beam-search style reorder of the batch
    y = torch.cat([x.flip(0), ids(2, 6, seed=5)], dim=1)
    got = step_logits(hf, y[:, 30:], cache, [1] * 6)
    torch.testing.assert_close(got, hf(y).logits[:, 30:], **TOL)


@torch.no_grad()
@pytest.mark.parametrize("path", ["dense", "gather"])
def test_left_padded_decode_equals_unpadded_prefill(path, monkeypatch):
    monkeypatch.setattr(hf_decode, "GATHER_FRACTION", 1e9 if path == "gather" else 0.0)
    hf = hf_model("moba")
    rows = [ids(1, 27, seed=3)[0], ids(1, 18, seed=4)[0]]
    seq = 27
    batch = torch.zeros(2, seq, dtype=torch.long)
    mask = torch.zeros(2, seq, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, seq - len(row):], mask[i, seq - len(row):] = row, 1
    cache = DynamicCache(config=hf.config)
    prompt = 6  # prefill the first 6 slots, then one slot at a time (row 1 is padding for a while)
    outs = [hf(batch[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True,
               position_ids=(mask[:, :prompt].cumsum(-1) - 1).clamp(min=0)).logits]
    for t in range(prompt, seq):
        pos = (mask[:, :t + 1].cumsum(-1) - 1).clamp(min=0)[:, -1:]
        outs.append(hf(batch[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True,
                       position_ids=pos).logits)
    got = torch.cat(outs, dim=1)
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i, seq - len(row):], hf(row[None]).logits[0], **TOL)


@torch.no_grad()
def test_generate_with_padding_equals_single_rows():
    hf = hf_model("moba")
    hf.generation_config.pad_token_id = 0
    rows = [ids(1, 21, seed=7)[0], ids(1, 13, seed=8)[0], ids(1, 16, seed=9)[0]]
    seq = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, seq - len(row):], mask[i, seq - len(row):] = row, 1
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    out = hf.generate(batch, attention_mask=mask, **kw)
    for i, row in enumerate(rows):
        single = hf.generate(row[None], **kw)
        assert torch.equal(out[i, seq:], single[0, len(row):])


@torch.no_grad()
def test_full_decode_flag_is_full_attention_over_the_cache():
    hf = hf_model("moba")
    x = ids(1, 26)
    cache = DynamicCache(config=hf.config)
    hf(x[:, :-1], past_key_values=cache, use_cache=True)
    gated = hf(x[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
    sdpa = set_attn(hf, "sdpa")(x[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
    register_moba(block_size=4, top_k=2, full_decode=True)
    full = set_attn(hf, "moba")(x[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
    torch.testing.assert_close(full, sdpa, **TOL)
    assert (full - gated).abs().max() > 1e-3


@torch.no_grad()
def test_unsupported_masks_are_refused():
    hf = hf_model("moba")
    x = ids(1, 8)
    with pytest.raises(ValueError, match="4D"):
        hf(x, attention_mask=torch.ones(8, 8, dtype=torch.bool).tril()[None, None])


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_is_refused(padded):
    """A static cache hands the attention function keys of its fixed length, empty slots included: refused
    before any output, with or without a padding mask (until the mask builder checked the key slots itself, an
    unpadded prompt went down the decode path and generated other tokens than the dynamic cache)."""
    hf = hf_model("moba")
    x = ids(2, 30)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, cache_implementation="static")
    with pytest.raises(ValueError, match="static or sliding caches are not supported"):
        hf.generate(x, attention_mask=mask if padded else None, **kw)


def load_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "hf_generate.py"
    spec = importlib.util.spec_from_file_location("hf_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(path, script, context=512):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set((script.FILLER + script.NEEDLE + script.QUESTION).split()))
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    model = hf_model("sdpa")
    model.config.max_position_embeddings = context
    model.save_pretrained(path)


def test_hf_generate_script(tmp_path, capsys):
    from transformers import BertConfig

    script = load_script()
    save_tiny_model(tmp_path / "llama", script)
    common = ["--max-new-tokens", "5", "--prompt-tokens", "70", "--block-size", "8", "--top-k", "2", "--device", "cpu"]
    moba = script.main(["--model", str(tmp_path / "llama"), "--attn", "moba", *common])
    assert moba["prompt_tokens"] == 70 and moba["new_tokens"] == 5 and "prefill" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no model at"):
        script.main(["--model", str(tmp_path / "missing"), *common])
    BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit, match="non-causal"):
        script.main(["--model", str(tmp_path / "bert"), *common])
    with pytest.raises(SystemExit, match="exceed the model's context"):
        script.main(["--model", str(tmp_path / "llama"), *common[:2], "--prompt-tokens", "600", *common[4:]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
@pytest.mark.parametrize("path", ["kernel", "dense", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_prefill_and_decode(path, dtype, monkeypatch):
    """On the GPU: "moba" (fused kernels) prefill == "moba_naive"; gated decode == prefill.

    fp32 runs two layers with tight bounds. bf16 runs one layer: with a second layer, bf16 rounding of the first
    layer's output moves the second layer's gate scores by ~1e-3 and flips its near-tied block choices (random
    weights make scores nearly tied), so rows would differ by design rather than by a defect.
    """
    monkeypatch.setattr(hf_decode, "DECODE_KERNEL", path == "kernel")
    monkeypatch.setattr(hf_decode, "GATHER_FRACTION", 1e9 if path == "gather" else 0.0)
    register_moba(block_size=64, top_k=3, backend="triton")  # the fused kernels by name, not by "auto"
    torch.manual_seed(0)
    layers, tol = (2, 1e-4) if dtype == torch.float32 else (1, 3e-2)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    cfg._attn_implementation = "moba"
    hf = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    x = torch.randint(0, 512, (2, 1100), device="cuda")
    want = hf(x).logits.float()
    naive = set_attn(hf, "moba_naive")(x).logits.float()
    scale = want.abs().max().item()
    assert (want - naive).abs().max().item() < tol * scale
    set_attn(hf, "moba")
    cache = DynamicCache(config=hf.config)
    got = step_logits(hf, x, cache, [1000] + [1] * 100).float()
    assert (got[:, 1000:] - want[:, 1000:]).abs().max().item() < tol * scale


@torch.no_grad()
def test_prefill_under_autocast():
    """Under autocast transformers' RoPE hands over fp32 q, k next to a bf16 v: prefill attends in bf16. With a
    covering selection (8 blocks, top_k 8) there are no gate near-ties to flip, so only bf16 rounding differs."""
    hf = hf_model("moba")
    x = ids(2, 30)
    for top_k in (2, 8):
        register_moba(block_size=4, top_k=top_k)
        want = hf(x, use_cache=False).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = hf(x, use_cache=False).logits
        assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_cached_gate_scores_stay_fp32_under_autocast():
    """The cached path's gate scores in fp32 under autocast, as the prefill gate does (it scored in bf16 there,
    and picked other blocks for ~6% of query heads on random bf16 inputs)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 3, 64, generator=g).bfloat16()
    means = torch.randn(1, 2, 40, 64, generator=g) * 0.5 + 0.3
    ref = score_blocks(q, means)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scored = score_blocks(q, means)
    assert scored.dtype == torch.float32 and torch.equal(scored, ref)


@pytest.mark.parametrize("kwargs, name", [({"block_size": 4.5}, "block_size"), ({"block_size": True}, "block_size"),
                                          ({"top_k": "3"}, "top_k"), ({"full_attn_last_k": -1}, "full_attn_last_k")])
def test_register_moba_refuses_non_integers(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}=.* must be an integer"):
        register_moba(**kwargs)
