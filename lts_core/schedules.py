"""Threshold-ratio schedules of the LTS rule (ratios are in Δ units: freeze when EMA distance ≤ ratio·Δ).

The arithmetic is the reference code's, expression for expression (so that thresholds agree to the last bit):
linear-growth `1/(T−W)·(t−W)`, sine-growth `sin((t−W)/(T−W)·π/2)`, with `W` warm-up and `T` total steps.
A weight may freeze only at steps `t > W` (strictly; with `W = 0` the first eligible step is 1).
"""
from __future__ import annotations

import math

SCHEDULES = ("fixed", "linear", "sine")
# The reference code's names for the same schedules (its `--fixed_mode`).
SCHEDULE_ALIASES = {"fixing": "fixed", "linear-growth": "linear", "sine-growth": "sine"}


def canonical_schedule(name: str) -> str:
    """'fixed' | 'linear' | 'sine' from ours or the reference's names; ValueError for anything else (the
    reference silently freezes nothing for an unknown name; here it is an error)."""
    key = SCHEDULE_ALIASES.get(name, name)
    if key not in SCHEDULES:
        known = ", ".join(SCHEDULES + tuple(SCHEDULE_ALIASES))
        raise ValueError(f"unknown schedule {name!r}; expected one of {known}")
    return key


def default_ratio(schedule: str) -> float:
    """The reference's defaults: ρ = 0.1 for `fixed`, 1 (the spec's growth curves) for `linear` and `sine`."""
    return 0.1 if canonical_schedule(schedule) == "fixed" else 1.0


def eligible(t: int, warmup_steps: int) -> bool:
    """Whether a weight may freeze at step t: strictly after the warm-up (t > W)."""
    return t > warmup_steps


def schedule_gain(t: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """ρ_t / ρ: the schedule's shape at step t (0 while t ≤ W; the growth curves reach 1 at t = T and stay)."""
    if not eligible(t, warmup_steps):
        return 0.0
    schedule = canonical_schedule(schedule)
    if schedule == "fixed":
        return 1.0
    W, T = int(warmup_steps), int(total_steps)
    if t >= T:
        return 1.0
    if schedule == "linear":
        return 1 / (T - W) * (t - W)
    return math.sin((t - W) / (T - W) * math.pi / 2)


def ratio_at(t: int, schedule: str, ratio: float, warmup_steps: int, total_steps: int) -> float:
    """Threshold ratio ρ_t (Δ units) at global step t; -1 (no freezing) while t ≤ W.

    fixed: ρ; linear: ρ·(t−W)/(T−W); sine: ρ·sin((t−W)/(T−W)·π/2). The spec's growth schedules use ρ = 1
    (the multiplier generalises them; ρ = 1 gives the reference's value bit for bit).
    """
    if not eligible(t, warmup_steps):
        return -1.0
    return float(ratio) * schedule_gain(t, schedule, warmup_steps, total_steps)


def threshold_norm(rho: float, n_levels: int) -> float:
    """The rule's comparison value in normalised units: `1/(L−1)·ρ`, as the reference computes it (torch then
    rounds it to float32 when comparing with a float32 tensor)."""
    return 1 / (n_levels - 1) * rho


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
