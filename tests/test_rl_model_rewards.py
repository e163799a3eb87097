"""Model-based RL rewards (jobs/rlhf/model_rewards.py): a registered reward model and an OpenAI-compatible judge,
scored a batch at once through rewards.score, failing closed with the prompt id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jobs.platform.runtime import Settings
from jobs.rlhf import rewards as rw
from llm_core.export_hf import load_hf
from llm_core.model import Transformer
from llm_core.tokenizer import Tokenizer, train_bpe
from llm_core.value_model import ScalarHeadModel, export_hf_reward_model, load_hf_reward_model
from tests.conftest import small_config
from tests.factory import train_tiny_hf
from tests.fake_openai import ServerThread
from tests.stack import free_port


def settings_for(home: Path) -> Settings:
    return Settings(
        data=home,
        home=home,
        storage=str(home),
        mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        ray_address=None,
    )


def rollout(prompt_id: str, prompt: str, completion: str) -> rw.Rollout:
    return rw.Rollout(prompt_id=prompt_id, prompt=prompt, completion=completion)


# ------------------------------------------------------------------------------------ load / export


@pytest.mark.parametrize("tied", [True, False])
def test_reward_model_export_then_load_gives_bit_equal_scores(tmp_path, tied):
    torch.manual_seed(0)
    model = ScalarHeadModel(Transformer(small_config(vocab_size=90, tie_embeddings=tied))).eval()
    out = export_hf_reward_model(model, tmp_path / "rm", pad_token_id=0)
    loaded = load_hf_reward_model(out)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [3]])).long()
    with torch.no_grad():
        want, got = model.sequence_scores(ids, mask), loaded.sequence_scores(ids, mask)
    assert torch.equal(got, want), (got, want)
    assert not loaded.training and torch.equal(loaded.head.weight, model.head.weight)


def test_load_hf_reward_model_refuses_what_is_not_a_one_label_classifier(tmp_path):
    torch.manual_seed(0)
    model = ScalarHeadModel(Transformer(small_config(vocab_size=90))).eval()
    rm = export_hf_reward_model(model, tmp_path / "rm", pad_token_id=0)
    two = shutil.copytree(rm, tmp_path / "two-labels")
    cfg = json.loads((two / "config.json").read_text())
    cfg.update(num_labels=2, id2label={"0": "A", "1": "B"}, label2id={"A": 0, "B": 1})
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(str(two)) + ".*num_labels 2"):
        load_hf_reward_model(two)

    from llm_core.export_hf import export_hf

    causal = export_hf(model.base, tmp_path / "causal")
    with pytest.raises(
        ValueError, match=re.escape(str(causal)) + ".* is not a reward model.*LlamaForCausalLM"
    ):
        load_hf_reward_model(causal)
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_reward_model(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ the reward_model reward


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir):
    """A tiny trained policy (HF export + tokenizer) and a reward model on its trunk, exported with the tokenizer."""
    root = tmp_path_factory.mktemp("model-rewards")
    policy_dir = train_tiny_hf(root / "policy", data_dir, steps=10)
    tokenizer = Tokenizer.from_dir(policy_dir)
    torch.manual_seed(1)
    rm = ScalarHeadModel(load_hf(policy_dir)).eval()
    rm_dir = export_hf_reward_model(rm, root / "rm", pad_token_id=tokenizer.pad_id, tokenizer=tokenizer)
    return {"root": root, "policy": policy_dir, "tokenizer": tokenizer, "rm": rm, "rm_dir": rm_dir}


ROLLOUTS = [
    rollout("p1", "Қазақстанның астанасы қай қала?", "  Астана.  "),
    rollout("p2", "Сколько будет 2 + 3?", "Пять, то есть 5."),
    rollout("p3", "Name a colour.", "Blue"),
]


def by_hand(model: ScalarHeadModel, tokenizer: Tokenizer, r: rw.Rollout, seq_len: int) -> float:
    """The score of one rollout alone (no padding): the chat rendering of encode_pairs, cut to seq_len."""
    messages = [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.completion.strip()}]
    ids = tokenizer.encode_chat(messages)[0][:seq_len]
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(model.sequence_scores(x, torch.ones_like(x))[0])


def test_reward_model_reward_is_the_models_score_of_the_rendered_rollout_in_batches(models):
    tok, rm = models["tokenizer"], models["rm"]
    spec = rw.RewardSpec(
        name="reward_model", weight=2.0, params={"model": str(models["rm_dir"]), "batch_size": 2}
    )
    rewards = rw.build_rewards([spec], rw.RewardContext(tokenizer=tok))
    batches: list[int] = []
    rewards[0][1].model.head.register_forward_hook(lambda _m, args, _o: batches.append(args[0].shape[0]))
    total, per = rw.score(ROLLOUTS, rewards)
    want = [by_hand(rm, tok, r, rm.base.cfg.max_seq_len) for r in ROLLOUTS]
    assert per["reward_model"] == pytest.approx(want, abs=1e-5)
    assert total == pytest.approx([2 * w for w in want], abs=2e-5)
    assert batches == [2, 1]  # three rollouts, two forward passes of batch_size 2
    assert len(set(want)) == 3  # the rollouts do score differently (the comparison is not vacuous)


def test_reward_model_truncates_to_seq_len_and_refuses_a_prompt_that_fills_it(models):
    tok, rm = models["tokenizer"], models["rm"]

    def prompt_tokens(r: rw.Rollout) -> int:  # the rendered prompt and the assistant header, by hand
        full = tok.encode_chat([{"role": "user", "content": r.prompt}, {"role": "assistant", "content": ""}])[
            0
        ]
        return len(full) - 1 - len(tok.encode("\n"))  # minus the empty answer's <|im_end|> and newline

    seq_len = max(map(prompt_tokens, ROLLOUTS)) + 2  # every prompt fits; the longer completions are cut
    spec = rw.RewardSpec(name="reward_model", params={"model": str(models["rm_dir"]), "seq_len": seq_len})
    rewards = rw.build_rewards([spec], rw.RewardContext(tokenizer=tok))
    _, per = rw.score(ROLLOUTS, rewards)
    assert per["reward_model"] == pytest.approx([by_hand(rm, tok, r, seq_len) for r in ROLLOUTS], abs=1e-5)
    assert [len(rewards[0][1].encode(r)) for r in ROLLOUTS].count(seq_len) >= 2

    long_prompt = rollout("p-long", "слово " * seq_len, "ответ")
    with pytest.raises(
        rw.RewardError, match="reward reward_model failed on prompt p-long: .*no completion token"
    ):
        rw.score([ROLLOUTS[0], long_prompt], rewards)


def test_reward_model_from_the_registry(models, tmp_path):
    from pydantic import BaseModel

    from jobs.platform import tracking

    settings = settings_for(tmp_path / "home")

    class Cfg(BaseModel):
        n: int

    with tracking.start_run(settings, "reward_model", Cfg(n=1), run_name="rm"):
        tracking.register_hf_model(models["rm_dir"], "tulpar-rm", stage="reward_model", alias="rm-latest")
    context = rw.RewardContext(tokenizer=models["tokenizer"], settings=settings)
    registered = rw.build_rewards(
        [rw.RewardSpec(name="reward_model", params={"model": "models:/tulpar-rm@rm-latest"})], context
    )
    local = rw.build_rewards(
        [rw.RewardSpec(name="reward_model", params={"model": str(models["rm_dir"])})], context
    )
    assert rw.score(ROLLOUTS, registered)[1] == rw.score(ROLLOUTS, local)[1]

    with pytest.raises(ValueError, match="models:/no-such-rm@champion"):
        rw.build_rewards(
            [rw.RewardSpec(name="reward_model", params={"model": "models:/no-such-rm@champion"})], context
        )


def test_reward_model_bad_inputs(models, tmp_path):
    spec = rw.RewardSpec(name="reward_model", params={"model": str(models["rm_dir"])})
    # a policy with another tokenizer: the error names both models and the fix
    other = train_bpe(["одна строка текста", "another line of text", "тағы бір жол"] * 20, 300)
    context = rw.RewardContext(tokenizer=other, policy="models:/tulpar-policy@sft-latest")
    with pytest.raises(
        ValueError,
        match=re.escape(str(models["rm_dir"])) + ".*models:/tulpar-policy@sft-latest.*different tokenizers",
    ):
        rw.build_rewards([spec], context)
    with pytest.raises(ValueError, match="reward_model needs the run's RewardContext"):
        rw.build_rewards([spec])
    missing = str(tmp_path / "no-such-rm")
    with pytest.raises(ValueError, match=re.escape(missing)):
        rw.build_rewards(
            [rw.RewardSpec(name="reward_model", params={"model": missing})],
            rw.RewardContext(tokenizer=models["tokenizer"]),
        )
    with pytest.raises(ValueError, match="batch_size"):
        rw.build_rewards(
            [rw.RewardSpec(name="reward_model", params={"model": str(models["rm_dir"]), "batch_size": 0})],
            rw.RewardContext(tokenizer=models["tokenizer"]),
        )
    with pytest.raises(ValueError, match="is not a reward model"):  # the policy itself is a causal LM
        rw.build_rewards(
            [rw.RewardSpec(name="reward_model", params={"model": str(models["policy"])})],
            rw.RewardContext(tokenizer=models["tokenizer"]),
        )


# --------------------------------------------------------------------------------- the batch protocol


@dataclass
class CountingBatchReward:
    calls: list[list[str]] = field(default_factory=list)
    fail_on: str | None = None

    def score_batch(self, rollouts):
        self.calls.append([r.prompt_id for r in rollouts])
        if self.fail_on:
            raise rw.rollout_error(
                "counting", next(r for r in rollouts if r.prompt_id == self.fail_on), "boom"
            )
        return [float(len(r.completion)) for r in rollouts]

    def __call__(self, r):
        raise AssertionError("a batch reward is scored through score_batch")


def test_score_calls_a_batch_reward_once_per_batch_and_plain_functions_per_rollout():
    batch = CountingBatchReward()
    plain_calls = []

    def plain(r):
        plain_calls.append(r.prompt_id)
        return 1.0

    rewards = [(rw.RewardSpec(name="counting", weight=0.5), batch), (rw.RewardSpec(name="plain"), plain)]
    rollouts = [rollout("a", "q", "xx"), rollout("b", "q", "xxxx")]
    total, per = rw.score(rollouts, rewards)
    assert batch.calls == [["a", "b"]] and plain_calls == ["a", "b"]
    assert per == {"counting": [2.0, 4.0], "plain": [1.0, 1.0]} and total == [2.0, 3.0]

    with pytest.raises(rw.RewardError, match="reward counting failed on prompt b: boom"):
        rw.score(rollouts, [(rw.RewardSpec(name="counting"), CountingBatchReward(fail_on="b"))])

    class Short:
        def score_batch(self, rollouts):
            return [1.0]

    with pytest.raises(rw.RewardError, match="short returned 1 values for 2 rollouts"):
        rw.score(rollouts, [(rw.RewardSpec(name="short"), Short())])

    class NaN:
        def score_batch(self, rollouts):
            return [0.0, float("nan")]

    with pytest.raises(rw.RewardError, match="nan gave nan on prompt b"):
        rw.score(rollouts, [(rw.RewardSpec(name="nan"), NaN())])

    class Crash:
        def score_batch(self, rollouts):
            raise RuntimeError("device lost")

    with pytest.raises(
        rw.RewardError, match="crash failed on the batch of prompts a, b: RuntimeError: device lost"
    ):
        rw.score(rollouts, [(rw.RewardSpec(name="crash"), Crash())])


# ------------------------------------------------------------------------------------------ the judge

TEMPLATE = "Q: {prompt}\nA: {completion}\nGive 0..{max_score}."
_ANSWER = re.compile(r"\nA: (.*)\nGive", re.DOTALL)


@dataclass
class FakeJudge:
    """An OpenAI-compatible chat endpoint whose reply depends on the graded completion: `script[completion]` is a
    list of (status, text) answered in turn (the last one repeats). `hold_until` keeps each request open until that
    many are in flight at once (then lets all through), so a judge that does not send them in parallel is seen."""

    script: dict[str, list[tuple[int, str]]]
    hold_until: int = 0
    requests: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _enough: asyncio.Event | None = None

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    def count(self, completion: str) -> int:
        return sum(1 for r in self.requests if r["completion"] == completion)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        content = body["messages"][-1]["content"]
        completion = _ANSWER.search(content).group(1)
        self.requests.append({"body": body, "headers": dict(request.headers), "completion": completion})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_until:
                self._enough = self._enough or asyncio.Event()
                if self.in_flight >= self.hold_until:
                    self._enough.set()
                with contextlib.suppress(
                    TimeoutError
                ):  # a serial client: let it through, max_in_flight shows it
                    await asyncio.wait_for(self._enough.wait(), timeout=5)
            turns = self.script[completion]
            status, text = turns.pop(0) if len(turns) > 1 else turns[0]
        finally:
            self.in_flight -= 1
        if status != 200:
            return PlainTextResponse(text, status_code=status)
        return JSONResponse(
            {
                "id": "judge-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


def judge_rewards(url: str, **params) -> list:
    base = {
        "base_url": url + "/v1",
        "model": "grader",
        "template": TEMPLATE,
        "backoff_s": 0.01,
        "timeout_s": 20,
    }
    return rw.build_rewards([rw.RewardSpec(name="judge", params=base | params)])


def test_judge_scores_are_its_integers_over_max_score(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    fake = FakeJudge(
        {
            "good": [(200, "9")],
            "fair": [(200, " 4.\n")],
            "thought": [(200, "<think>short but right</think>\n10")],
            "zero": [(200, "0")],
        }
    )
    rollouts = [rollout(f"p{i}", "2+2?", c) for i, c in enumerate(["good", "fair", "thought", "zero"])]
    with ServerThread(fake.app) as server:
        _, per = rw.score(rollouts, judge_rewards(server.url, api_key_env="JUDGE_KEY", max_score=10))
    assert per["judge"] == [0.9, 0.4, 1.0, 0.0]
    first = next(r for r in fake.requests if r["completion"] == "good")
    assert first["body"]["model"] == "grader" and first["body"]["temperature"] == 0
    assert first["body"]["messages"] == [{"role": "user", "content": "Q: 2+2?\nA: good\nGive 0..10."}]
    assert first["headers"]["authorization"] == "Bearer sk-test-123"


def test_judge_retries_500_and_429_then_succeeds_and_fails_closed_otherwise():
    fake = FakeJudge(
        {
            "flaky": [(500, "Internal Server Error"), (200, "7")],
            "limited": [(429, "slow down"), (429, "slow down"), (200, "3")],
            "down": [(503, "unavailable")],
            "garbage": [(200, "I would rather not say")],
            "too-high": [(200, "11")],
            "negative": [(200, "-1")],
            "bad-request": [(400, "bad request")],
        }
    )
    with ServerThread(fake.app) as server:
        rewards = judge_rewards(server.url, max_retries=2)
        _, per = rw.score([rollout("p1", "q", "flaky"), rollout("p2", "q", "limited")], rewards)
        assert per["judge"] == [0.7, 0.3]
        assert fake.count("flaky") == 2 and fake.count("limited") == 3
        with pytest.raises(rw.RewardError, match="reward judge failed on prompt p3: .*failed 3 times.*503"):
            rw.score([rollout("p3", "q", "down")], rewards)
        assert fake.count("down") == 3  # 1 + max_retries
        for pid, completion in [("p4", "garbage"), ("p5", "too-high"), ("p6", "negative")]:
            with pytest.raises(
                rw.RewardError, match=f"reward judge failed on prompt {pid}: .*not one integer"
            ):
                rw.score([rollout(pid, "q", completion)], rewards)
        with pytest.raises(rw.RewardError, match="reward judge failed on prompt p7: .*refused.*400"):
            rw.score([rollout("p7", "q", "bad-request")], rewards)
        assert fake.count("bad-request") == 1  # a client error is not retried


def test_judge_unreachable_fails_closed_naming_the_prompt():
    rewards = judge_rewards(f"http://127.0.0.1:{free_port()}", max_retries=1)
    with pytest.raises(
        rw.RewardError, match="reward judge failed on prompt p9: .*failed 2 times.*APIConnectionError"
    ):
        rw.score([rollout("p9", "q", "anything")], rewards)


def test_judge_sends_up_to_concurrency_requests_at_once():
    fake = FakeJudge({f"c{i}": [(200, str(i))] for i in range(6)}, hold_until=3)
    rollouts = [rollout(f"p{i}", "q", f"c{i}") for i in range(6)]
    with ServerThread(fake.app) as server:
        _, per = rw.score(rollouts, judge_rewards(server.url, concurrency=3, max_score=5))
    assert per["judge"] == [i / 5 for i in range(6)] and fake.max_in_flight == 3


def test_judge_bad_settings(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env 'NO_SUCH_JUDGE_KEY' is not set"):
        judge_rewards("http://127.0.0.1:1", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(ValueError, match=r"judge .*template.*\['\{completion\}'\]"):
        judge_rewards("http://127.0.0.1:1", template="Rate {prompt}")
    with pytest.raises(ValueError, match="judge .*max_score"):
        judge_rewards("http://127.0.0.1:1", max_score=0)
    with pytest.raises(ValueError, match="judge .*temperature"):
        judge_rewards("http://127.0.0.1:1", temperature=1.0)
