"""Lottery Ticket Scratcher (Zhong et al.): freeze a weight once the EMA of its distance to its
quantization level falls under a threshold (in Δ units), after a warm-up. Semantics: shared/LTS_SPEC.md."""
from __future__ import annotations

import torch
from torch import nn

from ..distance import encode_distance, ema_update
from ..schedules import SCHEDULES, ratio_at
from .base import FreezingRule


class LTSRule(FreezingRule):
    """EMA distance d (Δ): d_0 = r_0; d_t = (1-m)·r_t + m·d_{t-1}; d_t = 1 Δ on a level transition.

    After `warmup_steps`, an unfrozen weight freezes at step t when d_t ≤ ρ_t (schedule fixed / linear / sine).
    A frozen weight keeps its full-precision value from its freeze step on and is never unfrozen.
    """

    name = "lts"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int,
                 warmup_steps: int, schedule: str = "linear", ratio: float = 1.0, decay: float = 0.99):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if ratio < 0:
            raise ValueError(f"threshold ratio must be ≥ 0, got {ratio}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warm-up ({warmup_steps} steps) must be ≥ 0 and < total steps ({total_steps})")
        super().__init__(model, optimizer, total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.ratio = float(ratio)
        self.decay = float(decay)
        self.ema = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]
        self.prev_level = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]

    def threshold(self, t: int | None = None) -> float:
        """ρ_t in Δ units (-1 during warm-up)."""
        return ratio_at(self.t if t is None else t, self.schedule, self.ratio, self.warmup_steps, self.total_steps)

    def _observe(self, i, level, r, w):
        if self.t == 0:
            self.ema[i] = r.clone()
        else:
            changed = level != self.prev_level[i]
            self.ema[i] = ema_update(self.ema[i], r, changed, self.decay)
        self.prev_level[i] = level
        rho = self.threshold()
        if rho < 0:
            return None, None
        return self.ema[i] <= rho, None

    def settings(self) -> dict:
        return {"rule": "lts", "schedule": self.schedule, "ratio": self.ratio, "decay": self.decay,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def record_state(self) -> dict[str, list[torch.Tensor]]:
        return {"ema": [encode_distance(e) for e in self.ema]}

    def _state_tensors(self):
        return {**super()._state_tensors(), "ema": self.ema, "prev_level": self.prev_level}
