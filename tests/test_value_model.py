"""Scalar-head model (reward model / critic) and the Bradley-Terry loss."""

from __future__ import annotations

import math

import pytest
import torch

from llm_core.config import ModelConfig
from llm_core.model import Transformer
from llm_core.rl_losses import bradley_terry_loss
from llm_core.value_model import ScalarHeadModel


def tiny() -> ScalarHeadModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32, ffn_hidden_dim=64
    )
    return ScalarHeadModel(Transformer(cfg)).eval()


def test_hidden_states_are_what_the_lm_head_reads():
    m = tiny()
    x = torch.randint(0, 50, (2, 7))
    assert torch.equal(m.base(x).logits, m.base.lm_head(m.base.hidden_states(x))[..., :50])


def test_sequence_scores_read_the_last_real_token_of_right_padded_batches():
    m = tiny()
    a = torch.tensor([5, 6, 7, 8, 9])
    b = torch.tensor([1, 2, 3])
    batch = torch.zeros(2, 5, dtype=torch.long)
    batch[0], batch[1, :3] = a, b
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = m.sequence_scores(batch, mask)
    alone = torch.stack([m(a[None])[0, -1], m(b[None])[0, -1]])  # each sequence by itself, no padding
    assert torch.allclose(got, alone, atol=1e-5)
    with pytest.raises(ValueError, match="without any real token"):
        m.sequence_scores(batch, torch.zeros_like(mask))


def test_bradley_terry_loss_by_hand_and_gradients_reach_the_trunk():
    loss, acc = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    want = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6) and acc == 0.5
    with_margin, _ = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)
    assert with_margin.item() == pytest.approx(math.log(2), rel=1e-6)  # difference 1 minus margin 1: log 2
    m = tiny().train()
    x = torch.randint(0, 50, (2, 6))
    mask = torch.ones_like(x)
    scores = m.sequence_scores(x, mask)
    loss, _ = bradley_terry_loss(scores[:1], scores[1:])
    loss.backward()
    assert m.head.weight.grad.abs().sum() > 0 and m.base.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_reward_model_hf_export_scores_equal_ours(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from llm_core.value_model import export_hf_reward_model

    m = tiny()
    out = export_hf_reward_model(m, tmp_path / "rm", pad_token_id=0)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]])
    mask = (batch != 0).long()
    with torch.no_grad():
        theirs = hf(input_ids=batch, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(theirs, m.sequence_scores(batch, mask), atol=1e-5), (
        theirs,
        m.sequence_scores(batch, mask),
    )


@pytest.mark.parametrize("tied", [True, False])
def test_load_hf_reward_model_reads_back_the_export(tmp_path, tied):
    from llm_core.export_hf import export_hf, load_hf
    from llm_core.value_model import export_hf_reward_model, load_hf_reward_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
        ffn_hidden_dim=64,
        tie_embeddings=tied,
    )
    m = ScalarHeadModel(Transformer(cfg)).eval()
    out = export_hf_reward_model(m, tmp_path / "rm", pad_token_id=0)
    back = load_hf_reward_model(out)
    batch = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]])
    mask = (batch != 0).long()
    assert torch.equal(back.sequence_scores(batch, mask), m.sequence_scores(batch, mask))
    assert back.num_params() == m.num_params() == cfg.num_params() - (0 if tied else 50 * 32) + 32
    with pytest.raises(ValueError, match=r"unexpected tensors \[score.weight\]"):
        load_hf(out)  # a reward model is not a language model
    export_hf(m.base, tmp_path / "lm")
    with pytest.raises(ValueError, match="is not a reward model"):
        load_hf_reward_model(tmp_path / "lm")
