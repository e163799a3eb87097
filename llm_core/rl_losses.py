"""Policy-gradient losses for RL fine-tuning (GRPO and PPO), on per-token log-probabilities.

Shapes: B sequences (responses) of up to T tokens; `mask` (B, T) is 1 on response tokens that count (the prompt
and the padding after a response are 0). Log-probabilities come from `llm_core.losses.token_logprobs`.

- `group_advantages`: GRPO's advantage of each of the G samples of a prompt, its reward minus the group's mean,
  divided by the group's standard deviation (or not: Dr. GRPO's unbiased form).
- `kl_k3`: the per-token KL estimator exp(r) - r - 1 with r = log pi_ref - log pi (non-negative, unbiased for
  KL(pi || pi_ref) under samples of pi).
- `clipped_policy_loss`: PPO's clipped surrogate (asymmetric clip range as in DAPO), an optional KL penalty to
  the reference, and the loss aggregations of the literature (`LOSS_AGGREGATIONS`).
- `gae`: generalised advantage estimation over token rewards and values (PPO).
- `clipped_value_loss`: the critic's loss with the value clipped around the rollout's values.

Everything here is plain PyTorch: no Ray, no vLLM; `tests/test_rl_losses.py` checks each against hand computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# how per-token losses become one number:
#   token-mean               sum over all tokens / number of tokens (DAPO: long answers weigh by their length)
#   seq-mean-token-mean      mean over sequences of each one's token mean (the original GRPO)
#   seq-mean-token-sum-norm  sum over all tokens / (sequences x a fixed token budget) (Dr. GRPO: no length bias)
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_mask(x: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)} but the mask has {tuple(mask.shape)}")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """(B,) rewards of B // group_size prompts x group_size samples (a prompt's samples next to each other) ->
    (B,) advantages: reward - group mean, divided by (group std + eps) when `scale` (std with Bessel's correction,
    as GRPO; a group of equal rewards gets 0)."""
    if group_size < 2:
        raise ValueError(f"group_size {group_size}: GRPO compares samples of a prompt, it needs at least 2")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of {group_size}")
    r = rewards.view(-1, group_size).float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs: exp(r) - r - 1, r = ref - logp."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, how: str, norm_tokens: int | None = None
) -> torch.Tensor:
    """One number from (B, T) per-token values and their mask (`LOSS_AGGREGATIONS`); `norm_tokens`: the fixed
    token budget of seq-mean-token-sum-norm (default: T)."""
    _check_mask(per_token, mask, "per_token")
    m = mask.to(per_token.dtype)
    if how == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if how == "seq-mean-token-mean":
        per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return per_seq.mean()
    if how == "seq-mean-token-sum-norm":
        budget = per_token.shape[1] if norm_tokens is None else norm_tokens
        if budget < 1:
            raise ValueError(f"norm_tokens {budget} must be at least 1")
        return (per_token * m).sum() / (per_token.shape[0] * budget)
    raise ValueError(f"loss aggregation {how!r} is not one of {LOSS_AGGREGATIONS}")


@dataclass
class PolicyLossStats:
    loss: torch.Tensor  # what to backpropagate
    policy_loss: float  # the clipped surrogate alone
    kl: float  # mean per-token KL estimate to the reference (0 without one)
    clip_fraction: float  # share of tokens where the clipped term was the one taken
    ratio_mean: float  # mean importance ratio over tokens


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "token-mean",
    norm_tokens: int | None = None,
) -> PolicyLossStats:
    """PPO's clipped surrogate on (B, T) log-probs: per token max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    with r = exp(logp - old_logp) and A the advantage (B,) per sequence or (B, T) per token, plus kl_coef x
    `kl_k3` to the reference when given; aggregated over the mask by `aggregation`."""
    _check_mask(logp, mask, "logp")
    _check_mask(old_logp, mask, "old_logp")
    clip_high = clip_low if clip_high is None else clip_high
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip range ({clip_low}, {clip_high}) must not be negative")
    adv = advantages.unsqueeze(1).expand_as(logp) if advantages.dim() == 1 else advantages
    _check_mask(adv, mask, "advantages")
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    policy = aggregate(per_token, mask, aggregation, norm_tokens)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    kl_value = torch.zeros((), dtype=logp.dtype, device=logp.device)
    loss = policy
    if ref_logp is not None:
        _check_mask(ref_logp, mask, "ref_logp")
        kl_tok = kl_k3(logp, ref_logp)
        kl_value = (kl_tok * m).sum() / n
        if kl_coef:
            loss = loss + kl_coef * aggregate(kl_tok, mask, aggregation, norm_tokens)
    with torch.no_grad():
        clip_fraction = ((clipped > unclipped) & m).sum() / n
        ratio_mean = (ratio * m).sum() / n
    return PolicyLossStats(
        loss=loss,
        policy_loss=float(policy.detach()),
        kl=float(kl_value.detach()),
        clip_fraction=float(clip_fraction),
        ratio_mean=float(ratio_mean),
    )


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), by generalised advantage estimation: delta_t = r_t + gamma V_{t+1} -
    V_t (V after a sequence's last counted token is 0), A_t = delta_t + gamma lam A_{t+1}; returns = A + V.
    Positions outside the mask get 0. Rewards are per token (a sequence reward sits on its last token)."""
    for x, what in ((rewards, "rewards"), (values, "values")):
        _check_mask(x, mask, what)
    m = mask.to(values.dtype)
    T = values.shape[1]
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        # a position after the sequence's end contributes nothing; the last counted token bootstraps from 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        next_value = values[:, t] * m[:, t]
        next_adv = adv[:, t]
    returns = (adv + values) * m
    return adv, returns


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    aggregation: str = "token-mean",
) -> torch.Tensor:
    """The critic's loss: 0.5 max((V - R)^2, (V_clip - R)^2) per token with V_clip = old + clip(V - old, -c, c)
    (no clipping when `clip` is None), aggregated over the mask."""
    for x, what in ((values, "values"), (old_values, "old_values"), (returns, "returns")):
        _check_mask(x, mask, what)
    err = (values - returns) ** 2
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"value clip {clip} must be positive (or null for no clipping)")
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return aggregate(0.5 * err, mask, aggregation)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef {kl_coef} must not be negative")
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019)'s adaptive KL coefficient: after n_steps samples with mean KL `current_kl`, the
    coefficient is multiplied by 1 + clip(current_kl / target - 1, -0.2, 0.2) x n_steps / horizon, so the KL is
    steered towards `target`."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL: init_kl_coef {init_kl_coef} must be >= 0, target {target} and horizon {horizon} > 0"
            )
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, float]:
    """(loss, pairwise accuracy) of a reward model on preference pairs: -log sigmoid(s_chosen - s_rejected -
    margin), averaged; accuracy = share of pairs with s_chosen > s_rejected."""
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} scores differ in shape"
        )
    diff = chosen - rejected
    loss = -torch.nn.functional.logsigmoid(diff - margin).mean()
    return loss, float((diff > 0).float().mean())
