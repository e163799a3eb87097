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

from jobs.rlhf.grpo import completion_logprobs, sample_completions
from llm_core.config import StrictModel
from llm_core.model import Transformer
from llm_core.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
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
    mask = batch.completion_mask
    rewards = [float(reward_fn(i // cfg.samples_per_prompt, c)) for i, c in enumerate(batch.completions)]
    policy.eval()
    critic.eval()
    with torch.no_grad():
        old_logp = completion_logprobs(policy, batch)
        old_values = critic(batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1]) * mask
        token_rewards = torch.zeros_like(old_logp)
        last = mask.cumsum(dim=1).argmax(dim=1)  # each completion's last token (its first maximal cumsum)
        token_rewards[torch.arange(len(rewards)), last] = torch.tensor(rewards)
        kl_mean, kl_coef = 0.0, 0.0
        if reference is not None:
            ref_logp = completion_logprobs(reference, batch)
            kl_tok = (old_logp - ref_logp) * mask
            kl_coef = kl.value
            token_rewards = token_rewards - kl_coef * kl_tok
            kl_mean = float(kl_tok.sum() / mask.sum().clamp(min=1))
            kl.update(kl_mean, len(rewards))
        advantages, returns = gae(token_rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = _whiten(advantages, mask)
    value_losses, out = [], None
    for _ in range(cfg.updates_per_batch):
        out = clipped_policy_loss(
            completion_logprobs(policy, batch), old_logp, advantages, mask, clip_low=cfg.clip
        )
        policy_optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        policy_optimizer.step()
        values = critic(batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1])
        vloss = clipped_value_loss(values * mask, old_values, returns, mask, clip=cfg.value_clip)
        critic_optimizer.zero_grad(set_to_none=True)
        vloss.backward()
        critic_optimizer.step()
        value_losses.append(float(vloss.detach()))
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
