"""Bradley-Terry reward model (jobs/rlhf/reward_model.py): learns a preference, held-out accuracy with its interval."""

from __future__ import annotations

import random

import pytest
import torch

from jobs.rlhf import reward_model as rm
from llm_core.value_model import ScalarHeadModel
from tests.test_rl_grpo import PAD, tiny


def synthetic_pairs(n: int, seed: int) -> list[rm.Pair]:
    """Chosen answers contain token 7, rejected ones do not: a preference a tiny model can learn."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randint(2, 6) for _ in range(3)]
        body = [rng.choice([2, 3, 4, 5, 6, 8, 9]) for _ in range(rng.randint(2, 5))]
        chosen = prompt + body[:1] + [7] + body[1:]
        rejected = prompt + body
        pairs.append((chosen, rejected))
    return pairs


def test_reward_model_learns_a_preference_and_reports_its_interval():
    torch.manual_seed(0)
    model = ScalarHeadModel(tiny(seed=0))
    train, held = synthetic_pairs(200, seed=0), synthetic_pairs(80, seed=1)
    before = rm.evaluate(model, held, PAD)
    losses = rm.train(model, train, PAD, steps=120, lr=3e-3, batch_size=16)
    after = rm.evaluate(model, held, PAD)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert after.accuracy >= 0.9 and after.ci_low > 0.5 > before.ci_low  # above chance, with confidence
    assert after.margin > 0 and after.pairs == 80


def test_wilson_interval_by_hand():
    low, high = rm.wilson_interval(8, 10)
    # Wilson's formula with p = 0.8, n = 10, z = 1.96
    z = 1.959964
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * ((0.8 * 0.2 / 10 + z * z / 400) ** 0.5) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value for 8/10
    with pytest.raises(ValueError, match="no held-out pairs"):
        rm.wilson_interval(0, 0)


def test_encode_pairs_checks_records():
    class FakeTokenizer:
        def encode_chat(self, msgs):
            text = " ".join(m["content"] for m in msgs)
            return [len(w) for w in text.split()], None

    tok = FakeTokenizer()
    got = rm.encode_pairs(
        [
            {"prompt": "a bb", "chosen": "ccc", "rejected": "dddd"},
            {"prompt": "x", "chosen": "same", "rejected": "same"},  # skipped: nothing to prefer
        ],
        tok,
        seq_len=8,
    )
    assert got == [([1, 2, 3], [1, 2, 4])]
    with pytest.raises(ValueError, match=r"record 1: missing \['rejected'\]"):
        rm.encode_pairs([{"prompt": "a", "chosen": "b"}], tok, seq_len=8)
