"""Learning rate at a step: linear warm-up, then constant, cosine or linear decay to a fraction of the base."""

from __future__ import annotations

import math

from ldm.choices import LR_SCHEDULES


def learning_rate(
    step: int,
    base: float,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 0,
    final_ratio: float = 0.0,
) -> float:
    """The rate for optimizer step ``step`` (0-based). Decay runs from the end of warm-up to ``total_steps``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: expected one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return base * (final_ratio + (1 - final_ratio) * shape)


def set_learning_rate(optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate
