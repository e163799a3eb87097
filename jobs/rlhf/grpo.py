"""GRPO on llm_core models, Ray-free: sample groups of completions, score them, update the policy.

One iteration (`grpo_iteration`): for each prompt, `group_size` completions from the policy (llm_core's KV-cache
generator; the stop token is kept in a completion that ended, so the policy learns to stop); rewards from a
callable; group-normalised advantages (`llm_core.rl_losses.group_advantages`); the rollout's log-probs under the
policy before any update (`old_logp`) and, with `kl_coef` > 0, under the frozen reference; then
`updates_per_batch` optimizer steps on `clipped_policy_loss`. Log-probs are always recomputed by the trainer
(never taken from the sampler), so the first update of a batch has an importance ratio of exactly 1.

`jobs.rl` (the stage: Ray Train, vLLM rollouts, MLflow, the registry) builds on these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator

from llm_core.config import StrictModel
from llm_core.generate import SamplingParams, generate
from llm_core.losses import token_logprobs
from llm_core.model import Transformer
from llm_core.rl_losses import LOSS_AGGREGATIONS, PolicyLossStats, clipped_policy_loss, group_advantages


class GRPOConfig(StrictModel):
    group_size: int = Field(8, ge=2, description="completions per prompt (GRPO compares them: at least 2)")
    max_new_tokens: int = Field(64, ge=1, description="longest completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    clip_low: float = Field(0.2, ge=0, description="ratio clip below 1")
    clip_high: float = Field(0.2, ge=0, description="ratio clip above 1 (DAPO's clip-higher: e.g. 0.28)")
    kl_coef: float = Field(
        0.0, ge=0, description="weight of the k3 KL penalty to the reference (0: no reference)"
    )
    scale_advantages: bool = Field(True, description="divide by the group's std (false: Dr. GRPO)")
    loss_aggregation: str = Field("token-mean", description=f"one of {LOSS_AGGREGATIONS}")
    updates_per_batch: int = Field(1, ge=1, description="optimizer steps on each rollout batch")

    @field_validator("loss_aggregation")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation {v!r} is not one of {LOSS_AGGREGATIONS}")
        return v


@dataclass
class RolloutBatch:
    """Prompt + completion token ids, right-padded: input_ids (B, T); targets' completion mask (B, T - 1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    completions: list[list[int]]


def sample_completions(
    model: Transformer,
    prompts: Sequence[list[int]],
    per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    seed: int | None = None,
) -> RolloutBatch:
    """`per_prompt` completions of each prompt (a prompt's completions next to each other)."""
    if not prompts:
        raise ValueError("the prompt set is empty: nothing to roll out")
    expanded = [list(p) for p in prompts for _ in range(per_prompt)]
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=[eos_id], seed=seed
    )
    completions = generate(model, expanded, params, pad_id=pad_id)
    limit = model.cfg.max_seq_len
    # a completion that stopped before its budget ended on the stop token: keep it (the policy learns to stop)
    completions = [
        c + [eos_id] if len(c) < min(max_new_tokens, limit - len(p)) else c
        for p, c in zip(expanded, completions)
    ]
    T = max(len(p) + len(c) for p, c in zip(expanded, completions))
    ids = torch.full((len(expanded), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(expanded), T), dtype=torch.long)
    comp = torch.zeros((len(expanded), T - 1))
    for i, (p, c) in enumerate(zip(expanded, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) - 1 : len(p) + len(c) - 1] = (
            1  # targets at positions len(p)-1 .. predict the completion
        )
    return RolloutBatch(ids, attn, comp, completions)


def sample_groups(
    model: Transformer,
    prompts: Sequence[list[int]],
    cfg: GRPOConfig,
    eos_id: int,
    pad_id: int,
    seed: int | None = None,
) -> RolloutBatch:
    """group_size completions per prompt (a prompt's completions next to each other)."""
    return sample_completions(
        model, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, eos_id, pad_id, seed
    )


def completion_logprobs(model: Transformer, batch: RolloutBatch) -> torch.Tensor:
    """(B, T - 1) log-probs of each next token (0 outside the completion)."""
    logits = model(batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1]).logits
    return token_logprobs(logits, batch.input_ids[:, 1:]) * batch.completion_mask


def grpo_iteration(
    policy: Transformer,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[list[int]],
    reward_fn: Callable[[int, list[int]], float],
    cfg: GRPOConfig,
    eos_id: int,
    pad_id: int,
    reference: Transformer | None = None,
    seed: int | None = None,
) -> tuple[list[float], list[PolicyLossStats]]:
    """One rollout batch and its updates: (rewards per completion, loss stats per update). `reward_fn(prompt
    index, completion ids)` scores one completion."""
    if cfg.kl_coef > 0 and reference is None:
        raise ValueError("kl_coef > 0 needs a reference model (the frozen starting policy)")
    batch = sample_groups(policy, prompts, cfg, eos_id, pad_id, seed=seed)
    rewards = [float(reward_fn(i // cfg.group_size, c)) for i, c in enumerate(batch.completions)]
    adv = group_advantages(torch.tensor(rewards), cfg.group_size, scale=cfg.scale_advantages)
    with torch.no_grad():
        old_logp = completion_logprobs(policy, batch)
        ref_logp = (
            completion_logprobs(reference, batch) if reference is not None and cfg.kl_coef > 0 else None
        )
    stats = []
    policy.eval()  # dropout off: the policy that is updated is the one that sampled (ratio 1 at the first step)
    for _ in range(cfg.updates_per_batch):
        out = clipped_policy_loss(
            completion_logprobs(policy, batch),
            old_logp,
            adv,
            batch.completion_mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            ref_logp=ref_logp,
            kl_coef=cfg.kl_coef,
            aggregation=cfg.loss_aggregation,
            norm_tokens=cfg.max_new_tokens,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        stats.append(out)
    return rewards, stats
