"""RL losses (llm_core/rl_losses.py) against hand computation on toy batches."""

from __future__ import annotations

import math

import pytest
import torch

from llm_core import rl_losses as rl


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # prompt 1: samples 0-2, prompt 2: samples 3-5
    got = rl.group_advantages(rewards, group_size=3, eps=0.0)
    # group 1: mean 1/3, std (Bessel) sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s1 = math.sqrt(1 / 3)
    # group 2: mean 5/3, std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    want = [(2 / 3) / s1, (-1 / 3) / s1, (-1 / 3) / s1, (-2 / 3) / s1, (1 / 3) / s1, (1 / 3) / s1]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    unscaled = rl.group_advantages(rewards, group_size=3, scale=False)  # Dr. GRPO: no std division
    assert torch.allclose(unscaled, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]), atol=1e-6)
    equal = rl.group_advantages(torch.tensor([0.5, 0.5]), group_size=2)
    assert torch.equal(equal, torch.zeros(2))  # a group whose samples all score the same teaches nothing


@pytest.mark.parametrize(
    "rewards, group_size, message",
    [(torch.ones(4), 1, "at least 2"), (torch.ones(5), 2, "whole groups")],
)
def test_group_advantages_refuse_bad_groups(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        rl.group_advantages(rewards, group_size)


def test_kl_k3_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.2)])
    got = rl.kl_k3(logp, ref)
    r = math.log(0.25) - math.log(0.5)
    assert got[0].item() == pytest.approx(math.exp(r) - r - 1)  # 0.5 + ln 2 - 1
    assert got[1].item() == 0.0  # same probability: no divergence
    # unbiased: the mean of k3 over samples of p equals KL(p || q) for two categorical distributions
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    expected_k3 = (p * rl.kl_k3(p.log(), q.log())).sum()
    assert expected_k3.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)


def test_clipped_policy_loss_by_hand():
    # two sequences of 3 tokens; the second has only 2 counted tokens
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.5, 0.3], [0.55, 0.9, 0.5]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    out = rl.clipped_policy_loss(new, old, adv, mask, clip_low=0.2, aggregation="token-mean")
    ratios = [[1.6, 1.0, 0.6], [1.1, 1.8]]
    per_tok = []
    for r in ratios[0]:  # A = 1: max(-r, -clip(r)) -> -min(r, clip(r))
        per_tok.append(max(-r, -min(max(r, 0.8), 1.2)))
    for r in ratios[1]:  # A = -2: max(2r, 2 clip(r))
        per_tok.append(max(2 * r, 2 * min(max(r, 0.8), 1.2)))
    assert per_tok == pytest.approx([-1.2, -1.0, -0.6, 2.2, 3.6])
    assert out.loss.item() == pytest.approx(sum(per_tok) / 5, rel=1e-6)
    # the clipped term is taken only for ratio 1.6 with A > 0 (-1.2 > -1.6); 0.6 with A > 0 keeps -0.6 (the
    # clipped -0.8 is smaller), and 1.8 with A < 0 keeps 3.6 (the clipped 2.4 is smaller)
    assert out.clip_fraction == pytest.approx(1 / 5)
    assert out.ratio_mean == pytest.approx((1.6 + 1.0 + 0.6 + 1.1 + 1.8) / 5, rel=1e-6)
    seq_mean = rl.clipped_policy_loss(new, old, adv, mask, aggregation="seq-mean-token-mean").loss
    assert seq_mean.item() == pytest.approx(((-1.2 - 1.0 - 0.6) / 3 + (2.2 + 3.6) / 2) / 2, rel=1e-6)
    dr = rl.clipped_policy_loss(
        new, old, adv, mask, aggregation="seq-mean-token-sum-norm", norm_tokens=4
    ).loss
    assert dr.item() == pytest.approx(sum(per_tok) / (2 * 4), rel=1e-6)
    # asymmetric clip (DAPO's clip-higher): 1.6 is clipped to 1.28 instead of 1.2
    high = rl.clipped_policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert high.loss.item() == pytest.approx((sum(per_tok) + 1.2 - 1.28) / 5, rel=1e-6)


def test_first_update_has_ratio_one_and_the_plain_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, requires_grad=True)
    logp = torch.log_softmax(logits, dim=-1)
    mask = torch.ones(2, 4)
    adv = torch.tensor([0.5, -1.0])
    out = rl.clipped_policy_loss(logp, logp.detach(), adv, mask)
    assert out.ratio_mean == pytest.approx(1.0) and out.clip_fraction == 0.0
    out.loss.backward()
    # at ratio 1 the gradient is that of -mean(A * logp): REINFORCE with the advantage
    ref = logits.detach().clone().requires_grad_(True)
    (-(adv.unsqueeze(1) * torch.log_softmax(ref, dim=-1)).mean()).backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-7)


def test_kl_penalty_is_added_per_token():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    base = rl.clipped_policy_loss(logp, logp, torch.zeros(1), mask)
    with_kl = rl.clipped_policy_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref, kl_coef=0.1)
    k = rl.kl_k3(logp, ref)
    assert with_kl.kl == pytest.approx(k.mean().item())
    assert (with_kl.loss - base.loss).item() == pytest.approx(0.1 * k.mean().item(), rel=1e-6)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # sequence 2 ends after 2 tokens (the 9.0 is padding)
    gamma, lam = 0.9, 0.8
    adv, ret = rl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    # sequence 1, backwards
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # sequence 2: its last counted token bootstraps from 0, not from the padding's 9.0
    e1 = 2.0 - 0.5
    e0 = gamma * 0.5 - 1.0
    b1 = e1
    b0 = e0 + gamma * lam * b1
    want = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    assert torch.allclose(adv, want, atol=1e-6)
    assert torch.allclose(ret, (want + values) * mask, atol=1e-6)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2)
    got = rl.clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V 1.0, clipped 0.7: max((1-2)^2, (0.7-2)^2) = 1.69; token 2: V 0.0, clipped 0.3: max(0, 0.09)
    assert got.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2, rel=1e-6)
    plain = rl.clipped_value_loss(values, old, returns, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_bad_settings_name_the_value():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss aggregation 'sum'"):
        rl.aggregate(x, torch.ones(1, 2), "sum")
    with pytest.raises(ValueError, match="shape"):
        rl.clipped_policy_loss(x, x, torch.zeros(1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="value clip"):
        rl.clipped_value_loss(x, x, x, torch.ones(1, 2), clip=0.0)


def test_kl_controllers_by_hand():
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(10.0, 100) == 0.05
    ada = rl.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9 is 50% over target: the error is clipped to +0.2 -> x (1 + 0.2 * 256 / 10000)
    assert ada.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    before = ada.value
    # KL 5.4 is 10% under target -> x (1 - 0.1 * 512 / 10000)
    assert ada.update(5.4, 512) == pytest.approx(before * (1 - 0.1 * 512 / 10_000))
    with pytest.raises(ValueError, match="target 0"):
        rl.AdaptiveKLController(0.1, target=0, horizon=10)
