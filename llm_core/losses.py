"""Loss functions shared by SFT, DPO and distillation (pure torch).

Conventions: logits are (B, T, V) and `targets` (B, T) are already aligned with them (targets[b, t] is the token
logits[b, t] should predict, i.e. shifted left by one relative to the input ids); -100 marks ignored positions.
Everything is computed in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check_targets(logits: torch.Tensor, targets: torch.Tensor, what: str = "logits") -> None:
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"{what} must be (B, T, V) and targets (B, T) with the same B, T; got {what} {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}"
        )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position, (B, T) fp32, 0 where target == -100."""
    _check_targets(logits, targets)
    valid = targets != IGNORE_INDEX  # (B, T)
    tgt = targets.masked_fill(~valid, 0).unsqueeze(-1)  # (B, T, 1); any in-vocab id for ignored positions
    # log_softmax casts to fp32 inside the kernel (no separate fp32 copy of the logits); autograd keeps only its
    # (B, T, V) fp32 output for the backward pass.
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32).gather(-1, tgt).squeeze(-1)  # (B, T)
    return logp.masked_fill(~valid, 0.0)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each sequence's non-ignored positions, (B,) fp32."""
    return token_logprobs(logits, targets).sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss (Rafailov et al. 2023) with conservative label smoothing, mean over the B pairs.

    Inputs are (B,) sequence log-probs (see sequence_logprobs). With h = (pc - pr) - (rc - rr) and ε the label
    smoothing: loss = -(1 - ε) log σ(β h) - ε log σ(-β h). Metrics (detached, means over pairs): rewards/chosen
    = β (pc - rc), rewards/rejected = β (pr - rr), rewards/margins = their difference, rewards/accuracy = share
    of pairs with chosen reward > rejected reward.
    """
    if beta <= 0:
        raise ValueError(f"DPO beta = {beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing = {label_smoothing} must be in [0, 0.5)")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"DPO inputs must be four (B,) tensors of one shape; got shapes {sorted(shapes)}")
    pc, pr, rc, rr = (t.float() for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    logits = (pc - pr) - (rc - rr)  # (B,) h
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
        -beta * logits
    )
    with torch.no_grad():
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)  # (B,)
        metrics = {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracy": (chosen > rejected).float().mean().item(),
        }
    return losses.mean(), metrics


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Knowledge distillation (Hinton et al. 2015): alpha · T² · KL(teacher_T || student_T) + (1 - alpha) · CE.

    KL(softmax(teacher / T) || softmax(student / T)) is summed over the vocabulary and averaged over the positions
    whose target != -100, CE is the student's mean cross-entropy at temperature 1 over the same positions. The
    teacher gets no gradient. Metrics: kl (the averaged KL, before alpha · T²) and ce. With no target positions
    the loss is 0.
    """
    _check_targets(student_logits, targets, "student_logits")
    if teacher_logits.shape[:2] != student_logits.shape[:2] or teacher_logits.dim() != 3:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must be (B, T, V) with the student's B, T "
            f"{tuple(student_logits.shape[:2])}"
        )
    if teacher_logits.size(-1) != student_logits.size(-1):
        raise ValueError(
            f"teacher vocab size {teacher_logits.size(-1)} != student vocab size {student_logits.size(-1)}: "
            "distillation needs one shared tokenizer/vocabulary"
        )
    if temperature <= 0:
        raise ValueError(f"distillation temperature = {temperature} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha = {alpha} must be in [0, 1]")
    valid = targets != IGNORE_INDEX  # (B, T)
    s, t = student_logits[valid], teacher_logits.detach()[valid]  # (N, V): only the N positions that count
    n = s.size(0)
    logp_s = F.log_softmax(s.float() / temperature, dim=-1)  # (N, V)
    logp_t = F.log_softmax(t.float() / temperature, dim=-1)  # (N, V)
    p_t = logp_t.exp()
    # p_t (log p_t - log p_s), with 0 where the teacher gives a token no mass (-inf logits: 0 * -inf would be NaN)
    kl_terms = torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t))  # (N, V)
    kl = kl_terms.sum() / max(n, 1)
    ce = F.cross_entropy(s.float(), targets[valid], reduction="sum") / max(n, 1)
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    return loss, {"kl": kl.item(), "ce": ce.item()}


# ------------------------------------------------- pretraining cross-entropy (used by model.Transformer)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits over targets != -100, computed a few rows at a time.

    Same value and gradient as F.cross_entropy(logits.float(), targets, ignore_index=-100), but each (rows, V)
    fp32 temporary stays in the CPU cache and the gradient is written once, in the logits' dtype. The plain
    call makes several passes over full (N, V) fp32 tensors (upcast copy, log-softmax, zero-filled NLL grad,
    softmax grad, downcast), which on a CPU can cost as much as the LM head's three matmuls in bf16.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, (1 << 21) // logits.size(1))  # ~8 MiB of fp32 per chunk: fits in L3, few ops per call
        valid = targets != -100
        tgt = targets.masked_fill(~valid, 0).unsqueeze(1)  # (N, 1)
        logp_tgt = torch.empty(logits.size(0), 1, dtype=torch.float32, device=logits.device)  # (N, 1)
        for s in range(0, logits.size(0), rows):
            logp = F.log_softmax(logits[s : s + rows], dim=-1, dtype=torch.float32)
            logp_tgt[s : s + rows] = logp.gather(1, tgt[s : s + rows])
        count = valid.sum()
        ctx.save_for_backward(logits, tgt, valid, count)
        ctx.rows = rows
        # nll_loss over the gathered log-probs reduces in F.cross_entropy's order: the same value bit for bit
        return F.nll_loss(logp_tgt, targets.masked_fill(valid, 0), ignore_index=-100)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, tgt, valid, count = ctx.saved_tensors
        scale = (grad_out / count * valid).unsqueeze(1)  # (N, 1), 0 for ignored rows
        grad = torch.empty_like(logits)
        minus_one = torch.full((min(ctx.rows, logits.size(0)), 1), -1.0, device=logits.device)
        for s in range(0, logits.size(0), ctx.rows):
            # d(-log p_t)/dz = softmax(z) - onehot(t), times dloss/d(-log p_t) = grad_out / count
            p = F.softmax(logits[s : s + ctx.rows], dim=-1, dtype=torch.float32)
            p.scatter_add_(1, tgt[s : s + ctx.rows], minus_one[: p.size(0)])
            grad[s : s + ctx.rows] = p.mul_(scale[s : s + ctx.rows])
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 of (N, V) logits and (N,) targets, -100 = ignored."""
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return _ChunkedCrossEntropy.apply(logits, targets)
    # GPUs stream full-size tensors fast and torch.compile fuses this itself
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)
