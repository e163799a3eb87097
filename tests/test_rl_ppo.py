"""PPO with a critic on a tiny llm_core model (jobs/rlhf/ppo.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from jobs.rlhf.ppo import PPOConfig, ppo_iteration
from llm_core.rl_losses import AdaptiveKLController
from llm_core.value_model import ScalarHeadModel
from tests.test_rl_grpo import EOS, PAD, TARGET, tiny


def reward(i: int, c: list[int]) -> float:
    return sum(t == TARGET for t in c) / len(c)


def run(iterations: int, kl: bool = False, seed: int = 2):
    policy = tiny(seed=seed)
    critic = ScalarHeadModel(copy.deepcopy(policy))
    reference = copy.deepcopy(policy) if kl else None
    controller = AdaptiveKLController(0.05, target=1.0, horizon=1000) if kl else None
    p_opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    c_opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    cfg = PPOConfig(samples_per_prompt=8, max_new_tokens=6, updates_per_batch=2)
    prompts = [[2, 3], [4, 5], [6, 8]]
    return [
        ppo_iteration(
            policy, critic, p_opt, c_opt, prompts, reward, cfg, EOS, PAD, reference, controller, seed=it
        )[1]
        for it in range(iterations)
    ]


def test_ppo_raises_a_learnable_reward_and_its_critic_learns():
    stats = run(25)
    start = sum(s.reward_mean for s in stats[:3]) / 3
    end = sum(s.reward_mean for s in stats[-3:]) / 3
    assert end - start >= 0.3, [round(s.reward_mean, 3) for s in stats]
    # the critic's loss on fresh rollouts (before it updates on them) falls as it learns the returns
    first = [s.value_loss_first for s in stats]
    assert sum(first[-5:]) / 5 < 0.25 * sum(first[:3]) / 3, [round(v, 4) for v in first]


def test_ppo_with_kl_penalty_tracks_the_divergence():
    stats = run(4, kl=True)
    assert stats[0].kl == 0.0  # the policy starts as the reference
    assert stats[-1].kl != 0.0 and stats[-1].kl_coef != 0.05  # it moved away, and the coefficient adapted


def test_kl_settings_go_together():
    with pytest.raises(ValueError, match="both a reference model and a KL controller"):
        policy = tiny()
        ppo_iteration(
            policy,
            ScalarHeadModel(copy.deepcopy(policy)),
            torch.optim.SGD(policy.parameters(), lr=0.0),
            torch.optim.SGD(policy.parameters(), lr=0.0),
            [[2]],
            reward,
            PPOConfig(max_new_tokens=2),
            EOS,
            PAD,
            reference=policy,
        )
