"""Optimizer and learning-rate schedules shared by every training stage."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms, biases and embeddings."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "norm" in name or "embed" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool | None = None
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float,
    decay_fraction: float,
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    cosine: linear warmup, then cosine decay to min_lr_ratio at total_steps.
    wsd: warmup, stable at the peak, then linear decay over the last `decay_fraction` of steps (MiniCPM's WSD).
    constant: warmup, then flat.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, int(total_steps * decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"unknown lr schedule {schedule!r}: use cosine, wsd or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, **kwargs))
