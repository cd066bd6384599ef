"""Distance-to-level code and the EMA update shared by the LTS rule and the replay.

Recorded distances are in quantization steps (Δ units), stored on a uint8 grid of 1/128 Δ that saturates at
255/128 ≈ 1.99 Δ. The LTS rule itself never uses this grid: it decides on the exact float32 distance in
normalised units (Δ = 1/(L−1)), as the reference code does. A run recorded at every step also stores those
exact distances (`raw_dist`), so its replay is exact; coarser records replay from the codes.
"""
from __future__ import annotations

import torch

DIST_SCALE = 128
DIST_MAX_CODE = 255
RESET_DISTANCE = 1.0  # a weight that just changed level is one full step (1 Δ) from settled


def encode_distance(dist: torch.Tensor) -> torch.Tensor:
    """Distance in Δ (float) -> uint8 code (1/128 Δ per unit, saturating at 255)."""
    code = torch.clamp(torch.round(dist * DIST_SCALE), 0, DIST_MAX_CODE)
    if code.device.type == "cpu" and code.is_floating_point():
        code = code.to(torch.int16)   # the same integers; float → int16 → uint8 is ~4× faster on the CPU
    return code.to(torch.uint8)


def decode_distance(code: torch.Tensor) -> torch.Tensor:
    """uint8 code -> distance in Δ as float32."""
    return code.to(torch.float32) / DIST_SCALE


def ema_update(d: torch.Tensor, r: torch.Tensor, changed: torch.Tensor, decay: float,
               reset: float | torch.Tensor = RESET_DISTANCE, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """One LTS EMA step (float32): d' = (1-m)·r + m·d, then d' = `reset` (one step) where the level changed.

    Op for op the reference's update, so the rule and the replay agree with it bit for bit. `reset` is one
    step in the units of `d`: 1.0 in Δ units, 1/(L−1) in normalised units (a float, or a per-weight tensor).
    With `scratch` (a float32 tensor like `r`, overwritten) d' is written into `d` itself: the same two products
    and one addition (commutative), so the same bits, with no allocation (the rule's per-step path).
    `changed` is bool, or float32 1.0 / 0.0 (the fused rule's masks): then the reset is `torch.lerp(d', reset,
    changed)`, which returns d' or `reset` exactly for finite values, in place and without a bool-masked kernel.
    """
    if scratch is not None:
        out = d.mul_(decay).add_(torch.mul(r, 1.0 - decay, out=scratch))
    else:
        out = r * (1.0 - decay)
        out += d * decay
    if changed.dtype != torch.bool:
        end = reset if isinstance(reset, torch.Tensor) else torch.tensor(reset, dtype=out.dtype, device=out.device)
        return torch.lerp(out, end, changed, out=out)
    if isinstance(reset, torch.Tensor):
        return torch.where(changed, reset, out)
    return out.masked_fill_(changed, reset)


def ema_update_compounded(d: torch.Tensor, r: torch.Tensor, changed: torch.Tensor, decay: float,
                          n_steps: int, reset: float | torch.Tensor = RESET_DISTANCE) -> torch.Tensor:
    """EMA over `n_steps` optimizer steps between two records, holding the recorded distance `r` constant.

    The decay compounds (`m**n_steps`); a level change seen between the records resets to one step at the
    record. With `n_steps == 1` this is exactly `ema_update`.
    """
    m = float(decay) if n_steps == 1 else float(decay) ** int(n_steps)
    return ema_update(d, r, changed, m, reset)
