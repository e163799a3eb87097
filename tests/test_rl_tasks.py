"""Verifiable RL prompt sets (jobs/rlhf/tasks.py): generated arithmetic problems and GSM8K-style jsonl."""

from __future__ import annotations

import json
import re

import pytest

from jobs.rlhf import tasks
from jobs.rlhf.rewards import Rollout, exact_answer


@pytest.mark.parametrize(
    "n, want",
    [
        (1, "яблоко"),
        (2, "яблока"),
        (4, "яблока"),
        (5, "яблок"),
        (11, "яблок"),
        (12, "яблок"),
        (14, "яблок"),
        (21, "яблоко"),
        (22, "яблока"),
        (25, "яблок"),
        (101, "яблоко"),
        (111, "яблок"),
        (0, "яблок"),
    ],
)
def test_russian_plural(n, want):
    assert tasks.ru_plural(n, "яблоко", "яблока", "яблок") == want


def test_arithmetic_problems_are_deterministic_balanced_and_right():
    probs = tasks.arithmetic_problems(60, seed=3)
    assert probs == tasks.arithmetic_problems(60, seed=3)
    assert probs != tasks.arithmetic_problems(60, seed=4)
    assert [p.lang for p in probs[:6]] == ["kk", "ru", "en", "kk", "ru", "en"]
    assert len({p.id for p in probs}) == 60
    for p in probs:
        question = p.question.split("\n", 1)[1]
        a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
        assert int(p.answer) in (a + b, a - b, a * b), p
        assert "####" in p.question.split("\n", 1)[0]  # the instruction says how to answer
        # a completion in the asked format earns the exact-answer reward
        assert exact_answer()(
            Rollout(p.id, p.question, f"<think>...</think> #### {p.answer}", answer=p.answer)
        )
    ru = [p.question for p in probs if p.lang == "ru"]
    assert not any(re.search(r"\b1 (яблок|книг|тетрадей)\b", q) for q in ru)  # agreement, not a fixed plural


def test_arithmetic_problems_refuse_bad_settings():
    with pytest.raises(ValueError, match="n 0"):
        tasks.arithmetic_problems(0)
    with pytest.raises(ValueError, match="languages"):
        tasks.arithmetic_problems(3, languages=("de",))


def test_load_gsm8k(tmp_path):
    f = tmp_path / "gsm8k-kk.jsonl"
    rows = [
        {"question": "Айгүлде 3 алма бар...", "answer": "3 + 4 = 7\n#### 7"},
        {"id": "q2", "question": "Екі есе көп?", "answer": "2 * 6 = 12\n#### 1,200"},
    ]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    got = tasks.load_gsm8k(f, "kk")
    assert [(p.id, p.answer, p.lang) for p in got] == [("gsm8k-kk-1", "7", "kk"), ("q2", "1,200", "kk")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "answer": "no marker"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: empty question or no '#### <answer>'"):
        tasks.load_gsm8k(bad, "en")
    bad.write_text('{"q": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a GSM8K row"):
        tasks.load_gsm8k(bad, "en")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty prompt set"):
        tasks.load_gsm8k(empty, "en")
