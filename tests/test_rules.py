"""Freezing rules checked against shared/LTS_SPEC.md on hand-made weight sequences."""
import math

import pytest
import torch
from torch import nn

from lts_core.layers import quantize_model
from lts_core.rules import LTSRule, OscillationRule
from probe import probe


def drive(rule, layer, seq):
    """Feed a [T, n] sequence of weight values, one per step; returns the EMA (Δ units) after each step."""
    emas = []
    for row in seq:
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(row, dtype=torch.float32)[:, None])
        rule.step()
        emas.append(rule.ema_steps(0).flatten().tolist())
    return emas


def test_ema_step_by_step_reference_start_and_reset():
    """Step 0 is discarded, d_1 = r_1 with no reset even if the level changed, then EMA + reset to 1 Δ."""
    model, layer = probe(2)
    rule = LTSRule(model, None, total_steps=10, warmup_steps=9, schedule="fixed", ratio=0.0, decay=0.5)
    # weight 0: distances 0.25, 0.25, 0.125, 0.4375 (same level 1) -> d = (none), .25, .1875, .3125
    # weight 1: levels 1, 2, 2, 3 at distance .25: the change at t = 1 does not reset, the one at t = 3 does
    seq = [[1.25, 1.25], [1.25, 1.75], [1.125, 1.75], [1.4375, 2.75]]
    emas = drive(rule, layer, seq)
    assert [e[0] for e in emas] == pytest.approx([0.0, 0.25, 0.1875, 0.3125], abs=1e-6)
    assert [e[1] for e in emas] == pytest.approx([0.0, 0.25, 0.25, 1.0], abs=1e-6)
    # in the rule's own (normalised) units the reset is exactly one step, 1/(L−1)
    assert rule.ema[0].flatten()[1].item() == torch.tensor(1 / 3, dtype=torch.float32).item()


@pytest.mark.parametrize("schedule,warmup,total,dist,expected", [
    # fixed ρ = 0.3, weight sits exactly on its level: freezes the first step strictly after warm-up (t > W)
    ("fixed", 3, 10, 0.0, 4),
    ("fixed", 0, 10, 0.0, 1),  # W = 0: step 0 has no EMA yet, step 1 is the first eligible
    # linear: ρ_t = (t-2)/8 ≥ 0.2 first at t = 4
    ("linear", 2, 10, 0.2, 4),
    # sine: sin((t-1)/10·π/2) ≥ 0.25 first at t = 3 (t=2: sin(π/20)=0.156)
    ("sine", 1, 11, 0.25, 3),
])
def test_freeze_step_per_schedule(schedule, warmup, total, dist, expected):
    model, layer = probe(1)
    rule = LTSRule(model, None, total_steps=total, warmup_steps=warmup, schedule=schedule, ratio=0.3 if
                   schedule == "fixed" else 1.0, decay=0.99)
    drive(rule, layer, [[1.0 + dist]] * total)
    assert rule.freeze_step[0].item() == expected
    assert rule.frozen[0].item()


def test_never_frozen_above_fixed_threshold_and_never_unfrozen():
    model, layer = probe(2)
    rule = LTSRule(model, None, total_steps=20, warmup_steps=2, schedule="fixed", ratio=0.2, decay=0.5)
    # weight 0 at 0.25 Δ forever: never freezes under 0.2; weight 1 settles at 0 then moves away
    seq = [[1.25, 2.0]] * 5 + [[1.25, 2.4]] * 15
    drive(rule, layer, seq)
    assert rule.freeze_step[0].flatten().tolist() == [-1, 3]
    assert rule.frozen[0].flatten().tolist() == [False, True]


def test_freeze_step_matches_rule_computation_with_expected_values():
    # linear, W=0, T=4, constant d=0.375: ρ_t = t/4 -> freezes at t=2 (0.5 ≥ .375), not t=1 (.25)
    model, layer = probe(1)
    rule = LTSRule(model, None, total_steps=4, warmup_steps=0, schedule="linear", decay=0.9)
    drive(rule, layer, [[1.375]] * 4)
    assert rule.freeze_step[0].item() == 2
    assert rule.threshold(2) == 0.5


def test_default_ratio_is_the_reference_s():
    """ρ defaults to 0.1 in fixed mode (it must not freeze everything at once) and to 1 for the growth curves."""
    model, layer = probe(3)
    rule = LTSRule(model, None, total_steps=10, warmup_steps=0, schedule="fixed")
    assert rule.ratio == 0.1 and rule.threshold(1) == 0.1
    drive(rule, layer, [[1.05, 1.25, 2.45]] * 10)  # distances .05, .25, .45 Δ
    assert rule.freeze_step[0].flatten().tolist() == [1, -1, -1]
    for sched in ("linear", "sine"):
        assert LTSRule(model, None, total_steps=10, warmup_steps=0, schedule=sched).ratio == 1.0


