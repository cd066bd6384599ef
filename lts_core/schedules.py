"""Threshold-ratio schedules of the LTS rule (ratios are in Δ units: freeze when EMA distance ≤ ratio·Δ)."""
from __future__ import annotations

import math

SCHEDULES = ("fixed", "linear", "sine")


def progress(t: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction of the post-warm-up span elapsed at step t: (t - W) / (T - W), clipped to [0, 1]."""
    span = max(total_steps - warmup_steps, 1)
    return min(max((t - warmup_steps) / span, 0.0), 1.0)


def ratio_at(t: int, schedule: str, ratio: float, warmup_steps: int, total_steps: int) -> float:
    """Threshold ratio ρ_t at global step t; no freezing (returns -1) while t < warm-up.

    fixed: ρ; linear: ρ·(t-W)/(T-W); sine: ρ·sin((t-W)/(T-W)·π/2). The spec's growth schedules use ρ = 1.
    """
    if t < warmup_steps:
        return -1.0
    if schedule == "fixed":
        return float(ratio)
    p = progress(t, warmup_steps, total_steps)
    if schedule == "linear":
        return float(ratio) * p
    if schedule == "sine":
        return float(ratio) * math.sin(p * math.pi / 2)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def schedule_gain(t: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """ρ_t / ρ: the schedule's shape at step t (1 for fixed; 0 before warm-up ends)."""
    if t < warmup_steps:
        return 0.0
    return ratio_at(t, schedule, 1.0, warmup_steps, total_steps)


def osc_threshold_at(t: int, total_steps: int, start_frac: float = 0.25, thr_start: float = 0.1,
                     thr_end: float = 0.01) -> float:
    """Oscillation-freezing threshold on the oscillation-frequency EMA at step t (Nagel et al. 2022).

    0 (no freezing) during the first `start_frac` of training, then cosine-annealed from thr_start to thr_end.
    """
    start = start_frac * total_steps
    if t < start:
        return 0.0
    p = min(max((t - start) / max(total_steps - start, 1), 0.0), 1.0)
    return thr_end + (thr_start - thr_end) * (1 + math.cos(math.pi * p)) / 2
