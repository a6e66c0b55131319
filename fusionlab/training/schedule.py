"""Warmup-stable-decay learning-rate schedule."""

from __future__ import annotations

import math


def wsd_factor(step: int, total_steps: int, warmup_steps: int, cooldown_fraction: float = 0.2) -> float:
    """Return the learning-rate multiplier (0..1) at `step` of a `total_steps` run.

    Linear warmup, constant, then a cooldown over the last `cooldown_fraction` of the steps with
    the inverse-square-root shape 1 - sqrt((t - t0) / (T - t0)), which reaches 0 at T.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}: set trainer.max_steps")
    cooldown_start = total_steps * (1.0 - cooldown_fraction)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cooldown_fraction <= 0 or step < cooldown_start:
        return 1.0
    progress = (step - cooldown_start) / (total_steps - cooldown_start)
    return max(0.0, 1.0 - math.sqrt(min(progress, 1.0)))
