import pytest
import torch

from llm_core.model import KVCache, Transformer
from tests.conftest import small_config, small_moe_config


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("make_cfg", [small_config, small_moe_config], ids=["dense", "moe"])
def test_kv_cache_logits_equal_full_forward(make_cfg):
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
