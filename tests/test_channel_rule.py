"""LTS with `granularity="channel"` and `bound_grad="active"`: the decision on hand-made weights, structural
accounting by hand, and a training loop where frozen channels really cost no weight-gradient work."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lts_core.channels import channel_statistic, quantile_rank
from lts_core.layers import QLinear, quantize_model
from lts_core.quantizers import LearnedIntervalQuantizer
from lts_core.rules import LTSRule


def grid_layer(rows: int, cols: int):
    """QLinear(cols → rows) on the 2-bit grid 0, 1, 2, 3 (position == weight, Δ == 1)."""
    q = LearnedIntervalQuantizer(bits=2)
    layer = QLinear.from_float(nn.Linear(cols, rows, bias=False), q)
    with torch.no_grad():
        q.lower.fill_(0.0)
        q.upper.fill_(3.0)
    return nn.Sequential(layer), layer


def test_quantile_rank_and_statistic():
    assert [quantile_rank(10, q) for q in (1.0, 0.9, 0.5, 0.05)] == [9, 8, 4, 0]
    assert quantile_rank(3, 2 / 3) == 1
    d = torch.tensor([[0.3, 0.1, 0.2, 0.0], [0.5, 0.5, 0.1, 0.4]])
    assert channel_statistic(d, 2, 1.0).tolist() == pytest.approx([0.3, 0.5])
    assert channel_statistic(d, 2, 0.75).tolist() == pytest.approx([0.2, 0.5])
    assert channel_statistic(d, 2, 0.5).tolist() == pytest.approx([0.1, 0.4])


@pytest.mark.parametrize("q,expected_rows", [(1.0, [0]), (2 / 3, [0, 1]), (1 / 3, [0, 1, 2])])
def test_channel_freezes_as_a_whole_when_its_statistic_passes(q, expected_rows):
    """EMA decay 0: d_1 = r_1. Row 0 is settled everywhere, row 1 in two weights of three, row 2 in one, row 3
    nowhere; fixed ρ = 0.1 Δ, no warm-up: at t = 1 exactly the rows whose q-quantile is ≤ 0.1 freeze."""
    model, layer = grid_layer(4, 3)
    w = torch.tensor([[1.05, 2.0, 0.95], [1.05, 2.3, 1.0], [1.4, 2.3, 1.0], [1.4, 2.3, 0.7]])
    rule = LTSRule(model, None, total_steps=10, warmup_steps=0, schedule="fixed", ratio=0.1, decay=0.0,
                   granularity="channel", channel_quantile=q)
    with torch.no_grad():
        layer.weight.copy_(w)
    rule.step()                      # t = 0: discarded
    rule.step()                      # t = 1: d = r, decide
    frozen_rows = [r for r in range(4) if bool(rule.frozen[0][r].all())]
    assert frozen_rows == expected_rows
    assert all(not bool(rule.frozen[0][r].any()) for r in range(4) if r not in expected_rows)
    assert (rule.freeze_step[0][expected_rows] == 1).all()
    # the per-weight rule would freeze exactly the weights within 0.1 Δ
    per_weight = LTSRule(model, None, 10, 0, schedule="fixed", ratio=0.1, decay=0.0)
    per_weight.step(), per_weight.step()
    assert torch.equal(per_weight.frozen[0], (w - w.round()).abs() <= 0.1 + 1e-6)


def test_structural_share_is_counted_from_fully_frozen_channels():
    """Two layers; by hand: Σ_l c_l·F_l / (2·Σ F), averaged over steps, c_l the fully frozen channel share."""
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), bits=2,
                           first_last_bits=2, example_input=torch.randn(2, 4))
    layers = [model[0], model[2]]
    F1, F2 = layers[0].flops, layers[1].flops
    rule = LTSRule(model, None, total_steps=10, warmup_steps=0, schedule="fixed", ratio=0.1, decay=0.0)
    with torch.no_grad():   # per-weight rule: freeze row 0 of layer 0 whole and one weight of row 1
        for lay in layers:
            q = lay.weight_quantizer
            lay.weight.copy_(q.lower + (q.upper - q.lower) * 0.5)   # exactly between two levels: never settles
        lo, up = layers[0].weight_quantizer.lower, layers[0].weight_quantizer.upper
        layers[0].weight[0] = lo            # on level 0
        layers[0].weight[1, 0] = up         # on level 3
    rule.step()
    rule.step()
    assert rule.frozen_count() == 5 and rule._n_frozen_channels == [1, 0]
    assert rule.backward_flops_skippable() == pytest.approx((1 / 6 * F1) / (2 * (F1 + F2)) / 2)
    assert rule.backward_flops_saved() == pytest.approx((5 / 24 * F1) / (2 * (F1 + F2)) / 2)
    assert rule.frozen_channel_fraction() == pytest.approx(1 / 9)


def _train(granularity: str, bound_grad: str, steps: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    model = quantize_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                         nn.Linear(16, 4)), bits=2, first_last_bits=2, example_input=x[:2])
    wparams = [p for n, p in model.named_parameters() if "quantizer" not in n]
    bparams = [p for n, p in model.named_parameters() if "quantizer" in n]
    opt = torch.optim.SGD(wparams, lr=0.05, momentum=0.9, weight_decay=1e-4)
    bopt = torch.optim.Adam(bparams, lr=1e-3)
    rule = LTSRule(model, opt, total_steps=steps, warmup_steps=5, schedule="linear", ratio=2.0,
                   granularity=granularity, bound_grad=bound_grad)
    snaps = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        bopt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        rule.step()
        opt.step()
        bopt.step()
        snaps.append([(m.weight.detach().clone(), m.weight_quantizer.lower.detach().clone()) for m in rule.modules])
    return model, rule, snaps


def test_channel_active_training_frozen_weights_stay_and_fully_frozen_layers_stop():
    model, rule, snaps = _train("channel", "active")
    assert 0.3 < rule.frozen_fraction() <= 1.0
    for i in range(len(rule.modules)):
        fs = rule.freeze_step[i]
        rows = fs.reshape(fs.shape[0], -1)
        assert bool((rows == rows[:, :1]).all())            # a channel freezes as a whole
        for t, snap in enumerate(snaps):
            w_t = snap[i][0]
            done = (fs >= 0) & (fs <= t)
            assert torch.equal(w_t[done], rule.frozen_values[i][done])   # frozen values never move
        if rule._n_frozen[i] == rule.numels[i]:                         # fully frozen: bounds stopped too
            last = int(fs.max())
            assert all(torch.equal(s[i][1], snaps[last + 1][i][1]) for s in snaps[last + 1:])
            assert rule.modules[i].weight.grad is None
    assert any(m.channel_plan is not None for m in rule.modules)


def test_bound_grad_all_keeps_the_dense_backward():
    _, rule, _ = _train("channel", "all", steps=30)
    assert rule.frozen_count() > 0 and all(m.channel_plan is None for m in rule.modules)
    assert rule.backward_flops_skippable() > 0          # skippable in structure, but nothing skipped here


def test_invalid_granularity_and_bound_grad_are_clear_errors():
    model, _ = grid_layer(2, 2)
    with pytest.raises(ValueError, match="granularity"):
        LTSRule(model, None, 10, 0, granularity="row")
    with pytest.raises(ValueError, match="bound_grad"):
        LTSRule(model, None, 10, 0, bound_grad="some")
    with pytest.raises(ValueError, match="quantile"):
        LTSRule(model, None, 10, 0, granularity="channel", channel_quantile=0.0)
