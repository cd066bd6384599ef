"""Channel granularity in the replay, and the structurally skippable share of any freezing.

Two questions about output channels (rows of a Linear, filters of a Conv: `lts_core.channels`):
- **channel-LTS replay**: at a record, a channel of layer l freezes when its `channel_quantile`-quantile EMA
  distance (an order statistic, so the same float32 value the live rule compares) is ≤ fl32(1/(L_l−1)·ρ). Every
  weight of the channel gets the channel's decision, so the per-weight machinery of `replay.py` (running
  minimum of the grid bin, histograms, ticket precision) is unchanged: a channel's weights share one bin.
- **structurally skippable**: a channel whose weights are all frozen costs no weight-gradient FLOPs in a
  planned backward (`lts_core.channel_grad`). For per-weight freezing that is the latest freeze step of the
  channel's weights (at ratio J: the largest running-minimum bin of its weights); for channel freezing it is
  the frozen share itself. The FLOP share is Σ_l c_l·F_l / (2·Σ_l F_l) as in the rules (c_l the fully frozen
  share of layer l's channels), averaged over steps like `backward_flops_saved`.

Layer channel counts come from the run's manifest (each layer's `shape[0]`); without them (older runs) channel
replays are an error and the structural share is unknown (nan).
"""
from __future__ import annotations

import numpy as np
import torch

from ..channels import (DEFAULT_CHANNEL_QUANTILE, channel_statistic, check_granularity, check_quantile,
                        expand_channels, quantile_rank)

__all__ = ["ChannelSpec", "channel_spec", "channel_freeze", "channel_bins", "StructuralCounter",
           "skippable_counts"]


class ChannelSpec:
    """What the replay needs to know about channels: granularity, quantile, per-layer channel counts."""

    def __init__(self, granularity: str, quantile: float, layer_channels: list[int] | None, sizes: list[int]):
        self.granularity = check_granularity(granularity)
        self.quantile = check_quantile(quantile)
        self.channels = None if layer_channels is None else [int(c) for c in layer_channels]
        if self.channels is not None:
            if len(self.channels) != len(sizes):
                raise ValueError(f"{len(self.channels)} layer channel counts for {len(sizes)} layers")
            for c, n in zip(self.channels, sizes):
                if n and (c < 1 or n % c):   # (an empty layer has no channel to check)
                    raise ValueError(f"a layer of {n} weights cannot have {c} output channels")
        if self.granularity == "channel" and self.channels is None:
            raise ValueError("channel granularity needs each layer's output-channel count (the run's manifest "
                             "has no layer shapes: record it again with this version)")

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    @property
    def known(self) -> bool:
        return self.channels is not None


def channel_spec(granularity: str = "weight", channel_quantile: float = DEFAULT_CHANNEL_QUANTILE,
                 layer_channels=None, sizes: list[int] | None = None) -> ChannelSpec:
    if layer_channels is not None and len(layer_channels) == 0:
        layer_channels = None
    return ChannelSpec(granularity, channel_quantile, layer_channels, list(sizes or []))


def channel_freeze(d: torch.Tensor, thr: float, n_channels: int, quantile: float) -> torch.Tensor:
    """bool like `d` (one layer's EMA distances, flat): the weights of channels whose statistic is ≤ thr —
    the live rule's comparison (`LTSRule` with granularity "channel")."""
    if d.numel() == 0:
        return torch.zeros_like(d, dtype=torch.bool)
    stat = channel_statistic(d, n_channels, quantile)
    return expand_channels(stat <= thr, torch.Size((n_channels, d.numel() // n_channels))).reshape(d.shape)


def _np_statistic(d: np.ndarray, n_channels: int, q: float) -> np.ndarray:
    rows = d.reshape(n_channels, -1)
    k = rows.shape[1]
    if q >= 1.0:
        return rows.max(axis=1)
    r = quantile_rank(k, q)
    return np.partition(rows, r, axis=1)[:, r]


def channel_bins(d: np.ndarray, n_channels: int, quantile: float, bins_of) -> np.ndarray:
    """Per weight (int64, one layer, flat): the grid bin of its channel's statistic, `bins_of(stat)` being the
    replay's `grid_bins` for this layer and record. Every weight of a channel gets its channel's bin."""
    if d.size == 0:
        return np.zeros(0, dtype=np.int64)
    stat = _np_statistic(np.asarray(d, dtype=np.float32), n_channels, quantile)
    return np.repeat(bins_of(stat), d.size // n_channels)


class StructuralCounter:
    """Per record, weights in fully frozen channels for every grid ratio, from the per-weight running-minimum
    bins `M` of a per-weight replay index: a channel is fully frozen at ratio J once max(M over the channel) ≤ J.

    `update(M, layers)` after the records' changes of M in `layers`; `hist` is int64 [n_layers · NB] like the
    index's histogram of M (weights counted, so dividing by layer sizes gives the channel share).
    """

    def __init__(self, sizes: list[int], channels: list[int], n_bins: int):
        self.sizes, self.channels, self.NB = list(sizes), list(channels), int(n_bins)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.cmax = [np.full(c, n_bins - 1, dtype=np.int64) for c in channels]   # all start "never frozen"
        self.hist = np.zeros(len(sizes) * n_bins, dtype=np.int64)
        for i, n in enumerate(sizes):
            self.hist[i * n_bins + n_bins - 1] = n

    def update(self, M: np.ndarray, layers) -> None:
        for i in layers:
            a, b = self.offsets[i], self.offsets[i + 1]
            c = self.channels[i]
            if a == b:
                continue
            new = M[a:b].reshape(c, -1).max(axis=1)
            old = self.cmax[i]
            ch = np.flatnonzero(new != old)
            if ch.size:
                k = (b - a) // c
                base = i * self.NB
                np.add.at(self.hist, base + new[ch], k)
                np.subtract.at(self.hist, base + old[ch], k)
                old[ch] = new[ch]


def skippable_counts(freeze_steps: np.ndarray, steps: np.ndarray, sizes: list[int],
                     channels: list[int]) -> np.ndarray:
    """int64 [n_layers, R]: weights in fully frozen channels at each record, from per-weight freeze steps
    (-1 = never): a channel is fully frozen from the latest freeze step of its weights on."""
    R = len(steps)
    out = np.zeros((len(sizes), R), dtype=np.int64)
    off = 0
    for i, (n, c) in enumerate(zip(sizes, channels)):
        if n == 0:
            continue
        fs = np.asarray(freeze_steps[off:off + n], dtype=np.int64).reshape(c, -1)
        off += n
        done = (fs >= 0).all(axis=1)
        last = fs.max(axis=1)[done]
        rf = np.searchsorted(steps, last, side="left")
        out[i] = np.cumsum(np.bincount(rf, minlength=R + 1)[:R]) * (n // c)
    return out
