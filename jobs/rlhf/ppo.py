"""PPO on llm_core models with a critic, Ray-free (the InstructGPT recipe, as the seed's ppo_trainer describes).

One iteration (`ppo_iteration`): `samples_per_prompt` completions per prompt; a sequence reward per completion
placed on its last token, minus a per-token KL penalty kl_coef x (log pi - log pi_ref) when a reference is given
(the coefficient from a `FixedKLController` or `AdaptiveKLController`); values from the critic (a
`ScalarHeadModel`: the value at position j is that of the state before completion token j + 1); advantages and
returns by GAE, advantages whitened over the batch's completion tokens; then `updates_per_batch` steps of the
clipped policy loss and the clipped value loss, each on its own optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from jobs.rlhf.grpo import (
    RolloutBatch,
    completion_logprobs,
    micro_batches,
    policy_step,
    sample_completions,
    sync_gradients,
)
from llm_core.config import StrictModel
from llm_core.model import Transformer
from llm_core.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    gae,
)
from llm_core.value_model import ScalarHeadModel


class PPOConfig(StrictModel):
    samples_per_prompt: int = Field(1, ge=1, description="completions per prompt")
    max_new_tokens: int = Field(64, ge=1, description="longest completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    clip: float = Field(0.2, ge=0, description="policy ratio clip")
    value_clip: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    updates_per_batch: int = Field(4, ge=1, description="optimizer steps on each rollout batch")


@dataclass
class PPOStats:
    reward_mean: float
    kl: float  # mean per-token log pi - log pi_ref on the rollouts (0 without a reference)
    kl_coef: float
    policy_loss: float  # last update
    value_loss: float  # last update
    value_loss_first: float  # first update (falls as the critic learns)
    clip_fraction: float


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def critic_values(
    critic: ScalarHeadModel, batch: RolloutBatch, micro_batch_tokens: int | None = None
) -> torch.Tensor:
    """(B, T - 1) the critic's value of the state before each completion token (0 outside the completion)."""
    out = torch.zeros_like(batch.completion_mask, dtype=torch.float32)
    for idx in micro_batches(batch, micro_batch_tokens):
        part = batch.rows(idx)
        v = critic(part.input_ids[:, :-1], attention_mask=part.attention_mask[:, :-1]) * part.completion_mask
        out[idx, : v.shape[1]] = v.float()
    return out


def advantages_and_returns(
    batch: RolloutBatch,
    rewards: torch.Tensor,
    old_logp: torch.Tensor,
    old_values: torch.Tensor,
    cfg: PPOConfig,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(whitened advantages, returns, mean per-token KL to the reference): each sequence reward sits on its last
    completion token, minus kl_coef x (log pi - log pi_ref) on every token; GAE over the critic's values."""
    mask = batch.completion_mask
    token_rewards = torch.zeros_like(old_logp)
    last = mask.cumsum(dim=1).argmax(dim=1)  # each completion's last token (its first maximal cumsum)
    token_rewards[torch.arange(len(rewards)), last] = rewards.to(token_rewards.dtype)
    kl_mean = 0.0
    if ref_logp is not None:
        kl_tok = (old_logp - ref_logp) * mask
        token_rewards = token_rewards - kl_coef * kl_tok
        kl_mean = float(kl_tok.sum() / mask.sum().clamp(min=1))
    advantages, returns = gae(token_rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
    return _whiten(advantages, mask), returns, kl_mean


def value_step(
    critic: ScalarHeadModel,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    value_clip: float,
    micro_batch_tokens: int | None = None,
    grad_clip: float = 0.0,
) -> float:
    """One optimizer step of the clipped value loss (token-mean), accumulated over micro-batches; the loss."""
    mask = batch.completion_mask
    total = float(mask.sum().clamp(min=1))
    optimizer.zero_grad(set_to_none=True)
    loss_value = 0.0
    for idx in micro_batches(batch, micro_batch_tokens):
        part = batch.rows(idx)
        T = part.completion_mask.shape[1]
        values = critic(part.input_ids[:, :-1], attention_mask=part.attention_mask[:, :-1])
        vloss = clipped_value_loss(
            values * part.completion_mask,
            old_values[idx, :T],
            returns[idx, :T],
            part.completion_mask,
            clip=value_clip,
        )
        w = float(part.completion_mask.sum()) / total
        (vloss * w).backward()
        loss_value += float(vloss.detach()) * w
    sync_gradients(critic)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(critic.parameters(), grad_clip)
    optimizer.step()
    return loss_value


def ppo_iteration(
    policy: Transformer,
    critic: ScalarHeadModel,
    policy_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    prompts: Sequence[list[int]],
    reward_fn: Callable[[int, list[int]], float],
    cfg: PPOConfig,
    eos_id: int,
    pad_id: int,
    reference: Transformer | None = None,
    kl: FixedKLController | AdaptiveKLController | None = None,
    seed: int | None = None,
) -> tuple[list[float], PPOStats]:
    """One rollout batch and its updates: (sequence rewards per completion, stats)."""
    if (reference is None) != (kl is None):
        raise ValueError("a KL penalty needs both a reference model and a KL controller (or neither)")
    batch = sample_completions(
        policy, prompts, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, eos_id, pad_id, seed
    )
    rewards = [float(reward_fn(i // cfg.samples_per_prompt, c)) for i, c in enumerate(batch.completions)]
    policy.eval()
    critic.eval()
    with torch.no_grad():
        old_logp = completion_logprobs(policy, batch)
        old_values = critic_values(critic, batch)
        ref_logp = completion_logprobs(reference, batch) if reference is not None else None
        kl_coef = kl.value if kl is not None else 0.0
        advantages, returns, kl_mean = advantages_and_returns(
            batch, torch.tensor(rewards), old_logp, old_values, cfg, ref_logp, kl_coef
        )
        if kl is not None:
            kl.update(kl_mean, len(rewards))
    value_losses, out = [], None
    for _ in range(cfg.updates_per_batch):
        out = policy_step(
            policy, policy_optimizer, batch, old_logp, advantages, clip_low=cfg.clip, clip_high=cfg.clip
        )
        value_losses.append(
            value_step(critic, critic_optimizer, batch, old_values, returns, value_clip=cfg.value_clip)
        )
    stats = PPOStats(
        reward_mean=sum(rewards) / len(rewards),
        kl=kl_mean,
        kl_coef=kl_coef,
        policy_loss=out.policy_loss,
        value_loss=value_losses[-1],
        value_loss_first=value_losses[0],
        clip_fraction=out.clip_fraction,
    )
    return rewards, stats
