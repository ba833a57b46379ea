"""The plain decoder: shapes, loss, hybrid layer kinds, packed documents, MoBA/full equivalence."""

import math

import pytest
import torch
import torch.nn.functional as F

from moba_train.model import AttentionConfig, Llama, ModelConfig, layer_kinds

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64)


def make(attn: AttentionConfig, seed=0, cfg=CFG) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg, attn).double()


def test_layer_kinds_hybrid_and_explicit():
    assert layer_kinds(AttentionConfig(kind="moba", full_attn_last_k=2), 5) == ["moba"] * 3 + ["full"] * 2
    assert layer_kinds(AttentionConfig(kind="full"), 2) == ["full", "full"]
    explicit = AttentionConfig(layers=["full", "moba", "full"], full_attn_last_k=1)
    assert layer_kinds(explicit, 3) == ["full", "moba", "full"]
    model = make(AttentionConfig(block_size=16, top_k=2, full_attn_last_k=1, backend="naive"))
    assert model.attention_kinds() == ["moba", "moba", "full"]
    model.set_attention_kinds(["full"] * 3)
    assert model.attention_kinds() == ["full"] * 3
    with pytest.raises(ValueError, match="full_attn_last_k must be >= 0"):  # was one extra layer
        layer_kinds(AttentionConfig(full_attn_last_k=-1), 4)


def test_loss_is_mean_cross_entropy_over_real_tokens():
    model = make(AttentionConfig(kind="full"))
    ids = torch.randint(0, 64, (2, 40))
    labels = torch.randint(0, 64, (2, 40))
    labels[0, :10] = -100
    loss_sum, count = model(ids, labels=labels)
    logits = model(ids)
    ref = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert count == 70 and torch.allclose(loss_sum, ref)


def test_moba_with_enough_blocks_equals_full_model():
    ids = torch.randint(0, 64, (2, 48))
    moba = make(AttentionConfig(kind="moba", block_size=16, top_k=3, backend="naive"))
    full = make(AttentionConfig(kind="full"))
    assert torch.allclose(moba(ids), full(ids), atol=1e-10)
    sparse = make(AttentionConfig(kind="moba", block_size=16, top_k=1, backend="naive"))
    assert not torch.allclose(sparse(ids), full(ids), atol=1e-3)


def test_packed_documents_equal_separate_runs():
    """Documents packed with cu_seqlens (positions restart) give the logits of running each alone."""
    model = make(AttentionConfig(kind="moba", block_size=16, top_k=2, backend="naive"))
    a, b = torch.randint(0, 64, (1, 37)), torch.randint(0, 64, (1, 27))
    cu = torch.tensor([0, 37, 64], dtype=torch.int32)
    packed = model(torch.cat([a, b], 1), cu_seqlens=cu)
    assert torch.allclose(packed[:, :37], model(a), atol=1e-10)
    assert torch.allclose(packed[:, 37:], model(b), atol=1e-10)


def test_rope_positions_matter_and_batch_rows_are_independent():
    model = make(AttentionConfig(kind="full"))
    ids = torch.randint(0, 64, (2, 20))
    out = model(ids)
    assert torch.allclose(out[1:], model(ids[1:]), atol=1e-10)
    # RoPE is relative: a constant offset changes nothing, stretched positions do
    assert torch.allclose(out, model(ids, positions=torch.arange(20).expand(2, 20) + 1000), atol=1e-8)
    assert not torch.allclose(out, model(ids, positions=torch.arange(20).expand(2, 20) * 3), atol=1e-4)


def test_tied_embeddings_and_init_scale():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=64, tie_embeddings=True)
    model = Llama(cfg, AttentionConfig(kind="full"))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 2e-3


def test_layer_list_must_match_the_depth():
    """An explicit attention.layers list of another length than model.n_layers: an error, not a model of the
    list's depth (validate() catches it in configs; this is the API's own check)."""
    with pytest.raises(ValueError, match="attention.layers has 2 entries; the model has 4 layers"):
        Llama(ModelConfig(n_layers=4), AttentionConfig(layers=["moba", "full"]))


def test_compiled_norms_and_mlp_match_eager():
    """train.compile=true (parallel.apply_compile: each block's norms and MLP through torch.compile) computes the
    same loss and gradients as the eager model."""
    import copy

    from moba_train.parallel import apply_compile

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    eager = make(AttentionConfig(block_size=16, top_k=2, backend="naive"), cfg=cfg).float()
    compiled = apply_compile(copy.deepcopy(eager))
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (eager, compiled):
        loss, _ = model(ids, labels=ids.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))
