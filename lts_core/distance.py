"""Distance-to-level code and the EMA update shared by the freezing rules and the replay.

Distances are in quantization steps (Δ units). They are stored on a uint8 grid of 1/128 Δ that saturates
at 255/128 ≈ 1.99 Δ. The rules decode the code *before* using it, so a run recorded at every step replays
bit-exactly (the grid moves a distance by at most 1/256 Δ, i.e. < 0.4% of a step).
"""
from __future__ import annotations

import torch

DIST_SCALE = 128
DIST_MAX_CODE = 255
RESET_DISTANCE = 1.0  # a weight that just changed level is one full step from settled


def encode_distance(dist: torch.Tensor) -> torch.Tensor:
    """Distance in Δ (float) -> uint8 code (1/128 Δ per unit, saturating at 255)."""
    return torch.clamp(torch.round(dist * DIST_SCALE), 0, DIST_MAX_CODE).to(torch.uint8)


def decode_distance(code: torch.Tensor) -> torch.Tensor:
    """uint8 code -> distance in Δ as float32."""
    return code.to(torch.float32) / DIST_SCALE


def ema_update(d: torch.Tensor, r: torch.Tensor, changed: torch.Tensor, decay: float) -> torch.Tensor:
    """One LTS EMA step (float32): d' = (1-m)·r + m·d, then d' = 1 Δ where the level changed.

    The same operations in the same order are used by the rule and by the replay, so both agree bit for bit.
    """
    out = r * (1.0 - decay)
    out += d * decay
    return out.masked_fill_(changed, RESET_DISTANCE)


def ema_update_compounded(d: torch.Tensor, r: torch.Tensor, changed: torch.Tensor, decay: float,
                          n_steps: int) -> torch.Tensor:
    """EMA over `n_steps` optimizer steps between two records, holding the recorded distance `r` constant.

    The decay compounds (`m**n_steps`); a level change seen between the records resets to 1 Δ at the record.
    With `n_steps == 1` this is exactly `ema_update`.
    """
    if n_steps == 1:
        return ema_update(d, r, changed, decay)
    return ema_update(d, r, changed, float(decay) ** int(n_steps))
