"""Output channels of a quantized layer as freezing units (LTS `granularity="channel"`).

An output channel is a row of a Linear weight `[out, in]` or a filter of a Conv weight `[out, in/g, *k]`: the
weight's first axis. Flattened (C order) a layer's weights are `C` consecutive runs of `K = numel / C` weights,
the same flat order the rules, the recorder and the run store use, so a per-weight array of a layer reshapes
to `[C, K]`.

A channel freezes as a whole when a statistic of its weights' EMA distances passes the rule's threshold. The
statistic is the q-quantile of the channel's distances taken as an element of the channel (no interpolation):
the ⌈q·K⌉-th smallest, so the channel freezes once at least ⌈q·K⌉ of its K weights are under the threshold.
q = 1 is the maximum (every weight of the channel has settled); q = 0.9 freezes a channel once 90 % of its
weights (rounded up) have. An order statistic is exact: the rule and the
replay compare the same float32 value with the same threshold.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # only tensor methods are called here: importing this module (the app reads the default
    import torch    # quantile on first views) does not import torch

GRANULARITIES = ("weight", "channel")
# The default channel statistic: the lower quartile (a channel freezes once a quarter of its weights have settled).
# Chosen from data (BENCHMARKS.md, "The channel statistic"): on the shipped datasets no q tried (0.1 … 1) put any
# seed's test accuracy more than 0.6 points below baseline QAT, so the saving decides, and q = 0.25 is the largest
# (most conservative) q whose whole-run ResNet-20 saving meets issue 10's targets (backward ≥ 25 %, step ≥ 15 %
# below baseline QAT); the median (0.5) freezes channels 3 epochs later and misses them, the max (q = 1) skips
# only 2–4 % of backward FLOPs.
DEFAULT_CHANNEL_QUANTILE = 0.25
BOUND_GRADS = ("all", "active")


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    return granularity


def check_bound_grad(bound_grad: str) -> str:
    if bound_grad not in BOUND_GRADS:
        raise ValueError(f"unknown bound_grad {bound_grad!r}; expected one of {', '.join(BOUND_GRADS)}")
    return bound_grad


def check_quantile(q: float) -> float:
    q = float(q)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"channel quantile must be in (0, 1] (1 = max), got {q}")
    return q


def quantile_rank(k: int, q: float) -> int:
    """0-based rank of the q-quantile among k sorted values: ⌈q·k⌉ − 1 (k − 1 for q = 1, the maximum)."""
    return min(k - 1, max(0, math.ceil(q * k - 1e-9) - 1))


def channel_statistic(d: torch.Tensor, n_channels: int, q: float = 1.0) -> torch.Tensor:
    """Per output channel, the q-quantile (module docstring) of `d` (any shape with `n_channels·K` elements,
    channel-major, e.g. a layer's EMA distances): float32 [n_channels], the same dtype as `d`."""
    rows = d.reshape(n_channels, -1)
    k = rows.shape[1]
    if q >= 1.0:
        return rows.amax(dim=1)
    return rows.kthvalue(quantile_rank(k, q) + 1, dim=1).values


def expand_channels(per_channel: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-channel tensor `[C]` broadcast to a weight of `shape` (`[C, …]`), materialised."""
    view = per_channel.reshape((shape[0],) + (1,) * (len(shape) - 1))
    return view.expand(shape).clone()


def fully_frozen_channels(frozen: torch.Tensor) -> torch.Tensor:
    """bool [C]: output channels all of whose weights are frozen (a frozen mask of the weight's shape)."""
    return frozen.reshape(frozen.shape[0], -1).all(dim=1)
