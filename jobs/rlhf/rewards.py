"""Pluggable, weighted rewards for RL fine-tuning (issue 17): verifiable rules scored on each rollout.

A reward is built from its config (`RewardSpec`: a name from `REWARDS`, a weight, its parameters) into a function
of one `Rollout` returning a float. `score` runs every configured reward on every rollout and returns the
weighted total and each reward's own values (what MLflow logs per reward and per language). A reward function
that raises is reported as a `RewardError` naming the reward and the prompt id, never scored 0 silently.

Built in:
- `exact_answer`: 1 when the completion's final answer equals the example's `answer`. The answer is read from
  `#### <answer>` (GSM8K's format) or `\\boxed{<answer>}`, whichever comes last; numbers compare as numbers
  (1,000 = 1000 = 1000.0), anything else as case-folded text without surrounding spaces.
- `think_format`: 1 when the completion is `<think>...</think>` followed by a non-empty answer, else 0.
- `language_consistency`: 1 when the preprocessing language detector (`jobs.prep.langid`, the same settings as
  `langid:` in a preprocess config) finds the completion in the prompt's language (`Rollout.lang`); 0 otherwise,
  including completions too short to detect.
- `length_penalty`: -(tokens beyond `max_tokens`) / `scale`, 0 within the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from llm_core.config import StrictModel


@dataclass(frozen=True)
class Rollout:
    """One sampled completion and what the rewards need to score it."""

    prompt_id: str
    prompt: str
    completion: str
    lang: str = ""  # the prompt's language (kk, ru, en)
    answer: str | None = None  # the reference answer of a verifiable task
    n_tokens: int = 0  # completion length in tokens
    extra: dict[str, Any] = field(default_factory=dict)


RewardFn = Callable[[Rollout], float]


class RewardSpec(StrictModel):
    """One reward of the weighted sum."""

    name: str = Field(description="a reward of jobs.rlhf.rewards.REWARDS")
    weight: float = Field(1.0, description="its weight in the total reward")
    params: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings")


class RewardError(RuntimeError):
    """A reward function failed on a rollout (its name and the prompt id are in the message)."""


# ------------------------------------------------------------------------------------------ answers

_HASHES = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:[ ,\u00a0\u202f]\d{3})+|\d+)(?:[.,]\d+)?")


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of every \\boxed{...}, braces balanced."""
    out = []
    for m in re.finditer(r"\\boxed\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end() : i - 1]))
    return out


def final_answer(completion: str) -> str | None:
    """The completion's final answer: the last `#### x` line or `\\boxed{x}`, whichever is later; None if neither."""
    found = [(m.start(), m.group(1)) for m in _HASHES.finditer(completion)] + _boxed(completion)
    if not found:
        return None
    return max(found)[1].strip()


def _as_number(text: str) -> float | None:
    s = text.strip().rstrip(".").replace("$", "").strip()
    m = _NUMBER.fullmatch(s)
    if not m:
        return None
    s = re.sub(r"[ \u00a0\u202f]", "", s)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 or 1,000.5: thousands separators
        s = s.replace(",", "")
    else:  # 2,5 (a decimal comma, as kk/ru write it)
        s = s.replace(",", ".")
    try:
        return float(s)
    except ValueError:
        return None


def answers_equal(got: str, want: str) -> bool:
    a, b = _as_number(got), _as_number(want)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    return got.strip().casefold() == want.strip().casefold()


def exact_answer() -> RewardFn:
    def score(r: Rollout) -> float:
        if r.answer is None:
            raise ValueError("exact_answer needs the example's `answer`")
        got = final_answer(r.completion)
        return float(got is not None and answers_equal(got, r.answer))

    return score


# ------------------------------------------------------------------------------------------- format

_THINK = re.compile(r"\s*<think>(?P<thought>.+?)</think>(?P<answer>.*)", re.DOTALL)


def think_format() -> RewardFn:
    def score(r: Rollout) -> float:
        m = _THINK.fullmatch(r.completion)
        ok = m is not None and m["thought"].strip() and m["answer"].strip() and "<think>" not in m["answer"]
        return float(bool(ok))

    return score


# ------------------------------------------------------------------------------------------ language


def language_consistency(**langid_settings: Any) -> RewardFn:
    from jobs.prep import langid
    from jobs.prep.config import LangIdConfig

    cfg = LangIdConfig(**langid_settings)

    def score(r: Rollout) -> float:
        if not r.lang:
            raise ValueError("language_consistency needs the prompt's language (`lang`)")
        detected, confidence = langid.detect(r.completion, cfg)
        return float(detected == r.lang and confidence >= cfg.min_confidence)

    return score


# -------------------------------------------------------------------------------------------- length


def length_penalty(max_tokens: int = 256, scale: float = 256.0) -> RewardFn:
    if max_tokens < 0 or scale <= 0:
        raise ValueError(f"length_penalty: max_tokens {max_tokens} must be >= 0 and scale {scale} > 0")

    def score(r: Rollout) -> float:
        return -max(0, r.n_tokens - max_tokens) / scale

    return score


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "exact_answer": exact_answer,
    "think_format": think_format,
    "language_consistency": language_consistency,
    "length_penalty": length_penalty,
}


def build_rewards(specs: Sequence[RewardSpec]) -> list[tuple[RewardSpec, RewardFn]]:
    """Each spec's function; an unknown name or bad parameters is a ValueError naming the reward."""
    if not specs:
        raise ValueError("rewards: configure at least one reward (e.g. - {name: think_format})")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: each reward once, with one weight (got {names})")
    out = []
    for spec in specs:
        factory = REWARDS.get(spec.name)
        if factory is None:
            raise ValueError(f"rewards: {spec.name!r} is not one of {sorted(REWARDS)}")
        try:
            out.append((spec, factory(**spec.params)))
        except TypeError as e:
            raise ValueError(f"rewards: {spec.name} does not take params {spec.params} ({e})") from None
    return out


def score(
    rollouts: Sequence[Rollout], rewards: Sequence[tuple[RewardSpec, RewardFn]]
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per rollout, each reward's values per rollout)."""
    per: dict[str, list[float]] = {}
    for spec, fn in rewards:
        values = []
        for r in rollouts:
            try:
                v = float(fn(r))
            except Exception as e:  # noqa: BLE001 - re-raised with the reward and the prompt that failed
                raise RewardError(
                    f"reward {spec.name} failed on prompt {r.prompt_id}: {type(e).__name__}: {e}"
                ) from e
            if not math.isfinite(v):
                raise RewardError(f"reward {spec.name} gave {v} on prompt {r.prompt_id}")
            values.append(v)
        per[spec.name] = values
    total = [sum(spec.weight * per[spec.name][i] for spec, _ in rewards) for i in range(len(rollouts))]
    return total, per
