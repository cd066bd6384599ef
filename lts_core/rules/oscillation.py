"""Oscillation freezing (Nagel et al., ICML 2022): freeze weights that keep flipping between two levels.

Per weight: an oscillation is a level change whose direction is opposite to the weight's previous change;
its frequency EMA f ← m·o + (1-m)·f (m small, 0.01). The threshold is 0 (no freezing) for the first 25%
of steps, then cosine-annealed from 0.1 to 0.01; when f > threshold the weight is frozen onto the level
given by rounding the EMA of its integer level. Only layers of `max_bits` bits or fewer are watched.
"""
from __future__ import annotations

import torch
from torch import nn

from ..schedules import osc_threshold_at
from .base import FreezingRule


class OscillationRule(FreezingRule):
    name = "osc"
    moves_weights = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int,
                 decay: float = 0.01, start_frac: float = 0.25, thr_start: float = 0.1, thr_end: float = 0.01,
                 max_bits: int = 4, bound_grad: str = "all"):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"oscillation EMA factor must be in (0, 1), got {decay}")
        super().__init__(model, optimizer, total_steps,
                         layer_filter=lambda m: m.weight_quantizer.bits <= max_bits, bound_grad=bound_grad)
        self.decay, self.start_frac, self.thr_start, self.thr_end = float(decay), start_frac, thr_start, thr_end
        self.max_bits = max_bits
        self.freq = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]
        self.level_ema = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]
        self.prev_level = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]
        self.last_dir = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]  # -1, 0, +1

    def threshold(self, t: int | None = None) -> float:
        return osc_threshold_at(self.t if t is None else t, self.total_steps, self.start_frac,
                                self.thr_start, self.thr_end)

    def _observe(self, i, level, r, w):
        m = self.decay
        if self.t == 0:
            self.level_ema[i] = level.clone()
        else:
            delta = level - self.prev_level[i]
            direction = torch.sign(delta)
            changed = delta != 0
            osc = changed & (self.last_dir[i] != 0) & (direction != self.last_dir[i])
            self.last_dir[i] = torch.where(changed, direction, self.last_dir[i])
            self.freq[i] = osc.float() * m + self.freq[i] * (1 - m)
            self.level_ema[i] = level.float() * m + self.level_ema[i] * (1 - m)
        self.prev_level[i] = level
        thr = self.threshold()
        if thr <= 0:
            return None, None
        newly = self.freq[i] > thr
        if not bool(newly.any()):
            return newly, None
        q = self.modules[i].weight_quantizer
        target = torch.clamp(torch.round(self.level_ema[i]), 0, q.n_levels - 1)
        return newly, q.level_value(target).to(w.dtype)

    def settings(self) -> dict:
        return {"rule": "osc", "decay": self.decay, "start_frac": self.start_frac, "thr_start": self.thr_start,
                "thr_end": self.thr_end, "max_bits": self.max_bits, "total_steps": self.total_steps,
                "bound_grad": self.bound_grad}

    def record_state(self) -> dict[str, list[torch.Tensor]]:
        return {"freq": [torch.clamp(torch.round(f * 255), 0, 255).to(torch.uint8) for f in self.freq]}

    def _state_tensors(self):
        return {**super()._state_tensors(), "freq": self.freq, "level_ema": self.level_ema,
                "prev_level": self.prev_level, "last_dir": self.last_dir}
