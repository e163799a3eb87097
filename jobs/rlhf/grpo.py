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
from llm_core.rl_losses import LOSS_AGGREGATIONS, clipped_policy_loss, group_advantages


class GRPOConfig(StrictModel):
    group_size: int = Field(8, description="completions per prompt (GRPO compares them: at least 2)")
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

    @field_validator("group_size")
    @classmethod
    def _a_group(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"grpo.group_size {v}: GRPO's advantage compares the samples of a prompt, so it needs at least 2 "
                "(set grpo.group_size >= 2, or use algorithm: ppo for one sample per prompt)"
            )
        return v

    @field_validator("loss_aggregation")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation {v!r} is not one of {LOSS_AGGREGATIONS}")
        return v


@dataclass
class RolloutBatch:
    """Prompt + completion token ids, right-padded: input_ids (B, T); targets' completion mask (B, T - 1).
    `completions` hold each row's completion tokens (with the stop token when the completion stopped on one)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    completions: list[list[int]]

    def rows(self, index: Sequence[int]) -> RolloutBatch:
        """The rows `index`, trimmed to their longest sequence."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        T = int(self.attention_mask[idx].sum(dim=1).max())
        return RolloutBatch(
            self.input_ids[idx, :T],
            self.attention_mask[idx, :T],
            self.completion_mask[idx, : T - 1],
            [self.completions[i] for i in idx.tolist()],
        )

    @property
    def num_tokens(self) -> int:
        """Real (prompt + completion) tokens of the batch."""
        return int(self.attention_mask.sum())


def pack_rollouts(
    prompts: Sequence[list[int]], per_prompt: int, completions: Sequence[list[int]], pad_id: int
) -> RolloutBatch:
    """A RolloutBatch of `per_prompt` completions of each prompt (a prompt's completions next to each other)."""
    expanded = [list(p) for p in prompts for _ in range(per_prompt)]
    if len(expanded) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts x {per_prompt}")
    T = max(len(p) + len(c) for p, c in zip(expanded, completions))
    ids = torch.full((len(expanded), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(expanded), T), dtype=torch.long)
    comp = torch.zeros((len(expanded), T - 1))
    for i, (p, c) in enumerate(zip(expanded, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + list(c))
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) - 1 : len(p) + len(c) - 1] = (
            1  # targets at positions len(p)-1 .. predict the completion
        )
    return RolloutBatch(ids, attn, comp, [list(c) for c in completions])


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
    return pack_rollouts(prompts, per_prompt, completions, pad_id)


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


def micro_batches(batch: RolloutBatch, max_tokens: int | None) -> list[list[int]]:
    """Row indices of consecutive micro-batches whose padded size (rows x longest row) stays within `max_tokens`
    (a row longer than that is a micro-batch of its own); None: the whole batch at once."""
    n = batch.input_ids.shape[0]
    if max_tokens is None:
        return [list(range(n))]
    lengths = batch.attention_mask.sum(dim=1).tolist()
    out: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, length in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            out.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        out.append(current)
    return out


def _forward_logprobs(
    model: Transformer, batch: RolloutBatch, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = model(batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1]).logits
    logp = token_logprobs(logits, batch.input_ids[:, 1:]) * batch.completion_mask
    ent = None
    if entropy:
        with torch.no_grad():
            lp = torch.log_softmax(logits.float(), dim=-1)
            ent = -(lp.exp() * lp).sum(dim=-1) * batch.completion_mask
    return logp, ent


def completion_logprobs(
    model: Transformer, batch: RolloutBatch, micro_batch_tokens: int | None = None
) -> torch.Tensor:
    """(B, T - 1) log-probs of each next token (0 outside the completion), computed in micro-batches of at most
    `micro_batch_tokens` tokens when given (the result is the same)."""
    parts = micro_batches(batch, micro_batch_tokens)
    if len(parts) == 1:
        return _forward_logprobs(model, batch)[0]
    out = torch.zeros_like(batch.completion_mask, dtype=torch.float32)
    for idx in parts:
        lp = _forward_logprobs(model, batch.rows(idx))[0]
        out[idx, : lp.shape[1]] = lp.float()
    return out


