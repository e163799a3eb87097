"""Losses for SFT/DPO/distillation against numbers worked out by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from llm_core.losses import distill_loss, dpo_loss, sequence_logprobs, token_logprobs


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


# ------------------------------------------------------------------------------------ log-probs


def test_token_and_sequence_logprobs_match_a_manual_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    targets = torch.tensor([[1, 4, -100, 0], [-100, -100, 2, 3]])
    got = token_logprobs(logits, targets)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    want = [[0.0] * 4 for _ in range(2)]
    for b in range(2):
        for t in range(4):
            if targets[b, t] != -100:
                want[b][t] = log_softmax(logits[b, t].tolist())[targets[b, t]]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        sequence_logprobs(logits, targets), torch.tensor([sum(want[0]), sum(want[1])]), atol=1e-6, rtol=0
    )
    # bf16 logits: the result is fp32 and matches the fp32 computation on the same (rounded) logits
    low = logits.bfloat16()
    torch.testing.assert_close(token_logprobs(low, targets), token_logprobs(low.float(), targets))


def test_ignored_positions_get_no_gradient() -> None:
    logits = torch.randn(1, 3, 4, requires_grad=True)
    sequence_logprobs(logits, torch.tensor([[2, -100, 1]])).sum().backward()
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[0, 0].abs().max() > 0
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- DPO


def test_dpo_loss_gradients_and_metrics_match_hand_computation() -> None:
    beta, eps = 0.5, 0.1
    pc, pr = [-1.0, -3.0, -1.0], [-2.0, -2.5, -1.0]
    rc, rr = [-1.5, -2.0, -1.0], [-1.8, -2.2, -1.0]
    # h = (pc - pr) - (rc - rr): 1.0 - 0.3 = 0.7;  -0.5 - 0.2 = -0.7;  0 - 0 = 0
    h = [0.7, -0.7, 0.0]
    per_pair = [-(1 - eps) * math.log(sigmoid(beta * x)) - eps * math.log(sigmoid(-beta * x)) for x in h]
    want_loss = sum(per_pair) / 3
    # d/dh of one pair's loss: -(1-eps) beta sigmoid(-beta h) + eps beta sigmoid(beta h); the mean divides by 3
    dh = [(-(1 - eps) * beta * sigmoid(-beta * x) + eps * beta * sigmoid(beta * x)) / 3 for x in h]

    inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (pc, pr, rc, rr)]
    loss, metrics = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(want_loss, abs=1e-6)
    loss.backward()
    for tensor, sign in zip(inputs, (1, -1, -1, 1)):  # dh/dpc = 1, dh/dpr = -1, dh/drc = -1, dh/drr = 1
        torch.testing.assert_close(
            tensor.grad.float(), torch.tensor([sign * d for d in dh]), atol=1e-6, rtol=0
        )

    # rewards: chosen beta (pc - rc) = 0.25, -0.5, 0; rejected beta (pr - rr) = -0.1, -0.15, 0
    assert metrics["rewards/chosen"] == pytest.approx((0.25 - 0.5 + 0.0) / 3, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx((-0.1 - 0.15 + 0.0) / 3, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx((0.35 - 0.35 + 0.0) / 3, abs=1e-6)
    assert metrics["rewards/accuracy"] == pytest.approx(1 / 3)  # a tie (pair 3) is not a win
    assert all(isinstance(v, float) for v in metrics.values())


def test_dpo_without_smoothing_is_minus_logsigmoid_and_validates() -> None:
    loss, metrics = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1
    )
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.1 * 3.0)), abs=1e-6)
    assert metrics["rewards/accuracy"] == 1.0
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, x, x, torch.zeros(3), beta=0.1)


# ---------------------------------------------------------------------------------------- distillation


def test_distill_matches_hand_computation_on_one_position() -> None:
    s, t, T, alpha = [1.0, 0.0, -1.0], [0.5, 0.5, 0.0], 2.0, 0.7
    log_ps, log_pt = log_softmax([v / T for v in s]), log_softmax([v / T for v in t])
    p_s, p_t = [math.exp(v) for v in log_ps], [math.exp(v) for v in log_pt]
    kl = sum(pt * (lt - ls) for pt, lt, ls in zip(p_t, log_pt, log_ps))
    ce = -log_softmax(s)[0]
    want = alpha * T * T * kl + (1 - alpha) * ce
    # d/ds: alpha T^2 (p_s - p_t) / T + (1 - alpha) (softmax(s) - onehot(0))
    q = [math.exp(v) for v in log_softmax(s)]
    want_grad = [
        alpha * T * (a - b) + (1 - alpha) * (qi - (i == 0)) for i, (a, b, qi) in enumerate(zip(p_s, p_t, q))
    ]

    # the same position plus two ignored ones with arbitrary logits: they must not contribute
    student = torch.tensor([[s, [9.0, -3.0, 2.0], [0.0, 5.0, 1.0]]], requires_grad=True)
    teacher = torch.tensor([[t, [-7.0, 4.0, 0.0], [3.0, 3.0, -2.0]]])
    targets = torch.tensor([[0, -100, -100]])
    loss, metrics = distill_loss(student, teacher, targets, temperature=T, alpha=alpha)
    assert kl > 0 and metrics["kl"] == pytest.approx(kl, abs=1e-6)
    assert metrics["ce"] == pytest.approx(ce, abs=1e-6)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(student.grad[0, 0], torch.tensor(want_grad), atol=1e-6, rtol=0)
    assert student.grad[0, 1:].abs().max() == 0


def test_distill_kl_is_zero_for_identical_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[0, :2] = -100
    student = logits.clone().requires_grad_(True)
    loss, metrics = distill_loss(student, logits, targets, temperature=3.0, alpha=1.0)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7) and loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert student.grad.abs().max() < 1e-6
    other, _ = distill_loss(logits, logits.flip(-1), targets, temperature=3.0, alpha=1.0)
    assert other.item() > 1e-3
    # the CE part is the mean token cross-entropy over the non-ignored positions
    _, m = distill_loss(logits, logits, targets, temperature=1.0, alpha=0.0)
    assert m["ce"] == pytest.approx(-token_logprobs(logits, targets).sum().item() / 8, abs=1e-5)


def test_distill_rejects_mismatched_vocabularies() -> None:
    with pytest.raises(ValueError, match=r"teacher vocab size 7 != student vocab size 5"):
        distill_loss(
            torch.zeros(1, 2, 5),
            torch.zeros(1, 2, 7),
            torch.zeros(1, 2, dtype=torch.long),
            temperature=1.0,
            alpha=0.5,
        )
