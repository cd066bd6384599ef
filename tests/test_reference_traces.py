"""The LTS rule against the reference code's own per-step traces (tests/data/reference_traces/README.md).

Lock-step: before step t the layers get the reference's effective weights and bounds of step t, so nothing can
cascade and any difference is a difference of the rule: every weight's freeze step must be equal and the EMA
distance after every step bit-identical. End to end: the same model, initial weights, batches and optimizers
train through the public API; freeze steps must be equal too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lts_core import LTSRule, quantize_model, quantized_layers

TRACES = sorted((Path(__file__).parent / "data" / "reference_traces").glob("lts_ref_*.npz"))


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    T, S, W, bits, m, fixed_rate = d["meta"]
    d.update(T=int(T), S=int(S), W=int(W), bits=int(bits), m=float(m), fixed_rate=float(fixed_rate),
             mode=str(d["mode"]))
    return d


def _model(d: dict) -> tuple[nn.Module, list[nn.Module]]:
    """The traces' model through the public API: both layers quantized at the same bits with the 2q−1 output."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        for k, lin in ((1, model[0]), (2, model[2])):
            lin.weight.copy_(torch.from_numpy(d[f"l{k}_w0"]))
            lin.bias.copy_(torch.from_numpy(d[f"l{k}_b0"]))
    quantize_model(model, bits=d["bits"], first_last_bits=d["bits"], output="unit")
    layers = [m for _, m in quantized_layers(model)]
    assert len(layers) == 2
    with torch.no_grad():
        for lay, (lo, up) in zip(layers, d["bounds"]):
            # our initialisation (∓3·std of the weights) is the reference's: same float32 bounds
            assert float(lay.weight_quantizer.lower) == np.float32(lo)
            assert float(lay.weight_quantizer.upper) == np.float32(up)
    return model, layers


def _rule(d: dict, model: nn.Module, optimizer=None) -> LTSRule:
    ratio = d["fixed_rate"] if d["mode"] == "fixing" else None  # the reference ignores it in growth modes
    return LTSRule(model, optimizer, total_steps=d["T"] * d["S"], warmup_steps=d["W"] * d["S"],
                   schedule=d["mode"], ratio=ratio, decay=d["m"])


def _expected_freeze(d: dict, k: int) -> np.ndarray:
    u = d[f"l{k}_unchange"].astype(np.int64)   # the reference's 0 means never frozen
    return np.where(u > 0, u, -1)


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_lock_step_matches_reference_exactly(path):
    d = _load(path)
    model, layers = _model(d)
    rule = _rule(d, model)
    assert rule.n_trainable == int(d["n_trainable"])
    n_steps = d["T"] * d["S"]
    for t in range(n_steps):
        with torch.no_grad():
            for k, lay in enumerate(layers, start=1):
                lay.weight.copy_(torch.from_numpy(d[f"l{k}_w"][t]))
                lay.weight_quantizer.lower.fill_(float(d[f"l{k}_lw"][t]))
                lay.weight_quantizer.upper.fill_(float(d[f"l{k}_uw"][t]))
        rule.step()
        for k in (1, 2):
            # the level the rule measured is the reference's q·(L−1)
            q = torch.from_numpy(d[f"l{k}_q"][t]) * (2 ** d["bits"] - 1)
            assert torch.equal(rule.last_level[k - 1], torch.round(q))
            if t >= 1:  # step 0 is discarded by the reference (no EMA value kept)
                assert torch.equal(rule.ema[k - 1], torch.from_numpy(d[f"l{k}_dist"][t])), (t, k)
        assert rule.frozen_fraction_all_params() == pytest.approx(float(d["iter_fixed_ratio"][t]), abs=1e-7)
    for k in (1, 2):
        np.testing.assert_array_equal(rule.freeze_step[k - 1].numpy(), _expected_freeze(d, k))
    # the whole-run figure, the reference's way: frozen ÷ all trainable parameters, averaged over every step
    assert rule.updates_eliminated_all_params() == pytest.approx(float(np.mean(d["iter_fixed_ratio"])), abs=1e-7)
    n_watched = sum(lay.weight.numel() for lay in layers)
    assert rule.updates_eliminated() == pytest.approx(
        rule.updates_eliminated_all_params() * d["n_trainable"] / n_watched, rel=1e-12)


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_end_to_end_training_matches_reference(path):
    """Train from the traces' initial state with the reference's optimizers: every freeze step is equal, and
    the effective weights and EMA distances follow the reference's to float precision."""
    d = _load(path)
    torch.manual_seed(0)
    model, layers = _model(d)
    bounds = [p for n, p in model.named_parameters() if "quantizer" in n]
    others = [p for n, p in model.named_parameters() if "quantizer" not in n]
    opt = torch.optim.SGD(others, lr=0.05, momentum=0.9, weight_decay=1e-4)
    bound_opt = torch.optim.Adam(bounds, lr=1e-4)
    rule = _rule(d, model, opt)
    for t in range(d["T"] * d["S"]):
        for k, lay in enumerate(layers, start=1):
            np.testing.assert_allclose(lay.weight.detach().numpy(), d[f"l{k}_w"][t], rtol=0, atol=2e-6)
        loss = F.cross_entropy(model(torch.from_numpy(d["X"][t])), torch.from_numpy(d["Y"][t]))
        opt.zero_grad()
        bound_opt.zero_grad()
        loss.backward()
        rule.step()
        opt.step()
        bound_opt.step()
        if t >= 1:
            for k in (1, 2):
                np.testing.assert_allclose(rule.ema[k - 1].numpy(), d[f"l{k}_dist"][t], rtol=0, atol=2e-6)
    for k in (1, 2):
        np.testing.assert_array_equal(rule.freeze_step[k - 1].numpy(), _expected_freeze(d, k))
