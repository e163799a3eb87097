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
- `reward_model`: a Bradley-Terry reward model's score of prompt + completion (jobs/rlhf/model_rewards.py); its
  tokenizer must be the policy's, so it needs the `RewardContext`.
- `judge`: an OpenAI-compatible chat endpoint grading the completion 0..max_score, as score / max_score
  (jobs/rlhf/model_rewards.py).

Model rewards score a whole rollout batch at once: a reward object may have `score_batch(rollouts) -> list[float]`
(`BatchReward`), which `score` calls once per batch instead of calling the object per rollout. Rewards that need
the run's context (the policy's tokenizer, Settings for the registry, the torch device) declare a `context`
parameter; `build_rewards(specs, context)` passes it.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import Field

from llm_core.config import StrictModel

if TYPE_CHECKING:
    import torch

    from jobs.platform.runtime import Settings
    from llm_core.tokenizer import Tokenizer


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


@runtime_checkable
class BatchReward(Protocol):
    """A reward that scores a whole rollout batch in one go (a model forward, parallel judge requests). A failure
    on one rollout is a RewardError naming the reward and that rollout's prompt id."""

    def score_batch(self, rollouts: Sequence[Rollout]) -> list[float]: ...


@dataclass(frozen=True)
class RewardContext:
    """What rewards that load models need from the run: the policy's tokenizer (a reward model must share it),
    Settings (to resolve registered models; None reads the environment) and the torch device to score on."""

    tokenizer: Tokenizer
    settings: Settings | None = None
    device: str | torch.device = "cpu"
    policy: str = "the policy"  # how error messages name the policy model (e.g. its models:/ reference)


class RewardSpec(StrictModel):
    """One reward of the weighted sum."""

    name: str = Field(description="a reward of jobs.rlhf.rewards.REWARDS")
    weight: float = Field(1.0, description="its weight in the total reward")
    params: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings")


class RewardError(RuntimeError):
    """A reward function failed on a rollout (its name and the prompt id are in the message)."""


def rollout_error(reward: str, rollout: Rollout, problem: str) -> RewardError:
    """The RewardError a batch reward raises for one rollout: `reward <name> failed on prompt <id>: <problem>`."""
    return RewardError(f"reward {reward} failed on prompt {rollout.prompt_id}: {problem}")


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


# ------------------------------------------------------------------------------------------- models


def reward_model(context: RewardContext | None = None, **params: Any) -> RewardFn:
    """A registered (or local HF) reward model; see jobs.rlhf.model_rewards.reward_model."""
    from jobs.rlhf.model_rewards import reward_model as build

    return build(context, **params)


def judge(**params: Any) -> RewardFn:
    """An OpenAI-compatible judge endpoint; see jobs.rlhf.model_rewards.judge."""
    from jobs.rlhf.model_rewards import judge as build

    return build(**params)


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "exact_answer": exact_answer,
    "think_format": think_format,
    "language_consistency": language_consistency,
    "length_penalty": length_penalty,
    "reward_model": reward_model,
    "judge": judge,
}


def build_rewards(
    specs: Sequence[RewardSpec], context: RewardContext | None = None
) -> list[tuple[RewardSpec, RewardFn]]:
    """Each spec's function; an unknown name or bad parameters is a ValueError naming the reward. Factories with
    a `context` parameter get `context` (the run's RewardContext; None where the caller has none)."""
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
        params = dict(spec.params)
        if "context" in params:
            raise ValueError(f"rewards: {spec.name}: `context` is not a parameter (the run passes it)")
        if "context" in inspect.signature(factory).parameters:
            params["context"] = context
        try:
            out.append((spec, factory(**params)))
        except TypeError as e:
            raise ValueError(f"rewards: {spec.name} does not take params {spec.params} ({e})") from None
    return out


def _score_each(name: str, fn: RewardFn, rollouts: Sequence[Rollout]) -> list[float]:
    values = []
    for r in rollouts:
        try:
            values.append(float(fn(r)))
        except Exception as e:  # noqa: BLE001 - re-raised with the reward and the prompt that failed
            raise RewardError(f"reward {name} failed on prompt {r.prompt_id}: {type(e).__name__}: {e}") from e
    return values


def _score_batch(name: str, fn: BatchReward, rollouts: Sequence[Rollout]) -> list[float]:
    try:
        values = [float(v) for v in fn.score_batch(rollouts)]
    except RewardError:  # already names the reward and the prompt
        raise
    except Exception as e:  # noqa: BLE001 - no single rollout to blame: name the batch's prompts
        ids = [r.prompt_id for r in rollouts]
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} prompts)" if len(ids) > 8 else "")
        raise RewardError(
            f"reward {name} failed on the batch of prompts {shown}: {type(e).__name__}: {e}"
        ) from e
    if len(values) != len(rollouts):
        raise RewardError(f"reward {name} returned {len(values)} values for {len(rollouts)} rollouts")
    return values


def score(
    rollouts: Sequence[Rollout], rewards: Sequence[tuple[RewardSpec, RewardFn]]
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per rollout, each reward's values per rollout). A `BatchReward` scores the whole batch in
    one call, any other reward one rollout at a time; a failure or a non-finite value names the prompt id."""
    per: dict[str, list[float]] = {}
    for spec, fn in rewards:
        if not rollouts:
            values: list[float] = []
        elif isinstance(fn, BatchReward):
            values = _score_batch(spec.name, fn, rollouts)
        else:
            values = _score_each(spec.name, fn, rollouts)
        for r, v in zip(rollouts, values):
            if not math.isfinite(v):
                raise RewardError(f"reward {spec.name} gave {v} on prompt {r.prompt_id}")
        per[spec.name] = values
    total = [sum(spec.weight * per[spec.name][i] for spec, _ in rewards) for i in range(len(rollouts))]
    return total, per
