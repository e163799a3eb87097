"""RL preemption (jobs/rlhf/loop.py): a stop request after step k checkpoints that step and ends the loop; a fresh
worker resumed from the checkpoint gives, step for step, the rewards, losses and held-out rewards of an
uninterrupted run exactly (GRPO and PPO, llm_core rollouts, a tiny model on CPU), and continues every global random
stream where the stopped worker left it. In-process: the Ray Train plumbing around the loop (stop file, report,
exit 75) is the one tests/test_preemption.py and tests/test_pretrain.py cover."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from jobs.rlhf import rewards as rewards_module
from jobs.rlhf.loop import (
    GRPOSettings,
    PPOSettings,
    RLEvalConfig,
    RLTask,
    RLTrainConfig,
    RLWorker,
    RolloutConfig,
    UpdateConfig,
    load_rl_checkpoint,
    rng_states_of_all_ranks,
    run_rl_steps,
    save_rl_checkpoint,
)
from jobs.rlhf.rewards import RewardSpec
from jobs.training.storage import put_object
from llm_core.export_hf import export_hf
from llm_core.model import Transformer
from llm_core.tokenizer import train_bpe
from llm_core.trainer import TrainConfig
from tests.conftest import small_config

STEPS, STOP_AT = 4, 2
TEXTS = ["Сәлем, әлем! Қалың қалай?", "Привет, как дела?", "Hello, how are you today?", "12 + 30 = 42"] * 4
# wall-clock figures differ between any two runs; everything else must be equal
TIMINGS = ("time/", "rollout_tokens_per_s")


def char_sum_reward():
    """A deterministic reward that varies between random completions, so every group has non-zero advantages."""
    return lambda r: (sum(map(ord, r.completion)) % 13) / 13.0


@pytest.fixture(autouse=True)
def one_thread():
    """Shapes this small run fastest on one thread (as a Ray Train worker with one CPU does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy_and_prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-preempt")
    tok = train_bpe(TEXTS, 300)
    torch.manual_seed(0)
    hf = export_hf(
        Transformer(small_config(vocab_size=320, max_seq_len=64)).eval(), root / "hf", tokenizer=tok
    )
    rows = []
    for i, text in enumerate(TEXTS[:6]):
        ids = tok.encode(
            tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        )
        rows.append({"id": f"p{i}", "lang": "", "prompt": text, "answer": None, "prompt_ids": ids})
    prompts = str(root / "prompts.pt")
    put_object(prompts, {"train": rows[:4], "val": rows[4:]})
    return str(hf), prompts


def make_task(algorithm: str, hf: str, prompts: str) -> RLTask:
    return RLTask(
        train=TrainConfig(steps=STEPS, lr=1e-3, seed=5),
        algorithm=algorithm,
        init=hf,
        prompts=prompts,
        rewards=[RewardSpec(name="char_sum")],
        rollout=RolloutConfig(engine="llm_core", prompts_per_step=2, max_new_tokens=4),
        update=UpdateConfig(updates_per_batch=2, micro_batch_tokens=32),
        grpo=GRPOSettings(group_size=2, kl_coef=0.05),
        ppo=PPOSettings(samples_per_prompt=2, kl_coef=0.05, kl_target=0.01, kl_horizon=10, critic_lr=1e-3),
        evaluation=RLEvalConfig(samples_per_prompt=2),
        rl_train=RLTrainConfig(steps=STEPS, lr=1e-3, eval_every=3, log_every=1, seed=5),
    )


def worker(task: RLTask, seed: int) -> RLWorker:
    torch.manual_seed(seed)  # as rl_worker_loop seeds before building the worker
    return RLWorker(task, 0, 1, torch.device("cpu"))


def run(w: RLWorker, start: int, stop_at: int | None, on_stop=lambda step: None):
    """(history of (step, kind, metrics without timings), (last step, stopped))."""
    history = []

    def keep(kind):
        return lambda step, m: history.append(
            (step, kind, {k: v for k, v in m.items() if not k.startswith(TIMINGS)})
        )

    end = run_rl_steps(
        w,
        start,
        log_metrics=keep("step"),
        report=keep("eval"),
        should_stop=lambda: stop_at is not None and history[-1][0] >= stop_at,
        checkpoint_preempted=on_stop,
    )
    return history, end


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_stopped_after_step_k_resumes_bit_identically(
    policy_and_prompts, tmp_path, monkeypatch, algorithm
):
    monkeypatch.setitem(rewards_module.REWARDS, "char_sum", char_sum_reward)
    task = make_task(algorithm, *policy_and_prompts)

    straight, end = run(worker(task, seed=5), 0, None)
    assert end == (STEPS, False)
    assert [(s, k) for s, k, _ in straight] == [
        (1, "step"),
        (2, "step"),
        (3, "step"),
        (3, "eval"),
        (4, "step"),
        (4, "eval"),
    ]
    assert any(
        m["policy_loss"] != 0 for _, k, m in straight if k == "step"
    )  # the updates did move the policy

    first = worker(task, seed=5)
    ckpt = tmp_path / "step-000002"
    saved = []

    def checkpoint(step: int) -> None:
        saved.append(step)
        save_rl_checkpoint(ckpt / "checkpoint", first.state(step, rng_states_of_all_ranks(1)), {})

    before, end = run(first, 0, STOP_AT, checkpoint)
    assert end == (STOP_AT, True) and saved == [STOP_AT]
    expected_draws = draws()  # what the stopped worker's global random streams give next

    torch.manual_seed(123)  # other streams: the restore must set them
    np.random.seed(123)
    random.seed(123)
    resumed = worker(
        task, seed=77
    )  # other initial weights and critic head: everything must come from the checkpoint
    state, meta = load_rl_checkpoint(ckpt / "checkpoint")
    assert meta["step"] == STOP_AT
    start = resumed.restore(state)
    assert start == STOP_AT and draws() == expected_draws
    resumed.restore(state)  # the draws above moved the streams: back to the checkpoint's
    after, end = run(resumed, start, None)
    assert end == (STEPS, False)
    assert before + after == straight  # rewards, losses, KL, entropy, lr, held-out rewards: all exactly equal


def test_a_stop_request_on_an_evaluation_step_keeps_that_steps_checkpoint(policy_and_prompts, monkeypatch):
    """Step 3 evaluates (eval_every 3) and its report writes the checkpoint: no second one for the same step."""
    monkeypatch.setitem(rewards_module.REWARDS, "char_sum", char_sum_reward)
    task = make_task("grpo", *policy_and_prompts)
    saved = []
    history, end = run(worker(task, seed=5), 0, 3, saved.append)
    assert end == (3, True) and saved == []
    assert [(s, k) for s, k, _ in history][-2:] == [(3, "step"), (3, "eval")]
