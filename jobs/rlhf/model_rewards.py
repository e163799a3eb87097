"""Model-based rewards for RL (issue 17): a registered Bradley-Terry reward model, and an OpenAI-compatible judge.

Both are `BatchReward`s (jobs/rlhf/rewards.py): `score` hands them a whole rollout batch, and a failure on one
rollout is a `RewardError` naming the reward and the prompt id, never a silent 0.

`reward_model` (params `model`, `batch_size`, `seq_len`): `model` is a registered reference
(`models:/<name>@<alias>`, `models:/<name>/<version>`) resolved with `jobs.platform.registry.hf_model`, or a local
HF directory, written by `llm_core.value_model.export_hf_reward_model` with the tokenizer saved beside it. Its
tokenizer must be the policy's (same `Tokenizer.sha256`): the reward model reads the policy's token ids. A rollout
is scored as `jobs.rlhf.reward_model.encode_pairs` encodes a preference answer: the prompt as chat messages
(`prompt_to_messages`), the completion (stripped) as the assistant turn, through the chat template, cut to
`seq_len` tokens (default: the reward model's context); the score is `ScalarHeadModel.sequence_scores` at the last
token, `batch_size` rollouts per forward pass on the context's device. Completions are text without the stop token
(the template closes the turn); an empty one is scored as an empty answer. A rollout whose prompt alone fills
`seq_len` is a RewardError naming it (its score would not depend on the completion).

`judge` (params `base_url`, `model`, `api_key_env`, `template`, `max_score`, `max_tokens`, `timeout_s`,
`max_retries`, `backoff_s`, `concurrency`): each rollout is one chat completion (temperature 0) whose user message
is `template` with {prompt}, {completion} and {max_score} filled in. The judge answers an integer 0..max_score
(alone, optionally after a <think>...</think> block, optionally with a trailing period); the reward is
score / max_score. Connection errors, timeouts, HTTP 429 and 5xx are retried `max_retries` times with exponential
backoff (`backoff_s`, doubling); any other HTTP error, retries used up, or an answer that is not an integer in
range is a RewardError. Up to `concurrency` requests run at once.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator

from jobs.rlhf.rewards import RewardContext, Rollout, rollout_error
from llm_core.config import StrictModel

if TYPE_CHECKING:
    import torch

    from llm_core.tokenizer import Tokenizer
    from llm_core.value_model import ScalarHeadModel


def _params(reward: str, model: type[StrictModel], params: dict[str, Any]) -> Any:
    """The reward's params validated; a ValidationError becomes a ValueError naming the reward and each field."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"rewards: {reward} params {params}: {problems}") from None


# -------------------------------------------------------------------------------------- reward model


class RewardModelParams(StrictModel):
    model: str = Field(
        description="models:/<name>@<alias>, models:/<name>/<version> or an HF reward model dir"
    )
    batch_size: int = Field(16, gt=0, description="rollouts per forward pass")
    seq_len: int | None = Field(
        None, gt=0, description="tokens scored per rollout (prompt + completion), default the model's context"
    )


