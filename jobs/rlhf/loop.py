"""The `jobs.rl` worker: one Ray Train worker's RL loop (rollout -> rewards -> policy update -> weight push).

The driver (`jobs.rl`) prepares the prompt sets, validates the settings and sends an `RLTask` (a registered training
task, so the worker validates it again through the task registry) to `launch(..., train_loop=rl_worker_loop)`.
Each worker, every step:

1. takes its share of the step's prompts (the same prompts on a resumed run: the order is a function of the seed
   and the step) and rolls out completions through the rollout engine (`jobs.rlhf.rollout`: the policy itself
   with llm_core's KV-cache generator, or vLLM engines that are Ray actors);
2. decodes and scores them with the configured rewards (`jobs.rlhf.rewards`);
3. recomputes the rollout's log-probs under the policy (and the reference, and the critic's values for PPO) and
   runs `updates_per_batch` optimizer steps, in micro-batches of at most `update.micro_batch_tokens` tokens,
   gradients averaged over the workers;
4. rank 0 pushes the new weights to the vLLM engines (no restart, no export to disk), then every rank waits.

Every `train.eval_every` steps (and before the first step, as the baseline) the workers sample the held-out
prompts with a fixed seed, score them, and report `val_reward` (mean total reward) to Ray Train with a checkpoint
(policy, critic, optimizers, KL controller); Ray Train keeps the best by `val_reward`. Metrics are reduced over
the workers; rank 0 logs them to the job's MLflow run.

Preemption (`jobs.training.preemption`): after each step the workers ask the run's stop file; on a stop request they
write a checkpoint of that step and end, and the re-run resumes from it. A checkpoint holds everything a step
depends on -- weights, optimizers, scheduler, critic, KL coefficient, and every rank's torch/CUDA/numpy/python
random state -- and the prompts and rollout seeds of a step are functions of the seed and the step, so with the
llm_core rollout engine a resumed run's rewards and losses are an uninterrupted run's, bit for bit. vLLM engines are
restarted with the resumed weights pushed to them; their seeded sampling is reproducible, but their kernels are not
the trainer's, so bit-identity is not promised there (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from jobs.platform.runtime import Settings
from jobs.rlhf.grpo import (
    RolloutBatch,
    completion_logprobs,
    pack_rollouts,
    policy_step,
)
from jobs.rlhf.ppo import advantages_and_returns, critic_values, value_step
from jobs.rlhf.rewards import RewardContext, RewardSpec, Rollout, build_rewards, score
from jobs.training.storage import get_object
from jobs.training.tasks import TrainingTask, register_task
from llm_core.config import StrictModel
from llm_core.rl_losses import AdaptiveKLController, FixedKLController, group_advantages

log = logging.getLogger("tulpar.rl")
train_log = logging.getLogger("tulpar.train")


# ------------------------------------------------------------------------------------------------ settings


class RolloutConfig(StrictModel):
    """How completions are sampled."""

    engine: Literal["llm_core", "vllm"] = Field(
        "llm_core",
        description="vllm: vLLM engines as Ray actors, weights pushed after each update; llm_core: the policy "
        "itself with llm_core's KV-cache generator",
    )
    num_engines: int = Field(1, ge=1, description="vLLM engines (Ray actors); prompts are split across them")
    engine_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each vLLM engine")
    engine_gpus: float = Field(0.0, ge=0, description="GPUs Ray gives each vLLM engine (1 on a GPU cluster)")
    dtype: str = Field("float32", description="the vLLM engines' dtype (float32, bfloat16, float16)")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="extra vllm.LLM arguments (e.g. gpu_memory_utilization)"
    )
    prompts_per_step: int = Field(8, ge=1, description="prompts rolled out per step, over all workers")
    max_new_tokens: int = Field(64, ge=1, description="longest completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")


class UpdateConfig(StrictModel):
    """How each rollout batch updates the policy."""

    updates_per_batch: int = Field(1, ge=1, description="optimizer steps on each rollout batch")
    micro_batch_tokens: int | None = Field(
        4096,
        ge=1,
        description="largest micro-batch (rows x longest row, in tokens) of an update; null: the whole batch",
    )


class GRPOSettings(StrictModel):
    group_size: int = Field(8, description="completions per prompt (at least 2)")
    clip_low: float = Field(0.2, ge=0, description="ratio clip below 1")
    clip_high: float = Field(0.2, ge=0, description="ratio clip above 1 (DAPO's clip-higher: e.g. 0.28)")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL penalty to the reference (0: no reference needed)")
    scale_advantages: bool = Field(True, description="divide by the group's std (false: Dr. GRPO)")
    loss_aggregation: str = Field(
        "token-mean",
        description="token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm (Dr. GRPO)",
    )


class PPOSettings(StrictModel):
    samples_per_prompt: int = Field(1, ge=1, description="completions per prompt")
    clip: float = Field(0.2, ge=0, description="policy ratio clip")
    value_clip: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty in the reward (0: no reference)")
    kl_target: float | None = Field(
        None, gt=0, description="adaptive KL (Ziegler et al.): steer the KL to this; null: fixed coefficient"
    )
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL horizon in samples")
    critic_lr: float = Field(1e-4, gt=0, description="the critic's learning rate")


class RLEvalConfig(StrictModel):
    """The held-out reward measured every train.eval_every steps."""

    samples_per_prompt: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    seed: int = 4242


class RLTrainConfig(StrictModel):
    steps: int = Field(50, gt=0, description="rollout + update steps")
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    eval_every: int = Field(10, gt=0)
    log_every: int = Field(1, gt=0)
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU (weights and optimizer stay fp32)"
    )


@register_task
class RLTask(TrainingTask):
    """RL fine-tuning (jobs.rl): what each worker needs. `train` carries the shared settings of a training task
    (steps, lr, seed); the RL loop reads `rl_train` for the rest."""

    kind: Literal["rl"] = "rl"
    algorithm: Literal["grpo", "ppo"]
    init: str = Field(description="the starting policy: a local HF directory")
    reference: str | None = Field(None, description="the frozen reference (local HF directory); None: init")
    prompts: str = Field(description="path/URI of the prepared prompts: {'train': [...], 'val': [...]}")
    rewards: list[RewardSpec]
    rollout: RolloutConfig
    update: UpdateConfig
    grpo: GRPOSettings
    ppo: PPOSettings
    evaluation: RLEvalConfig
    rl_train: RLTrainConfig
    engine_name: str | None = Field(None, description="name prefix of the driver's vLLM engine actors")

    @property
    def samples_per_prompt(self) -> int:
        return self.grpo.group_size if self.algorithm == "grpo" else self.ppo.samples_per_prompt

    @property
    def needs_reference(self) -> bool:
        return (self.grpo.kl_coef if self.algorithm == "grpo" else self.ppo.kl_coef) > 0


# ------------------------------------------------------------------------------------------------ helpers


def step_prompts(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step` (1-based): epochs of shuffled prompts, each epoch's order from the seed, so
    a resumed run sees the same prompts as an uninterrupted one."""
    out = []
    for g in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(g, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def reduce_means(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: (sum, count)} of this rank -> {name: sum / count} over all ranks (names must match across ranks;
    a name with count 0 everywhere is left out)."""
    keys = sorted(sums)
    t = torch.tensor([[sums[k][0], sums[k][1]] for k in keys], dtype=torch.float64).reshape(-1, 2)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return {k: float(t[i, 0] / t[i, 1]) for i, k in enumerate(keys) if t[i, 1] > 0}


def reward_sums(
    rollouts: list[Rollout],
    total: list[float],
    per: dict[str, list[float]],
    languages: list[str],
    prefix: str,
) -> dict[str, tuple[float, float]]:
    """(sum, count) of the total reward, each reward, and the total per language."""
    n = float(len(total))
    out = {f"{prefix}": (sum(total), n), f"{prefix}_sq": (sum(x * x for x in total), n)}
    for name, values in per.items():
        out[f"{prefix}/{name}"] = (sum(values), n)
    for lang in languages:
        vals = [t for r, t in zip(rollouts, total) if r.lang == lang]
        out[f"{prefix}/lang_{lang}"] = (sum(vals), float(len(vals)))
    return out


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rollouts(
    prompts: list[dict], n: int, completions: list[list[int]], tokenizer, stop_id: int
) -> list[Rollout]:
    out = []
    for i, ids in enumerate(completions):
        p = prompts[i // n]
        body = ids[:-1] if ids and ids[-1] == stop_id else ids
        out.append(
            Rollout(
                prompt_id=p["id"],
                prompt=p["prompt"],
                completion=tokenizer.decode(body),
                lang=p.get("lang") or "",
                answer=p.get("answer"),
                n_tokens=len(ids),
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ the worker


class RLWorker:
    """One worker's models, optimizers, engine and rewards; `step()` and `evaluate()` are the loop's two verbs."""

    def __init__(self, task: RLTask, rank: int, world: int, device: torch.device):
        from jobs.rlhf.rollout import LLMCoreEngine
        from llm_core.export_hf import load_hf
        from llm_core.optim import build_optimizer
        from llm_core.tokenizer import Tokenizer
        from llm_core.value_model import ScalarHeadModel

        self.task, self.rank, self.world, self.device = task, rank, world, device
        self.tokenizer = Tokenizer.from_dir(task.init)
        self.stop_id = self.tokenizer.im_end_id
        self.policy = load_hf(task.init).to(device).eval()  # eval: no dropout (ratio 1 at the first update)
        self.reference = None
        if task.needs_reference:
            self.reference = load_hf(task.reference or task.init).to(device).eval()
            self.reference.requires_grad_(False)
        t = task.rl_train
        self.optimizer = build_optimizer(self.policy, t.lr, t.weight_decay, t.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        )
        self.critic = self.critic_optimizer = self.kl = None
        if task.algorithm == "ppo":
            self.critic = ScalarHeadModel(load_hf(task.init)).to(device).eval()
            self.critic_optimizer = build_optimizer(self.critic, task.ppo.critic_lr, t.weight_decay, t.betas)
            if task.ppo.kl_coef > 0:
                self.kl = (
                    AdaptiveKLController(task.ppo.kl_coef, task.ppo.kl_target, task.ppo.kl_horizon)
                    if task.ppo.kl_target
                    else FixedKLController(task.ppo.kl_coef)
                )
        data = get_object(task.prompts)
        self.train_prompts, self.val_prompts = data["train"], data["val"]
        self.languages = sorted({p.get("lang") or "" for p in self.train_prompts + self.val_prompts} - {""})
        context = RewardContext(self.tokenizer, Settings.from_env(), device, policy=task.init)
        self.rewards = build_rewards(task.rewards, context)
        if task.rollout.engine == "vllm":
            from jobs.rlhf.rollout import VLLMEngines

            if task.engine_name is None:
                raise RuntimeError("rollout.engine=vllm, but the driver started no engines")
            self.engine = VLLMEngines.connect(task.engine_name, task.rollout.num_engines)
        else:
            self.engine = LLMCoreEngine(self.policy, self.tokenizer.pad_id)

    # -- rollouts

    def sample(
        self, prompts: list[dict], n: int, temperature: float, seed: int
    ) -> tuple[RolloutBatch, float]:
        """(batch, seconds) of n completions per prompt, each ending with the stop token when it stopped."""
        t0 = time.perf_counter()
        outs = self.engine.generate(
            [p["prompt_ids"] for p in prompts],
            n=n,
            max_new_tokens=self.task.rollout.max_new_tokens,
            temperature=temperature,
            stop_token_ids=[self.stop_id],
            seed=seed,
        )
        completions = [list(c.token_ids) + ([self.stop_id] if c.stopped else []) for c in outs]
        batch = pack_rollouts([p["prompt_ids"] for p in prompts], n, completions, self.tokenizer.pad_id)
        return batch, time.perf_counter() - t0

    def evaluate(self) -> dict[str, float]:
        """val_reward (mean total reward of the held-out prompts) and its parts, over all workers."""
        with self.autocast():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        ev = self.task.evaluation
        mine = self.val_prompts[self.rank :: self.world]
        sums: dict[str, tuple[float, float]] = {}
        if mine:
            # temperature 0 is greedy; llm_core and vLLM both take 0 as greedy
            batch, _ = self.sample(mine, ev.samples_per_prompt, ev.temperature, ev.seed + self.rank)
            rollouts = _rollouts(mine, ev.samples_per_prompt, batch.completions, self.tokenizer, self.stop_id)
            total, per = score(rollouts, self.rewards)
            sums = reward_sums(rollouts, total, per, self.languages, "val_reward")
            sums["val_response_length"] = (float(sum(r.n_tokens for r in rollouts)), float(len(rollouts)))
        return reduce_means(self._complete(sums, "val_reward"))

    def _complete(self, sums: dict[str, tuple[float, float]], prefix: str) -> dict[str, tuple[float, float]]:
        """Every rank must all-reduce the same names: add the ones this rank did not see, with count 0."""
        names = {prefix, f"{prefix}_sq", f"{prefix.replace('reward', 'response_length')}"}
        names |= {f"{prefix}/{s.name}" for s in self.task.rewards} | {
            f"{prefix}/lang_{x}" for x in self.languages
        }
        return {k: sums.get(k, (0.0, 0.0)) for k in sorted(names | set(sums))}

    # -- one step

    def autocast(self):
        """bf16 autocast on CUDA with precision auto/bf16; a no-op context otherwise."""
        import contextlib

        use = self.device.type == "cuda" and self.task.rl_train.precision in ("auto", "bf16")
        return torch.autocast("cuda", dtype=torch.bfloat16) if use else contextlib.nullcontext()

    def step(self, step: int) -> dict[str, float]:
        with self.autocast():
            return self._step(step)

    def _step(self, step: int) -> dict[str, float]:
        task, t = self.task, self.task.rl_train
        n = task.samples_per_prompt
        idx = step_prompts(len(self.train_prompts), task.rollout.prompts_per_step, step, t.seed)
        mine = [self.train_prompts[i] for i in idx[self.rank :: self.world]]
        batch, rollout_s = self.sample(
            mine, n, task.rollout.temperature, t.seed * 7919 + step * 101 + self.rank
        )
        rollouts = _rollouts(mine, n, batch.completions, self.tokenizer, self.stop_id)
        total, per = score(rollouts, self.rewards)
        rewards = torch.tensor(total, dtype=torch.float32)
        t0 = time.perf_counter()
        mb = task.update.micro_batch_tokens
        with torch.no_grad():
            old_logp = completion_logprobs(self.policy, batch, mb)
            ref_logp = completion_logprobs(self.reference, batch, mb) if self.reference is not None else None
        sums: dict[str, tuple[float, float]] = {}
        if task.algorithm == "grpo":
            adv = group_advantages(rewards, n, scale=task.grpo.scale_advantages)
            updates = [
                policy_step(
                    self.policy,
                    self.optimizer,
                    batch,
                    old_logp,
                    adv,
                    clip_low=task.grpo.clip_low,
                    clip_high=task.grpo.clip_high,
                    aggregation=task.grpo.loss_aggregation,
                    norm_tokens=task.rollout.max_new_tokens,
                    ref_logp=ref_logp,
                    kl_coef=task.grpo.kl_coef,
                    micro_batch_tokens=mb,
                    grad_clip=t.grad_clip,
                )
                for _ in range(task.update.updates_per_batch)
            ]
            kl_tokens = (
                float(updates[0].kl * float(batch.completion_mask.sum())) if ref_logp is not None else None
            )
        else:
            with torch.no_grad():
                old_values = critic_values(self.critic, batch, mb)
                kl_coef = self.kl.value if self.kl is not None else 0.0
                adv, returns, kl_mean = advantages_and_returns(
                    batch, rewards, old_logp, old_values, _ppo_lib(task), ref_logp, kl_coef
                )
            updates, value_losses = [], []
            for _ in range(task.update.updates_per_batch):
                updates.append(
                    policy_step(
                        self.policy,
                        self.optimizer,
                        batch,
                        old_logp,
                        adv,
                        clip_low=task.ppo.clip,
                        clip_high=task.ppo.clip,
                        micro_batch_tokens=mb,
                        grad_clip=t.grad_clip,
                    )
                )
                value_losses.append(
                    value_step(
                        self.critic,
                        self.critic_optimizer,
                        batch,
                        old_values,
                        returns,
                        value_clip=task.ppo.value_clip,
                        micro_batch_tokens=mb,
                        grad_clip=t.grad_clip,
                    )
                )
            kl_tokens = kl_mean * float(batch.completion_mask.sum()) if ref_logp is not None else None
            sums["value_loss"] = (value_losses[-1], 1.0)
            sums["value_loss_first"] = (value_losses[0], 1.0)
            sums["kl_coef"] = (kl_coef, 1.0)
        self.scheduler.step()
        update_s = time.perf_counter() - t0
        tokens = float(batch.completion_mask.sum())
        first, last = updates[0], updates[-1]
        sums.update(reward_sums(rollouts, total, per, self.languages, "reward"))
        if kl_tokens is not None:  # mean per-token KL to the reference (k3 for GRPO, log-ratio for PPO)
            sums["kl"] = (kl_tokens, tokens)
        sums.update(
            {
                "entropy": (first.entropy * tokens, tokens),
                "clip_fraction": (last.clip_fraction * tokens, tokens),
                "ratio_mean_first_update": (first.ratio_mean, 1.0),
                "ratio_max_deviation_first_update": (first.ratio_max_deviation, 1.0),
                "policy_loss": (last.policy_loss, 1.0),
                "grad_norm": (first.grad_norm, 1.0),
                "response_length": (float(sum(r.n_tokens for r in rollouts)), float(len(rollouts))),
                "rollout_tokens": (tokens, 1.0 / self.world),  # summed over workers
                "rollout_tokens_per_s": (tokens / max(rollout_s, 1e-9), 1.0 / self.world),
                "time/rollout_s": (rollout_s, 1.0),
                "time/update_s": (update_s, 1.0),
            }
        )
        metrics = reduce_means(self._complete(sums, "reward"))
        if self.kl is not None and task.algorithm == "ppo":
            self.kl.update(metrics.get("kl", 0.0), int(len(rollouts) * self.world))
        t0 = time.perf_counter()
        if task.rollout.engine == "vllm":
            if self.rank == 0:
                self.engine.update_weights(self.policy)
            _barrier()
        metrics["time/push_s"] = time.perf_counter() - t0
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        _finish_std(metrics, "reward")
        return metrics

    # -- checkpoints

    def state(self, step: int, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint of `step`; `rng`: every rank's random state (`rng_states_of_all_ranks`, a collective
        every rank calls before rank 0 saves)."""
        return {
            "step": step,
            "rng": rng,
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer else None,
            "kl_coef": self.kl.value if self.kl is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> int:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if self.kl is not None and state.get("kl_coef") is not None:
            self.kl.value = state["kl_coef"]
        rng = state.get("rng")
        if rng and len(rng) == self.world:
            set_rng_states(rng[self.rank])
        elif rng:  # another number of workers: each rank keeps its fresh seed (no step draws from these)
            log.warning(
                "checkpoint has the random state of %d workers, this run has %d: not restored",
                len(rng),
                self.world,
            )
        if self.task.rollout.engine == "vllm":
            if self.rank == 0:
                self.engine.update_weights(self.policy)
            _barrier()
        return int(state["step"])


def rng_states() -> dict[str, Any]:
    """This process's random streams: torch's (CPU and every CUDA device), numpy's global and python's `random`."""
    import numpy as np

    from llm_core.checkpoint import rng_state

    return {**rng_state(), "numpy": np.random.get_state()}


def set_rng_states(state: dict[str, Any]) -> None:
    import numpy as np

    from llm_core.checkpoint import set_rng_state

    set_rng_state(state)
    np.random.set_state(state["numpy"])


def rng_states_of_all_ranks(world: int) -> list[dict[str, Any]]:
    """Every rank's `rng_states()`, in rank order (a collective with several workers)."""
    mine = rng_states()
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out


def run_rl_steps(
    worker: RLWorker,
    start: int,
    *,
    log_metrics: Callable[[int, dict[str, float]], None],
    report: Callable[[int, dict[str, float]], None],
    should_stop: Callable[[], bool],
    checkpoint_preempted: Callable[[int], None],
    after_step: Callable[[int], None] | None = None,
) -> tuple[int, bool]:
    """Steps start+1 .. rl_train.steps of `worker` (Ray-free; `rl_worker_loop` plugs Ray Train in). After each
    step: `log_metrics` every log_every steps, `after_step` (fault injection), `report(step, held-out metrics)`
    every eval_every steps and at the end (the caller checkpoints there), then `should_stop()` (before the last
    step only): True ends the run after `checkpoint_preempted(step)` -- unless this step's evaluation already wrote
    its checkpoint. Returns (last step run, stopped early)."""
    t = worker.task.rl_train
    for step in range(start + 1, t.steps + 1):
        metrics = worker.step(step)
        if step % t.log_every == 0 or step == t.steps:
            log_metrics(step, metrics)
        if after_step is not None:
            after_step(step)
        evaluated = step % t.eval_every == 0 or step == t.steps
        if evaluated:
            report(step, worker.evaluate())
        if step < t.steps and should_stop():  # a preemption notice: checkpoint this step and end
            if not evaluated:
                checkpoint_preempted(step)
            return step, True
    return t.steps, False


def _ppo_lib(task: RLTask):
    from jobs.rlhf.ppo import PPOConfig

    return PPOConfig(
        samples_per_prompt=task.ppo.samples_per_prompt,
        max_new_tokens=task.rollout.max_new_tokens,
        clip=task.ppo.clip,
        value_clip=task.ppo.value_clip,
        gamma=task.ppo.gamma,
        lam=task.ppo.lam,
        updates_per_batch=task.update.updates_per_batch,
    )


def _finish_std(metrics: dict[str, float], prefix: str) -> None:
    """<prefix>_sq (the mean square over all workers' rollouts) -> <prefix>_std."""
    if f"{prefix}_sq" in metrics:
        mean_sq = metrics.pop(f"{prefix}_sq")
        metrics[f"{prefix}_std"] = max(0.0, mean_sq - metrics[prefix] ** 2) ** 0.5


def save_rl_checkpoint(path: Path, state: dict[str, Any], metrics: dict[str, float]) -> Path:
    from llm_core.io import atomic_dir

    with atomic_dir(path) as tmp:
        torch.save(state, tmp / "state.pt")
        meta = {"step": state["step"], "metrics": metrics}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def load_rl_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
    return state, meta


def rl_worker_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker of jobs.rl (see the module docstring)."""
    import ray.train
    from pydantic import ValidationError

    from jobs.training.distributed import (
        WorkerSpec,
        _quiet_ray_train_report_lines,
        mlflow_logger,
        report_preemption_checkpoint,
        worker_device,
    )
    from jobs.training.preemption import StopPoller

    try:
        spec = WorkerSpec.model_validate(config)
    except ValidationError as exc:  # the driver validated this spec: a mismatch here is ours
        raise RuntimeError(f"the worker could not validate the driver's WorkerSpec: {exc}") from None
    task = spec.task
    if not isinstance(task, RLTask):
        raise RuntimeError(f"rl_worker_loop got a {type(task).__name__}, not an RLTask")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _quiet_ray_train_report_lines()
    torch.set_num_threads(spec.ray.torch_threads or max(1, int(spec.ray.cpus_per_worker or 1)))
    device = worker_device(spec.ray, world)
    torch.manual_seed(task.rl_train.seed + rank)
    worker = RLWorker(task, rank, world, device)
    log_metrics = mlflow_logger(spec, rank)
    start = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as ckpt_dir:
            state, _ = load_rl_checkpoint(Path(ckpt_dir))
        start = worker.restore(state)
        if rank == 0:
            train_log.info("resumed from checkpoint at step %d (%s)", start, Path(restored.path).name)
    steps = task.rl_train.steps

    def report(step: int, metrics: dict[str, float]) -> None:
        _finish_std(metrics, "val_reward")
        log_metrics(step, metrics)
        if rank == 0:
            train_log.info(
                "step %4d | held-out reward %.4f (%s)",
                step,
                metrics.get("val_reward", float("nan")),
                " ".join(
                    f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("val_reward/")
                ),
            )
        with tempfile.TemporaryDirectory(prefix="tulpar-rl-ckpt-") as tmp:
            checkpoint = None
            rng = rng_states_of_all_ranks(world)  # every rank: a collective
            if rank == 0:
                path = save_rl_checkpoint(Path(tmp) / "checkpoint", worker.state(step, rng), metrics)
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(
                {**metrics, "step": step}, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:06d}"
            )

    if start == 0:
        report(0, worker.evaluate())  # the starting policy's held-out reward: the baseline
    kill_at, marker = spec.ray.fault_injection_kill_at_step, spec.fault_marker

    def log_step(step: int, metrics: dict[str, float]) -> None:
        log_metrics(step, metrics)
        if rank == 0:
            train_log.info(
                "step %4d/%d | reward %.3f | kl %s | entropy %.3f | clip %.3f | len %.1f | "
                "rollout %.1fs (%s tok/s) update %.1fs push %.2fs",
                step,
                steps,
                metrics["reward"],
                f"{metrics['kl']:.4f}" if "kl" in metrics else "-",
                metrics["entropy"],
                metrics["clip_fraction"],
                metrics["response_length"],
                metrics["time/rollout_s"],
                f"{metrics['rollout_tokens_per_s']:,.0f}",
                metrics["time/update_s"],
                metrics["time/push_s"],
            )

    def inject_fault(step: int) -> None:
        if kill_at and step >= kill_at and rank == 0 and marker and not Path(marker).exists():
            Path(marker).write_text(f"killed at step {step}\n")
            # a real worker crash: Ray Train restarts from the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint_preempted(step: int) -> None:
        def save(tmp: Path) -> Path | None:
            rng = rng_states_of_all_ranks(world)  # every rank: a collective
            return save_rl_checkpoint(tmp / "checkpoint", worker.state(step, rng), {}) if rank == 0 else None

        report_preemption_checkpoint(step, spec, save, rank)

    run_rl_steps(
        worker,
        start,
        log_metrics=log_step,
        report=report,
        should_stop=StopPoller(spec.stop_file, rank, world, device),
        checkpoint_preempted=checkpoint_preempted,
        after_step=inject_fault,
    )
    log_metrics.close()