@dataclass
class UpdateStats:
    """One optimizer step of a policy update (weighted over its micro-batches)."""

    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float
    entropy: float  # mean per-token entropy of the policy on the completions (before the step)
    grad_norm: float
    ratio_max_deviation: (
        float  # max |ratio - 1| over the completion tokens (0.0 exactly on a batch's first step)
    )


def _weights(batch: RolloutBatch, parts: list[list[int]], aggregation: str) -> list[float]:
    """The share of each micro-batch in a loss aggregated over the whole batch: tokens for token-mean, sequences
    for the per-sequence aggregations (so the micro-batched gradient equals the whole batch's)."""
    if aggregation == "token-mean":
        total = float(batch.completion_mask.sum().clamp(min=1))
        return [float(batch.completion_mask[idx].sum()) / total for idx in parts]
    return [len(idx) / batch.input_ids.shape[0] for idx in parts]


def sync_gradients(model: torch.nn.Module) -> None:
    """Average the gradients over the data-parallel ranks (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def policy_step(
    policy: Transformer,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str = "token-mean",
    norm_tokens: int | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    micro_batch_tokens: int | None = None,
    grad_clip: float = 0.0,
) -> UpdateStats:
    """One optimizer step of the clipped policy loss over the batch, accumulated over micro-batches of at most
    `micro_batch_tokens` tokens (each weighted by its share of the aggregation, so the step equals the whole
    batch's), gradients averaged over data-parallel ranks."""
    parts = micro_batches(batch, micro_batch_tokens)
    weights = _weights(batch, parts, aggregation)
    optimizer.zero_grad(set_to_none=True)
    totals = dict.fromkeys(("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean"), 0.0)
    tokens = float(batch.completion_mask.sum().clamp(min=1))
    entropy_sum, deviation = 0.0, 0.0
    for idx, w in zip(parts, weights):
        part = batch.rows(idx)
        T = part.completion_mask.shape[1]
        logp, ent = _forward_logprobs(policy, part, entropy=True)
        adv = advantages[idx] if advantages.dim() == 1 else advantages[idx, :T]
        out = clipped_policy_loss(
            logp,
            old_logp[idx, :T],
            adv,
            part.completion_mask,
            clip_low=clip_low,
            clip_high=clip_high,
            ref_logp=None if ref_logp is None else ref_logp[idx, :T],
            kl_coef=kl_coef,
            aggregation=aggregation,
            norm_tokens=norm_tokens,
        )
        (out.loss * w).backward()
        with torch.no_grad():
            ratio = torch.exp(logp.detach() - old_logp[idx, :T])
            deviation = max(deviation, float(((ratio - 1).abs() * part.completion_mask).max()))
        share = float(part.completion_mask.sum()) / tokens  # token-weighted statistics
        totals["loss"] += float(out.loss.detach()) * w
        totals["policy_loss"] += out.policy_loss * w
        totals["kl"] += out.kl * share
        totals["clip_fraction"] += out.clip_fraction * share
        totals["ratio_mean"] += out.ratio_mean * share
        entropy_sum += float(ent.sum()) if ent is not None else 0.0
    sync_gradients(policy)
    grad_norm = (
        float(torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip))
        if grad_clip > 0
        else float(
            torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in policy.parameters() if p.grad is not None])
            )
        )
    )
    optimizer.step()
    return UpdateStats(
        **totals, entropy=entropy_sum / tokens, grad_norm=grad_norm, ratio_max_deviation=deviation
    )


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
) -> tuple[list[float], list[UpdateStats]]:
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
        stats.append(
            policy_step(
                policy,
                optimizer,
                batch,
                old_logp,
                adv,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                aggregation=cfg.loss_aggregation,
                norm_tokens=cfg.max_new_tokens,
                ref_logp=ref_logp,
                kl_coef=cfg.kl_coef,
            )
        )
    return rewards, stats
