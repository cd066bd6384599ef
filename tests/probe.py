"""A hand-made quantized layer for rule and replay tests."""
import torch
from torch import nn

from lts_core.layers import QLinear
from lts_core.quantizers import LearnedIntervalQuantizer


def probe(n: int):
    """One QLinear(1, n) whose 2-bit grid is 0,1,2,3 in weight units: position == weight, Δ == 1.

    Returns (model, layer)."""
    q = LearnedIntervalQuantizer(bits=2)
    layer = QLinear.from_float(nn.Linear(1, n, bias=False), q)
    with torch.no_grad():
        q.lower.fill_(0.0)
        q.upper.fill_(3.0)
    return nn.Sequential(layer), layer