class RewardModelReward:
    """A `ScalarHeadModel` scoring rollouts rendered through the chat template (see the module docstring)."""

    name = "reward_model"

    def __init__(
        self,
        model: ScalarHeadModel,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        device: str | torch.device = "cpu",
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = device

    def encode(self, rollout: Rollout) -> list[int]:
        """The token ids scored for a rollout: encode_pairs' rendering of (prompt, completion), cut to seq_len.
        A rollout whose prompt (with the assistant header) fills seq_len is a ValueError: no completion token
        would be scored."""
        from llm_core.chat_data import prompt_to_messages

        tok = self.tokenizer
        prompt = prompt_to_messages(rollout.prompt, f"prompt {rollout.prompt_id}")
        ids = tok.encode_chat(prompt + [{"role": "assistant", "content": rollout.completion.strip()}])[0]
        # encode_chat renders each turn on its own: the prompt turns, then <|im_start|> "assistant\n" and the answer
        prompt_len = len(tok.encode_chat(prompt)[0]) + 1 + len(tok.encode("assistant\n"))
        if len(ids) > self.seq_len and prompt_len >= self.seq_len:
            raise ValueError(
                f"the prompt takes {prompt_len} tokens of the reward model's seq_len {self.seq_len}, so no "
                "completion token would be scored: shorten the prompt or raise seq_len (at most the reward "
                f"model's context {self.model.base.cfg.max_seq_len})"
            )
        return ids[: self.seq_len]

    def score_batch(self, rollouts: Sequence[Rollout]) -> list[float]:
        import torch

        encoded = []
        for r in rollouts:
            try:
                encoded.append(self.encode(r))
            except Exception as e:  # noqa: BLE001 - a prompt that does not render: name it
                raise rollout_error(self.name, r, f"{type(e).__name__}: {e}") from e
        scores: list[float] = []
        pad = self.tokenizer.pad_id
        with torch.inference_mode():
            for start in range(0, len(encoded), self.batch_size):
                part = encoded[start : start + self.batch_size]
                width = max(map(len, part))
                ids = torch.full((len(part), width), pad, dtype=torch.long)
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for i, seq in enumerate(part):
                    ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[i, : len(seq)] = 1
                out = self.model.sequence_scores(ids.to(self.device), mask.to(self.device))
                scores += out.float().cpu().tolist()
        return scores

    def __call__(self, rollout: Rollout) -> float:
        return self.score_batch([rollout])[0]


def reward_model(context: RewardContext | None, **params: Any) -> RewardModelReward:
    """The `reward_model` reward: resolve `model`, check its tokenizer is the policy's, load it on the device."""
    from jobs.platform.registry import hf_model
    from llm_core.tokenizer import Tokenizer
    from llm_core.value_model import load_hf_reward_model

    p: RewardModelParams = _params("reward_model", RewardModelParams, params)
    if context is None:
        raise ValueError(
            "rewards: reward_model needs the run's RewardContext (the policy's tokenizer, Settings, device): "
            "call build_rewards(specs, RewardContext(tokenizer=..., settings=..., device=...))"
        )
    settings = context.settings
    if settings is None:
        from jobs.platform.runtime import Settings

        settings = Settings.from_env()
    resolved = hf_model(p.model, settings)  # ModelReferenceError (a ValueError) names the reference
    assert resolved.path is not None
    where = p.model if resolved.uri == p.model else f"{p.model} ({resolved.uri})"
    try:
        tokenizer = Tokenizer.from_dir(resolved.path)
    except ValueError as e:
        raise ValueError(
            f"rewards: reward_model {where} has no usable tokenizer in {resolved.path} ({e}): export it with "
            "export_hf_reward_model(..., tokenizer=<the tokenizer it was trained with>)"
        ) from None
    ours, theirs = tokenizer.sha256, context.tokenizer.sha256
    if ours != theirs:
        raise ValueError(
            f"rewards: the reward model {where} and the policy {context.policy} have different tokenizers "
            f"(tokenizer.json sha256 {ours[:12]} vs {theirs[:12]}): the reward model reads the policy's token ids, "
            "so use a reward model trained from the policy's base model (the same tokenizer), or train one for "
            "this policy with jobs.reward_model"
        )
    model = load_hf_reward_model(resolved.path)
    seq_len = p.seq_len or model.base.cfg.max_seq_len
    if seq_len > model.base.cfg.max_seq_len:
        raise ValueError(
            f"rewards: reward_model seq_len {seq_len} exceeds the reward model's context "
            f"{model.base.cfg.max_seq_len} ({where}): set seq_len <= {model.base.cfg.max_seq_len} or leave it unset"
        )
    return RewardModelReward(
        model, context.tokenizer, batch_size=p.batch_size, seq_len=seq_len, device=context.device
    )


# ---------------------------------------------------------------------------------------------- judge

DEFAULT_JUDGE_TEMPLATE = (
    "You grade answers. Rate how well the answer below answers the question, from 0 (useless or wrong) to "
    "{max_score} (correct, complete and in the question's language).\n\n"
    "Question:\n{prompt}\n\nAnswer:\n{completion}\n\n"
    "Reply with one integer from 0 to {max_score} and nothing else."
)


class JudgeParams(StrictModel):
    base_url: str = Field(description="the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the judge model's name on that endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the API key, if any")
    template: str = Field(
        DEFAULT_JUDGE_TEMPLATE, description="the judge's user message: {prompt}, {completion}"
    )
    max_score: int = Field(10, gt=0, description="the judge answers an integer 0..max_score")
    max_tokens: int = Field(16, gt=0, description="the judge's answer budget (more for reasoning judges)")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="retries after a connection error, timeout, 429 or 5xx")
    backoff_s: float = Field(1.0, ge=0, description="the first retry's delay; doubles with each retry")
    concurrency: int = Field(4, gt=0, description="requests in flight at once")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        missing = [k for k in ("{prompt}", "{completion}") if k not in template]
        if missing:
            raise ValueError(f"the judge template must contain {missing} (where the rollout's text goes)")
        return template