def test_reference_schedule_names_are_aliases_and_unknown_names_fail():
    model, _ = probe(1)
    for ref, ours in (("fixing", "fixed"), ("linear-growth", "linear"), ("sine-growth", "sine")):
        assert LTSRule(model, None, 10, 2, schedule=ref).schedule == ours
    with pytest.raises(ValueError, match="unknown schedule 'linear_growth'"):
        LTSRule(model, None, 10, 2, schedule="linear_growth")


def make_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return quantize_model(m, bits=2, example_input=torch.randn(2, 16))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_frozen_weights_bit_identical_after_100_steps(opt_name):
    model = make_mlp()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    rule = LTSRule(model, opt, total_steps=100, warmup_steps=5, schedule="fixed", ratio=0.25, decay=0.5)
    layer = model[2]
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    history = []
    for t in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        history.append(layer.weight.detach().clone())  # the values this step's forward used
        before = rule.frozen[0].clone()
        rule.step()
        assert torch.all(layer.weight.grad[rule.frozen[0]] == 0)  # no gradient where frozen
        assert torch.all(rule.frozen[0] >= before)  # never unfrozen
        opt.step()
    fz, steps = rule.frozen[0], rule.freeze_step[0]
    assert 0.05 < fz.float().mean() < 1.0, "the test needs some frozen and some free weights"
    w = layer.weight.detach()
    # bit-identical to the value at the freeze step
    expected = torch.stack(history)[steps.clamp_min(0), torch.arange(w.shape[0])[:, None],
                                    torch.arange(w.shape[1])[None, :]]
    assert torch.equal(w[fz], expected[fz])
    # free weights did move
    assert not torch.equal(w[~fz], history[0][~fz])


def test_accounting_matches_definition():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = LTSRule(model, opt, total_steps=30, warmup_steps=3, schedule="linear", decay=0.9)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    fracs = []
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        rule.step()
        opt.step()
        fracs.append(rule.frozen[0].float().mean().item())
    assert rule.updates_eliminated() == pytest.approx(sum(fracs) / 30, rel=1e-9)
    # one quantized layer: the FLOP-weighted fraction is its own, and half of it is saved
    assert rule.backward_flops_saved() == pytest.approx(sum(fracs) / 30 / 2, rel=1e-9)


def test_rule_validation():
    model = make_mlp()
    with pytest.raises(ValueError, match="decay"):
        LTSRule(model, None, 10, 2, decay=1.0)
    with pytest.raises(ValueError, match="warm-up"):
        LTSRule(model, None, 10, 10)
    with pytest.raises(ValueError, match="ratio"):
        LTSRule(model, None, 10, 2, ratio=-0.1)
    with pytest.raises(ValueError, match="schedule"):
        LTSRule(model, None, 10, 2, schedule="cubic")
    with pytest.raises(ValueError, match="quantize_model"):
        LTSRule(nn.Sequential(nn.Linear(2, 2)), None, 10, 2)


def test_oscillation_rule_freezes_the_restless_onto_its_ema_level():
    model, layer = probe(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rule = OscillationRule(model, opt, total_steps=40, decay=0.25, start_frac=0.25, thr_start=0.1, thr_end=0.01)
    # weight 0 oscillates between levels 1 and 2 every step; weight 1 walks up monotonically then stays
    seq = [[1.4 if t % 2 == 0 else 1.6, min(0.1 * t, 3.0)] for t in range(40)]
    for row in seq:
        with torch.no_grad():
            if not rule.frozen[0].flatten()[0]:
                layer.weight[0, 0] = row[0]
            layer.weight[1, 0] = row[1]
        rule.step()
        opt.step()
    steps = rule.freeze_step[0].flatten().tolist()
    assert steps[0] == 10  # first step at/after 25% of 40 steps (its frequency is far above 0.1)
    assert steps[1] == -1
    # frozen onto the level given by its level EMA (1.5 ± → rounds to level 1 or 2) exactly on the grid
    w0 = layer.weight.flatten()[0].item()
    assert w0 in (1.0, 2.0)
    assert math.isclose(rule.freq[0].flatten()[1].item(), 0.0)


def test_backward_flops_are_flop_weighted_per_layer():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    quantize_model(m, bits=2, first_last_bits=2, example_input=torch.randn(2, 16))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rule = LTSRule(m, opt, total_steps=20, warmup_steps=2, schedule="fixed", ratio=0.3, decay=0.5)
    flops = [2 * 16 * 64, 2 * 64 * 64, 2 * 64 * 4]  # forward FLOPs per sample of each layer
    assert rule.layer_flops == flops
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    expected = 0.0
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        rule.step()
        opt.step()
        fr = [f.float().mean().item() for f in rule.frozen]
        expected += sum(a * b for a, b in zip(fr, flops)) / (2 * sum(flops))
    assert rule.backward_flops_saved() == pytest.approx(expected / 20, rel=1e-9)
