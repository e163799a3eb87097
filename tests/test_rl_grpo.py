"""GRPO on a tiny llm_core model (jobs/rlhf/grpo.py): batch layout, ratio 1 on the first update, and learning."""

from __future__ import annotations

import pytest
import torch

from jobs.rlhf.grpo import GRPOConfig, completion_logprobs, grpo_iteration, sample_groups
from llm_core.config import ModelConfig
from llm_core.model import Transformer

EOS, PAD, TARGET = 1, 0, 7


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=16, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=24, ffn_hidden_dim=64
    )
    return Transformer(cfg)


def test_batch_layout_masks_exactly_the_completion():
    model = tiny()
    cfg = GRPOConfig(group_size=3, max_new_tokens=5)
    prompts = [[2, 3], [4, 5, 6]]
    b = sample_groups(model, prompts, cfg, EOS, PAD, seed=0)
    assert b.input_ids.shape[0] == 6 and len(b.completions) == 6
    for i, c in enumerate(b.completions):
        p = prompts[i // 3]
        assert b.input_ids[i, : len(p)].tolist() == p
        assert b.input_ids[i, len(p) : len(p) + len(c)].tolist() == c
        assert int(b.completion_mask[i].sum()) == len(
            c
        )  # one target per completion token, none for the prompt
        assert 1 <= len(c) <= 5 and (c[-1] == EOS or len(c) == 5) and EOS not in c[:-1]
    with pytest.raises(ValueError, match="prompt set is empty"):
        sample_groups(model, [], cfg, EOS, PAD)


def test_first_update_has_ratio_exactly_one():
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = GRPOConfig(group_size=4, max_new_tokens=4, updates_per_batch=3)
    rewards, stats = grpo_iteration(model, opt, [[2, 3]], lambda i, c: float(c[0]), cfg, EOS, PAD, seed=1)
    assert len(rewards) == 4 and len(stats) == 3
    assert (
        stats[0].ratio_mean == 1.0 and stats[0].clip_fraction == 0.0 and stats[0].ratio_max_deviation == 0.0
    )
    assert stats[1].ratio_max_deviation > 0
    assert stats[1].ratio_mean != 1.0  # later updates move away from the sampling policy


def test_kl_needs_a_reference_and_is_zero_at_the_start():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = GRPOConfig(group_size=2, max_new_tokens=3, kl_coef=0.1)
    with pytest.raises(ValueError, match="needs a reference"):
        grpo_iteration(model, opt, [[2]], lambda i, c: 0.0, cfg, EOS, PAD)
    _, stats = grpo_iteration(model, opt, [[2]], lambda i, c: 0.0, cfg, EOS, PAD, reference=tiny(), seed=0)
    assert stats[0].kl == 0.0  # the same weights as the reference: no divergence


def test_grpo_raises_a_learnable_reward():
    """Reward: the share of completion tokens that are TARGET (chance ~1/16). GRPO must push it up by >= 0.3."""
    model = tiny(seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = GRPOConfig(group_size=8, max_new_tokens=6, updates_per_batch=2)
    prompts = [[2, 3], [4, 5], [6, 8]]

    def reward(i: int, c: list[int]) -> float:
        return sum(t == TARGET for t in c) / len(c)

    history = []
    for it in range(25):
        rewards, _ = grpo_iteration(model, opt, prompts, reward, cfg, EOS, PAD, seed=it)
        history.append(sum(rewards) / len(rewards))
    start, end = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert end - start >= 0.3, history
    # and the probability the policy gives TARGET after a prompt went up (greedy now picks it)
    b = sample_groups(model, prompts, GRPOConfig(group_size=2, max_new_tokens=3, temperature=1e-4), EOS, PAD)
    assert all(TARGET in c for c in b.completions)
    assert completion_logprobs(model, b).sum() <= 0


def test_bad_settings():
    with pytest.raises(ValueError, match="grpo.group_size 1: .* at least 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="loss_aggregation 'sum'"):
        GRPOConfig(loss_aggregation="sum")


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batched_step_equals_the_whole_batch_step(aggregation):
    """An update accumulated over micro-batches of at most 12 tokens moves the weights as the one-batch update."""
    from jobs.rlhf.grpo import micro_batches, policy_step

    batch = sample_groups(
        tiny(), [[2, 3], [4, 5, 6]], GRPOConfig(group_size=3, max_new_tokens=5), EOS, PAD, seed=3
    )
    assert len(micro_batches(batch, 12)) > 2
    adv = torch.linspace(-1, 1, 6)
    after = []
    for tokens in (None, 12):
        model = tiny(seed=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with torch.no_grad():
            old = (
                completion_logprobs(model, batch) - 0.05 * batch.completion_mask
            )  # ratio != 1: clipping acts
        stats = policy_step(
            model,
            opt,
            batch,
            old,
            adv,
            clip_low=0.02,
            clip_high=0.02,
            aggregation=aggregation,
            norm_tokens=5,
            micro_batch_tokens=tokens,
        )
        after.append((torch.cat([p.detach().flatten() for p in model.parameters()]), stats))
    (w_full, s_full), (w_micro, s_micro) = after
    assert torch.allclose(w_full, w_micro, atol=1e-6)
    assert s_full.clip_fraction == pytest.approx(s_micro.clip_fraction, abs=1e-6) and s_full.clip_fraction > 0
    assert s_full.loss == pytest.approx(s_micro.loss, abs=1e-6)
    assert s_full.entropy == pytest.approx(s_micro.entropy, rel=1e-5)
    # the micro-batched log-probs equal the whole batch's
    model = tiny(seed=4)
    assert torch.allclose(completion_logprobs(model, batch), completion_logprobs(model, batch, 12), atol=1e-6)