_SCORE = re.compile(r"\s*(?:<think>.*?</think>)?\s*([+-]?\d+)\s*\.?\s*", re.DOTALL)


def parse_judge_score(reply: str, max_score: int) -> int | None:
    """The judge's integer score, or None when the reply is not one integer in 0..max_score."""
    m = _SCORE.fullmatch(reply)
    if m is None:
        return None
    value = int(m.group(1))
    return value if 0 <= value <= max_score else None


class JudgeReward:
    """Rollouts graded by a chat model behind an OpenAI-compatible API (see the module docstring)."""

    name = "judge"

    def __init__(self, params: JudgeParams, api_key: str | None):
        from openai import OpenAI

        self.params = params
        # the client's own retries are off: ours retry only what is worth retrying, with our backoff
        self.client = OpenAI(
            base_url=params.base_url, api_key=api_key or "none", timeout=params.timeout_s, max_retries=0
        )

    def message(self, rollout: Rollout) -> str:
        return (
            self.params.template.replace("{max_score}", str(self.params.max_score))
            .replace("{prompt}", rollout.prompt)
            .replace("{completion}", rollout.completion)
        )

    def _retryable(self, exc: Exception) -> bool:
        import openai

        if isinstance(exc, openai.APIConnectionError):  # timeouts too (APITimeoutError)
            return True
        return isinstance(exc, openai.APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500)

    @staticmethod
    def _describe(exc: Exception) -> str:
        import openai

        status = f"HTTP {exc.status_code} " if isinstance(exc, openai.APIStatusError) else ""
        return f"{status}{type(exc).__name__}: {exc}"

    def _ask(self, rollout: Rollout) -> str:
        import openai

        p = self.params
        delay = p.backoff_s
        for attempt in range(p.max_retries + 1):
            try:
                resp = self.client.chat.completions.create(
                    model=p.model,
                    messages=[{"role": "user", "content": self.message(rollout)}],
                    max_tokens=p.max_tokens,
                    temperature=0.0,
                )
            except openai.OpenAIError as exc:
                if not self._retryable(exc):
                    raise rollout_error(
                        self.name,
                        rollout,
                        f"the judge {p.model} at {p.base_url} refused: {self._describe(exc)}",
                    ) from None
                if attempt == p.max_retries:
                    raise rollout_error(
                        self.name,
                        rollout,
                        f"the judge {p.model} at {p.base_url} failed {attempt + 1} times, the last with "
                        f"{self._describe(exc)}; check that it is up (or raise max_retries)",
                    ) from None
                time.sleep(delay)
                delay *= 2
                continue
            if not resp.choices:
                raise rollout_error(self.name, rollout, f"the judge {p.model} sent a reply without choices")
            return resp.choices[0].message.content or ""
        raise AssertionError("unreachable")

    def _score_one(self, rollout: Rollout) -> float:
        reply = self._ask(rollout)
        value = parse_judge_score(reply, self.params.max_score)
        if value is None:
            shown = reply if len(reply) <= 200 else reply[:200] + "..."
            raise rollout_error(
                self.name,
                rollout,
                f"the judge {self.params.model} answered {shown!r}, not one integer from 0 to {self.params.max_score}",
            )
        return value / self.params.max_score

    def score_batch(self, rollouts: Sequence[Rollout]) -> list[float]:
        pool = ThreadPoolExecutor(max_workers=self.params.concurrency, thread_name_prefix="judge")
        try:
            futures = [pool.submit(self._score_one, r) for r in rollouts]
            return [f.result() for f in futures]  # the first failure in rollout order is raised
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, rollout: Rollout) -> float:
        return self._score_one(rollout)


def judge(**params: Any) -> JudgeReward:
    """The `judge` reward; the API key is read from `api_key_env` now (a missing variable is a ValueError)."""
    p: JudgeParams = _params("judge", JudgeParams, params)
    api_key = None
    if p.api_key_env:
        api_key = os.environ.get(p.api_key_env)
        if not api_key:
            raise ValueError(
                f"rewards: judge api_key_env {p.api_key_env!r} is not set: export {p.api_key_env}=<the judge's "
                "API key>, or drop api_key_env for an endpoint without authentication"
            )
    return JudgeReward(p, api_key)
