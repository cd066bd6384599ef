"""Lottery Ticket Scratcher (Zhong et al.): freeze a weight once the EMA of its distance to its quantization
level falls under a threshold, after a warm-up. Semantics: shared/LTS_SPEC.md, reproduced from the reference
code step for step (tests/test_reference_traces.py checks every weight's freeze step and EMA against its traces).
"""
from __future__ import annotations

import torch
from torch import nn

from ..channels import (DEFAULT_CHANNEL_QUANTILE, channel_statistic, check_granularity, check_quantile,
                        expand_channels)
from ..distance import encode_distance, ema_update
from ..fused import compiled_for, const, cpu_kernels, kernel
from ..quantizers import LearnedIntervalQuantizer
from ..schedules import canonical_schedule, default_ratio, ratio_at, threshold_norm
from .base import _F32_EXACT, FreezingRule


class LTSRule(FreezingRule):
    """The LTS rule, exactly as the reference runs it (t = 0, 1, … counts this rule's `step()` calls).

    Per weight, in normalised units (Δ = 1/(L−1)), with r_t = |x_t − q_t| the exact float32 distance:
    - t = 0 is observed but discarded (only its level is kept);
    - t = 1: d_1 = r_1 (no transition reset);
    - t ≥ 2: d_t = (1−m)·r_t + m·d_{t−1}, then d_t = Δ where the level changed since step t−1.
    An unfrozen weight freezes at step t > W (strictly after the warm-up) when d_t ≤ ρ_t·Δ, ρ_t from the
    schedule (`fixed`: ρ; `linear`: ρ·(t−W)/(T−W); `sine`: ρ·sin((t−W)/(T−W)·π/2)). A frozen weight keeps the
    value step t's forward used, gets no gradient and never unfreezes; its EMA and level keep being tracked.

    `ratio=None` takes the reference's default: 0.1 for `fixed`, 1 for the growth schedules. The reference's
    schedule names (`fixing`, `linear-growth`, `sine-growth`) are accepted; anything else is an error.

    `granularity="channel"` freezes output channels (rows of a Linear, filters of a Conv) as a whole: a channel
    freezes at step t > W when the `channel_quantile`-quantile of its weights' EMA distances (an element of the
    channel, `channels.channel_statistic`; default 0.25, the lower quartile; 1 = the maximum) is ≤ the same float32
    threshold. The EMA stays per
    weight, exactly as above. `bound_grad="active"` (see `FreezingRule`) turns frozen channels into skipped
    weight-gradient computation; the defaults (`"weight"`, `"all"`) are the reference, unchanged.

    Example::

        rule = LTSRule(model, optimizer, total_steps=200, warmup_steps=40, schedule="linear")
        loss.backward(); rule.step(); optimizer.step()
        # structured freezing that saves backward time:
        rule = LTSRule(model, optimizer, 200, 40, granularity="channel", bound_grad="active")
    """

    name = "lts"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int,
                 warmup_steps: int, schedule: str = "linear", ratio: float | None = None, decay: float = 0.99,
                 granularity: str = "weight", channel_quantile: float = DEFAULT_CHANNEL_QUANTILE,
                 bound_grad: str = "all"):
        schedule = canonical_schedule(schedule)
        self._granularity = check_granularity(granularity)
        self.channel_quantile = check_quantile(channel_quantile)
        ratio = default_ratio(schedule) if ratio is None else float(ratio)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if not ratio >= 0:
            raise ValueError(f"threshold ratio must be ≥ 0, got {ratio}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warm-up ({warmup_steps} steps) must be ≥ 0 and < total steps ({total_steps})")
        super().__init__(model, optimizer, total_steps, bound_grad=bound_grad)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.ratio = ratio
        self.decay = float(decay)
        # EMA distance per weight in normalised units (multiply by L−1 for Δ units): `ema_steps()`.
        self.ema = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]
        self.prev_level = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.modules]
        self._own_level = list(self.prev_level)   # the numba step updates these in place

    def _step_cpu(self, i, q, w):
        """On CPU (`fused.cpu_kernels`), a learned-interval layer's whole step in one numba pass over the weight:
        measure from w and the current bounds (the fused forward's ops), the EMA and its reset, the decision and
        the freeze, and the gradient mask under `bound_grad="all"` (`fused_cpu.lts_step`, the same bits as the
        eager ops). `prev_level[i]` (= `last_level[i]`) is updated in place; `last_raw[i]` is filled on steps a
        Recorder asked for (`record_codes`) only, else None. Channel granularity decides on the channel
        statistic afterwards (eager), from the EMA the pass updated."""
        grad = w.grad
        if not (self.fused and type(q) is LearnedIntervalQuantizer and bool(q.initialized)
                and w.dtype == torch.float32 and self.t < _F32_EXACT
                and (grad is None or (grad.dtype == torch.float32 and grad.shape == w.shape))):
            return False
        state = (w, self.ema[i], self._own_level[i], self._unfrozen[i], self.frozen[i], self._live[i],
                 self.frozen_values[i], self._freeze_step_f[i], self._freeze_step[i])
        cpu = cpu_kernels(*state, *(() if grad is None else (grad,)))
        if cpu is None:
            return False
        t = self.t
        if self.record_codes:   # the forward's distance code, as the eager step keeps it
            self.last_dist_code[i] = q.measure_code(w)[1]
        if self.prev_level[i] is not self._own_level[i]:   # an eager step left the forward's level there
            self._own_level[i].copy_(self.prev_level[i])
            self.prev_level[i] = self._own_level[i]
        with torch.no_grad():
            lo, up = q._lu()
            b = up - lo
        rho = self.threshold(t)
        decide = rho >= 0 and self._granularity == "weight"
        fold = grad is not None and self.bound_grad == "all" and decide   # else the eager logic, after
        raw = torch.empty_like(w) if self.record_codes else None
        n1 = self.n_levels[i] - 1
        listed = self._frozen_list(i, cpu) if decide else None   # this step's freezes are appended to it
        if listed is not None:
            listed.new_cnt[:] = 0
        n_new = cpu.run_split(
            cpu.lts_step, w.numel(), self.numels[i] // self.n_channels[i], cpu.flat(w), cpu.f32(lo), cpu.f32(b),
            cpu.f32(n1), min(t, 2), cpu.flat(self.ema[i]), cpu.flat(self._own_level[i]), cpu.f32(self.decay),
            cpu.f32(1.0 - self.decay), cpu.f32(1 / n1), cpu.f32(threshold_norm(rho, self.n_levels[i]) if decide
                                                                 else -1.0), decide,
            *(cpu.flat(x) for x in state[3:9]), t, cpu.f32(t), cpu.flat(self._channel_frozen[i]),
            self.numels[i] // self.n_channels[i], cpu.empty_f32() if grad is None else cpu.flat(grad), fold,
            cpu.empty_f32() if raw is None else cpu.flat(raw), raw is not None,
            *((cpu.empty_i32(), cpu.empty_i64()) if listed is None else (listed.scratch, listed.new_cnt)))
        self.last_level[i] = self.prev_level[i]
        self.last_raw[i] = raw
        if n_new:
            self._n_frozen[i] += n_new
            self._update_layer(i)
            mid = cpu.split_point(w.numel(), self.numels[i] // self.n_channels[i])   # where run_split cut
            if listed is not None and not listed.extend(mid, cpu.flat(self.frozen_values[i]), self._mask_version[i]):
                self._lists[i] = None
        if self._granularity == "channel" and rho >= 0:   # the channel statistic on the updated EMA
            newly, _ = self._decide_channels(i, threshold_norm(rho, self.n_levels[i]))
            if newly is not None:
                n_new = self._freeze(i, newly)
        if not fold:
            self._mask_grads(i, True if n_new else None)
        return True

    @property
    def granularity(self) -> str:
        return self._granularity

    @property
    def _lists_kept(self) -> bool:   # per weight, `_step_cpu` appends its freezes to the layer's FrozenList
        return self._granularity == "weight"

    def threshold(self, t: int | None = None) -> float:
        """ρ_t in Δ units (-1 while no weight may freeze, i.e. t ≤ W)."""
        return ratio_at(self.t if t is None else t, self.schedule, self.ratio, self.warmup_steps, self.total_steps)

    def ema_steps(self, i: int) -> torch.Tensor:
        """EMA distance of layer i in Δ units (float32)."""
        return self.ema[i] * (self.n_levels[i] - 1)

    def _measure_observe(self, i, q, w):
        """With the compiled kernels, a per-weight rule past its first two steps measures, updates the EMA and
        decides in one pass over the forward's x, k and k/(L−1) (`fused.kernel("lts_update")`, the same ops
        as `measure_norm`, `ema_update` and the comparison below)."""
        seen = q._remembered(w) if self.fused and self.t >= 2 and self._granularity == "weight" else None
        rho = self.threshold(self.t) if seen is not None else -1.0
        if seen is None or seen[2] is None or rho < 0 or not compiled_for(seen[0], self.ema[i]) or not all(
                t.is_contiguous() for t in (*seen, self.ema[i], self.prev_level[i], self._live[i])):
            return super()._measure_observe(i, q, w)
        x, level, step = seen
        r, newly = kernel("lts_update")(
            x.view(-1), step.view(-1), level.view(-1), self.prev_level[i].view(-1), self.ema[i].view(-1),
            self._live[i].view(-1), const(threshold_norm(rho, self.n_levels[i])), const(self.decay),
            const(1.0 - self.decay), const(1 / (self.n_levels[i] - 1)))
        self.last_level[i] = self.prev_level[i] = level
        self.last_raw[i] = r.view(w.shape)
        newly = newly.view(w.shape)
        newly._live_only = True      # already limited to unfrozen weights
        return newly, None

    def _observe(self, i, level, r, w):
        t = self.t
        if t == 1:
            self.ema[i] = r.clone()
        elif t >= 2:
            reset = 1 / (self.n_levels[i] - 1)
            mask = torch.float32 if self.fused else torch.bool   # fused: a float32 1.0 / 0.0 mask (fast kernels)
            changed = torch.ne(level, self.prev_level[i], out=self._buffer(f"changed_{mask}", i, mask))
            ema_update(self.ema[i], r, changed, self.decay, reset, scratch=self._buffer("ema_tmp", i, torch.float32))
        self.prev_level[i] = level
        rho = self.threshold(t)
        if rho < 0:
            return None, None
        thr = threshold_norm(rho, self.n_levels[i])
        if self._granularity == "channel":
            return self._decide_channels(i, thr)
        mask = torch.float32 if self.fused else torch.bool
        return torch.le(self.ema[i], thr, out=self._buffer(f"decide_{mask}", i, mask)), None

    def _decide_channels(self, i, thr):
        """The channels to freeze: the statistic of the channels not frozen yet (the rest stay)."""
        live = None if not self._n_frozen[i] else torch.nonzero(self._unfrozen[i].reshape(
            self.n_channels[i], -1)[:, 0]).flatten()
        if live is not None and live.numel() == 0:
            return None, None
        ema = self.ema[i] if live is None else self.ema[i].reshape(self.n_channels[i], -1).index_select(0, live)
        hit = channel_statistic(ema, ema.shape[0] if live is not None else self.n_channels[i],
                                self.channel_quantile) <= thr
        if live is not None:
            hit = torch.zeros(self.n_channels[i], dtype=torch.bool, device=hit.device).index_copy_(0, live, hit)
        if self.fused:   # a float32 view [C, 1, …] broadcast over the weight (the freeze limits it to live weights)
            shape = self.ema[i].shape
            return hit.to(torch.float32).reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape), None
        return expand_channels(hit, self.ema[i].shape), None

    def settings(self) -> dict:
        return {"rule": "lts", "schedule": self.schedule, "ratio": self.ratio, "decay": self.decay,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "semantics": "reference", "granularity": self._granularity,
                "channel_quantile": self.channel_quantile, "bound_grad": self.bound_grad}

    def record_state(self) -> dict[str, list[torch.Tensor]]:
        """The EMA as uint8 codes of 1/128 Δ (Δ units, saturating at ≈ 2 Δ)."""
        return {"ema": [kernel("encode_ema")(e.view(-1), const(self.n_levels[i] - 1)).view(e.shape)
                        if compiled_for(e) and e.is_contiguous() else encode_distance(self.ema_steps(i))
                        for i, e in enumerate(self.ema)]}

    def _state_tensors(self):
        return {**super()._state_tensors(), "ema": self.ema, "prev_level": self.prev_level}
