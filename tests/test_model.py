import pytest
import torch

from llm_core.config import ModelConfig
from llm_core.generate import SamplingParams, generate
from llm_core.model import KVCache, Transformer
from tests.conftest import small_config, small_mla_config, small_moe_config


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def small_mla_q_lora_config():
    return small_mla_config(q_lora_rank=24)


@pytest.mark.parametrize(
    "make_cfg",
    [small_config, small_moe_config, small_mla_config, small_mla_q_lora_config],
    ids=["dense", "moe", "mla", "mla-q-lora"],
)
def test_kv_cache_logits_equal_full_forward(make_cfg):
    # MLA: the prefill decompresses keys/values (naive form), the chunk and single-token steps attend over the
    # cached latents (absorbed form); both must give the full forward's logits
    cfg = make_cfg()
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(cfg, 3, 40)
        parts = [model(x[:, :17], kv_cache=cache).logits]  # prefill
        parts.append(model(x[:, 17:23], kv_cache=cache).logits)  # a chunk of several tokens
        for t in range(23, 40):  # then one token at a time
            parts.append(model(x[:, t : t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = small_config()
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    y = x.clone()
    y[:, 20:] = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-6, rtol=0)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_packed_segments_do_not_see_each_other():
    cfg = small_config()
    model = build(cfg)
    s1, s2 = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 9))
    packed = torch.cat([s1, s2], dim=1)
    segments = torch.tensor([[0] * 12 + [1] * 9])
    # each packed sample restarts its positions at 0, as when it is alone
    positions = torch.cat([torch.arange(12), torch.arange(9)])[None]
    with torch.no_grad():
        out = model(packed, segment_ids=segments, position_ids=positions).logits
        alone1, alone2 = model(s1).logits, model(s2).logits
    torch.testing.assert_close(out[:, :12], alone1, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 12:], alone2, atol=1e-5, rtol=0)


def test_left_padding_mask_matches_unpadded():
    cfg = small_config()
    model = build(cfg)
    seq = torch.randint(1, 256, (1, 10))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(padded, attention_mask=mask, position_ids=positions).logits[:, 5:]
        b = model(seq).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_loss_ignores_masked_targets():
    cfg = small_config()
    model = build(cfg)
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    y_masked = y.clone()
    y_masked[:, :8] = -100
    logits = model(x).logits
    manual = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 256), y[:, 8:].reshape(-1))
    torch.testing.assert_close(model(x, y_masked).loss, manual)


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    cfg = small_config(max_seq_len=32)
    model = build(cfg)
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_moe_aux_loss_routing_and_shared_expert():
    cfg = small_moe_config(num_experts=8, num_experts_per_token=2)
    model = build(cfg)
    x = torch.randint(0, 256, (4, 64))
    out = model(x, x)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + cfg.aux_loss_coef * out.aux_loss)
    for layer in model.layers:
        counts = layer.mlp.last_expert_counts
        assert counts.sum().item() == 4 * 64 * 2
        assert (counts > 0).all(), (
            f"every expert should receive tokens on random input, got {counts.tolist()}"
        )
    # the shared expert is always active: it receives gradient from every token position
    out.loss.backward()
    moe = model.layers[0].mlp
    assert moe.shared.gate_proj.weight.grad.abs().sum() > 0
    x1 = torch.randn(1, 5, cfg.dim)
    with torch.no_grad():
        base = moe(x1)
        moe.shared.down_proj.weight.add_(0.5)
        changed = moe(x1)
    assert ((changed - base).abs().amax(dim=-1) > 0).all(), (
        "every token's output depends on the shared expert"
    )


def test_moe_matches_a_per_token_reference():
    """Sorting/dispatch must give exactly what routing each token by hand gives."""
    cfg = small_moe_config(num_experts=4, num_experts_per_token=2, num_shared_experts=0)
    moe = build(cfg).layers[0].mlp
    x = torch.randn(2, 7, cfg.dim)
    with torch.no_grad():
        got = moe(x).view(-1, cfg.dim)
        ref = []
        for tok in x.view(-1, cfg.dim):
            probs = torch.softmax(moe.router(tok), -1)
            w, e = probs.topk(2)
            w = w / w.sum()
            y = sum(
                wi
                * (torch.nn.functional.silu(moe.w_gate[ei] @ tok) * (moe.w_up[ei] @ tok))
                @ moe.w_down[ei].t()
                for wi, ei in zip(w, e.tolist())
            )
            ref.append(y)
    torch.testing.assert_close(got, torch.stack(ref), atol=1e-5, rtol=0)


def test_rope_scaling_variants_run_and_differ():
    plain = build(small_config(max_seq_len=256))
    x = torch.randint(0, 256, (1, 100))
    outs = {}
    for kind in ("llama3", "yarn"):
        cfg = small_config(
            max_seq_len=256, rope_scaling={"type": kind, "factor": 4.0, "original_max_seq_len": 64}
        )
        model = Transformer(cfg).eval()
        model.load_state_dict(plain.state_dict())
        with torch.no_grad():
            outs[kind] = model(x).logits
        assert torch.isfinite(outs[kind]).all()
    with torch.no_grad():
        base = plain(x).logits
    assert (outs["llama3"] - base).abs().max() > 1e-4 and (outs["yarn"] - outs["llama3"]).abs().max() > 1e-4


