"""Freezing rules usable from any training loop: `loss.backward(); rule.step(); optimizer.step()`."""
from .base import FreezingRule
from .lts import LTSRule
from .oscillation import OscillationRule

RULES = ("none", "lts", "osc")

__all__ = ["FreezingRule", "LTSRule", "OscillationRule", "RULES"]
