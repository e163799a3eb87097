"""Rewards for RL (jobs/rlhf/rewards.py): answers, format, language, length, weighting and failures."""

from __future__ import annotations

import pytest

from jobs.rlhf import rewards as rw


def rollout(completion: str, **kw) -> rw.Rollout:
    return rw.Rollout(prompt_id=kw.pop("prompt_id", "p1"), prompt="q", completion=completion, **kw)


@pytest.mark.parametrize(
    "completion, answer, want",
    [
        ("5 + 7 = 12\n#### 12", "12", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("#### 1 000", "1000.0", 1.0),
        ("жауабы: \\boxed{2,5}", "2.5", 1.0),  # a decimal comma
        ("\\boxed{\\frac{1}{2}} then #### 7", "7", 1.0),  # the later of the two formats counts
        ("#### 7 then \\boxed{8}", "7", 0.0),
        ("the answer is 12", "12", 0.0),  # no answer format: not verifiable, no reward
        ("#### Astana", "astana", 1.0),
        ("#### 13", "12", 0.0),
    ],
)
def test_exact_answer(completion, answer, want):
    assert rw.exact_answer()(rollout(completion, answer=answer)) == want


def test_think_format():
    fmt = rw.think_format()
    assert fmt(rollout("<think>7 + 5 = 12</think> 12")) == 1.0
    assert fmt(rollout("<think>thinking</think>")) == 0.0  # no answer after it
    assert fmt(rollout("<think></think> 12")) == 0.0  # no thought
    assert fmt(rollout("12 <think>x</think> 12")) == 0.0  # not at the start
    assert fmt(rollout("<think>a</think> b <think>c</think> d")) == 0.0


def test_language_consistency_uses_the_preprocessing_detector():
    lang = rw.language_consistency()  # lingua, the LangIdConfig defaults
    kk = "Қазақстан Орталық Азиядағы ең үлкен мемлекет, оның астанасы Астана қаласы."
    ru = "Казахстан является крупнейшим государством Центральной Азии, его столица Астана."
    assert lang(rollout(kk, lang="kk")) == 1.0
    assert lang(rollout(ru, lang="kk")) == 0.0
    assert lang(rollout(ru, lang="ru")) == 1.0
    assert lang(rollout("12", lang="kk")) == 0.0  # too short to tell: no reward


def test_length_penalty():
    pen = rw.length_penalty(max_tokens=10, scale=5)
    assert pen(rollout("x", n_tokens=8)) == 0.0
    assert pen(rollout("x", n_tokens=20)) == -2.0


def test_weighted_total_and_per_reward_values():
    specs = [
        rw.RewardSpec(name="exact_answer", weight=1.0),
        rw.RewardSpec(name="think_format", weight=0.5),
        rw.RewardSpec(name="length_penalty", weight=2.0, params={"max_tokens": 4, "scale": 4}),
    ]
    rollouts = [
        rollout("<think>5+7</think> #### 12", answer="12", n_tokens=4),
        rollout("#### 11", answer="12", n_tokens=8),
    ]
    total, per = rw.score(rollouts, rw.build_rewards(specs))
    assert per == {"exact_answer": [1.0, 0.0], "think_format": [1.0, 0.0], "length_penalty": [0.0, -1.0]}
    assert total == [1.5, -2.0]


def test_a_failing_reward_names_the_prompt():
    specs = rw.build_rewards([rw.RewardSpec(name="exact_answer")])
    with pytest.raises(
        rw.RewardError, match="exact_answer failed on prompt p7.*needs the example's `answer`"
    ):
        rw.score([rollout("#### 1", prompt_id="p7")], specs)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([], "at least one reward"),
        ([rw.RewardSpec(name="bleu")], "'bleu' is not one of"),
        ([rw.RewardSpec(name="think_format", params={"x": 1})], "does not take params"),
        ([rw.RewardSpec(name="think_format"), rw.RewardSpec(name="think_format")], "each reward once"),
        ([rw.RewardSpec(name="length_penalty", params={"scale": 0})], "scale 0"),
    ],
)
def test_bad_reward_settings(specs, message):
    with pytest.raises(ValueError, match=message):
        rw.build_rewards(specs)