def test_gradient_checkpointing_gives_same_gradients():
    cfg = small_config()
    model = build(cfg).train()
    x = torch.randint(0, 256, (2, 16))
    model(x, x).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, x).loss.backward()
    for a, b in zip(ref, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- multi-head latent attention


@pytest.mark.parametrize("masked", [False, True])
def test_mla_absorbed_attention_equals_naive_decompressed(masked):
    cfg = small_mla_config()
    attn = build(cfg).layers[0].attn
    g = torch.Generator().manual_seed(0)
    B, H, S = 2, cfg.num_heads, 9
    T = 3 if masked else 1  # unmasked: one decode step attends to every cached key
    q_nope = torch.randn(B, H, T, cfg.qk_nope_head_dim, generator=g)
    q_pe = torch.randn(B, H, T, cfg.qk_rope_head_dim, generator=g)
    c_kv = torch.randn(B, S, cfg.kv_lora_rank, generator=g)
    k_pe = torch.randn(B, 1, S, cfg.qk_rope_head_dim, generator=g)
    mask = None
    if masked:  # causal over the last T positions, and the first two keys of sample 0 padded away
        mask = (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None, None].repeat(B, 1, 1, 1)
        mask[0, :, :, :2] = False
    with torch.no_grad():
        naive = attn.attend_naive(q_nope, q_pe, c_kv, k_pe, mask if masked else None)
        absorbed = attn.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask if masked else None)
        # by hand: per-head keys/values from the latent, softmax(q.k * (n + r)^-0.5)
        w_uk, w_uv = attn.kv_b_proj.weight.view(H, -1, cfg.kv_lora_rank).split(
            [cfg.qk_nope_head_dim, cfg.v_head_dim], 1
        )
        k_nope = torch.einsum("bsc,hnc->bhsn", c_kv, w_uk)
        value = torch.einsum("bsc,hvc->bhsv", c_kv, w_uv)
        scores = (q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)) * cfg.qk_head_dim**-0.5
        if masked:
            scores = scores.masked_fill(~mask, float("-inf"))
        by_hand = scores.softmax(-1) @ value
    assert naive.shape == (B, H, T, cfg.v_head_dim)
    torch.testing.assert_close(naive, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(absorbed, by_hand, atol=1e-5, rtol=0)


def test_mla_cache_holds_only_the_latent_and_rotary_key():
    cfg = small_mla_config()
    cache = KVCache(cfg, 3, 20, dtype=torch.bfloat16)
    assert not hasattr(cache, "k") and not hasattr(cache, "v")
    per_token = (cache.latent.nbytes + cache.rope_key.nbytes) // (3 * 20)
    assert per_token == cfg.kv_cache_bytes_per_token(2) == cfg.num_layers * (40 + 8) * 2
    gqa = small_config()
    cache = KVCache(gqa, 3, 20, dtype=torch.bfloat16)
    assert (
        (cache.k.nbytes + cache.v.nbytes) // (3 * 20) == gqa.kv_cache_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2
    )


def test_mla_batched_left_padded_generation_equals_one_by_one():
    model = build(small_mla_config(q_lora_rank=24, init_std=0.1))
    prompts = [[5, 9, 200, 17, 3, 88, 41], [7, 7], [100, 12, 55]]
    params = SamplingParams(temperature=0, max_new_tokens=8)
    batched = generate(model, prompts, params)
    assert batched == [generate(model, [p], params)[0] for p in prompts]
    # and each greedy token is the argmax of a full (cache-free) forward over the sequence so far
    for prompt, gen in zip(prompts, batched):
        seq = prompt + gen
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == gen


def test_mla_param_count_and_gradients():
    cfg = small_mla_config(q_lora_rank=24)
    model = build(cfg)
    assert model.num_params() == cfg.num_params() == cfg.num_active_params()
    # attention by hand: q_a + q_a norm + q_b, kv_a (latent + rotary key) + its norm, kv_b, o
    H, d = 4, 64
    attn = d * 24 + 24 + 24 * H * (12 + 8) + d * (40 + 8) + 40 + 40 * H * (12 + 10) + H * 10 * d
    assert cfg.attention_params() == attn
    assert cfg.num_params() == 2 * (attn + 3 * d * 128 + 2 * d) + d + 256 * d
    x = torch.randint(0, 256, (2, 12))
    model.train()
    model(x, x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kv_lora_rank": None}, r"attention: mla needs kv_lora_rank"),
        ({"qk_rope_head_dim": None, "v_head_dim": None}, r"needs qk_rope_head_dim, v_head_dim"),
        ({"qk_rope_head_dim": 7}, r"qk_rope_head_dim = 7 must be even"),
        ({"num_kv_heads": 2}, r"num_kv_heads == num_heads .*set num_kv_heads: 4"),
        (
            {"attention": "gqa", "num_kv_heads": 2},
            r"kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim only apply to attention: mla",
        ),
        ({"kv_lora_rank": 0}, r"kv_lora_rank"),
    ],
)
def test_bad_mla_configs_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_mla_config(**overrides)


def test_gqa_configs_dump_without_mla_fields():
    """Configs from before MLA keep their exact JSON (hence config_sha256 and run keys); MLA ones round-trip."""
    dump = small_config().model_dump(mode="json")
    assert "attention" not in dump and "kv_lora_rank" not in dump
    mla = small_mla_config(q_lora_rank=24)
    assert ModelConfig.model_validate_json(mla.model_dump_json()) == mla
    assert mla.model_dump()["attention"] == "mla"
