"""Learning-rate schedule as a pure function of the step (nanoGPT habit: no scheduler state)."""

from __future__ import annotations

import math

from bavq.config import TrainConfig


def lr_at(step: int, total_steps: int, peak_lr: float, train: TrainConfig) -> float:
    """Linear warm-up for ``train.warmup_steps``, then cosine to ``min_lr_ratio * peak`` or constant."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return peak_lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return peak_lr
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.min_lr_ratio * peak_lr
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
