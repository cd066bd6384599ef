"""Quantizers on known values and property tests for 1–8 bits."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lts_core.quantizers import (LearnedIntervalQuantizer, LSQQuantizer, make_weight_quantizer, round_ste)


def liq(bits, lower, upper, **kw):
    q = LearnedIntervalQuantizer(bits=bits, **kw)
    with torch.no_grad():
        q.lower.fill_(lower)
        q.upper.fill_(upper)
        q.initialized.fill_(True)
    return q


def test_liq_known_values_2bit():
    # interval [0, 3], 4 levels at 0,1,2,3: position == weight value, Δ = 1 weight unit
    q = liq(2, 0.0, 3.0)
    w = torch.tensor([-0.7, 0.2, 0.5, 1.4, 2.75, 3.0, 4.2])
    level, dist = q.measure(w)
    assert level.tolist() == [0, 0, 0, 1, 3, 3, 3]  # round-half-to-even at 0.5
    assert torch.allclose(dist, torch.tensor([0.7, 0.2, 0.5, 0.4, 0.25, 0.0, 1.2]), atol=1e-6)
    assert torch.allclose(q(w), torch.tensor([0.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0]))


def test_liq_unit_output_and_init():
    q = liq(2, -1.5, 1.5, output="unit")
    out = q(torch.tensor([-2.0, -0.6, 0.4, 9.0]))
    assert torch.allclose(out, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    w = torch.randn(1000)
    q2 = LearnedIntervalQuantizer(bits=3)
    q2.init_from(w)
    assert math.isclose(q2.upper.item(), 3 * float(w.std()), rel_tol=1e-6)
    assert math.isclose(q2.lower.item(), -3 * float(w.std()), rel_tol=1e-6)


def test_binary_and_ternary():
    b = make_weight_quantizer("binary")
    assert b.n_levels == 2 and b.kind == "binary"
    t = make_weight_quantizer("ternary")
    with torch.no_grad():
        t.upper.fill_(0.6)
    t.initialized.fill_(True)
    assert t.n_levels == 3 and t.kind == "ternary"
    out = t(torch.tensor([-0.5, -0.1, 0.2, 0.45]))
    assert torch.allclose(out, torch.tensor([-0.6, 0.0, 0.0, 0.6]))


def test_lsq_known_values():
    q = LSQQuantizer(bits=2)  # integer levels -2..1
    with torch.no_grad():
        q.step.fill_(0.5)
    q.initialized.fill_(True)
    w = torch.tensor([-2.0, -0.6, 0.1, 0.3, 5.0])
    assert torch.allclose(q(w), torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5]))
    level, dist = q.measure(w)
    assert level.tolist() == [0, 1, 2, 3, 3]
    assert torch.allclose(dist, torch.tensor([2.0, 0.2, 0.2, 0.4, 9.0]), atol=1e-6)
    assert torch.allclose(q.level_value(level), q(w))


def test_ste_gradient_passes_through_round():
    x = torch.tensor([0.3, 1.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    q = liq(2, -1.0, 1.0)
    w = torch.tensor([0.1, -0.4], requires_grad=True)
    q(w).sum().backward()
    assert torch.all(w.grad != 0)
    assert q.upper.grad is not None and q.lower.grad is not None


def test_invalid_bits():
    for bad in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            LearnedIntervalQuantizer(bits=bad)
    with pytest.raises(ValueError, match="LSQ"):
        LSQQuantizer(bits=1)
    with pytest.raises(ValueError, match="unknown quantizer"):
        make_weight_quantizer("nope")


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), seed=st.integers(0, 10_000), method=st.sampled_from(["liq", "lsq"]))
def test_properties_all_bits(bits, seed, method):
    if method == "lsq" and bits == 1:
        return
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(257, generator=g)
    q = make_weight_quantizer(method, bits)
    q.init_from(w)
    level, dist = q.measure(w)
    assert level.min() >= 0 and level.max() <= q.n_levels - 1
    pos = q.position(w)
    inside = (pos >= 0) & (pos <= q.n_levels - 1)
    assert torch.all(dist[inside] <= 0.5 + 1e-5) and torch.all(dist >= 0)
    # de-quantised values lie on the grid of the levels, and match the measured level
    out = q(w).detach()
    assert torch.allclose(out, q.level_value(level), atol=1e-5)
    grid = q.level_value(torch.arange(q.n_levels))
    assert torch.all(torch.isclose(out[:, None], grid[None, :], atol=1e-5).any(dim=1))


def test_lsq_measure_takes_the_forward_level_at_a_tie():
    """w/s just above 6.5 (float32) rounds to 7 in the forward pass; w/s − Qn = 134.5000005 is 134.5 in float32,
    which round() takes to 134. The measurement must report the forward's level 135 (found by Hypothesis,
    8 bits, seed 551)."""
    q = make_weight_quantizer("lsq", 8)
    q.init_from(torch.ones(4))
    q.step.data.fill_(1.0)
    w = torch.tensor([torch.nextafter(torch.tensor(6.5), torch.tensor(7.0)).item(), 6.5, -3.5, 200.0])
    assert float(w[0] - q.qn) == 134.5  # the tie that adding Qn creates
    level, dist = q.measure(w)
    forward_level = torch.round(q(w).detach() / q.step.detach()) - q.qn
    assert level.tolist() == forward_level.to(torch.int64).tolist() == [135, 134, 124, 255]
    assert torch.allclose(dist[:3], torch.tensor([0.5, 0.5, 0.5]))
    lev_f, _ = q.measure_code(w)
    assert lev_f.to(torch.int64).tolist() == [135, 134, 124, 255]


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000), method=st.sampled_from(["liq", "lsq", "ternary"]))
def test_measure_code_equals_encoded_measure(bits, seed, method):
    """The rules' hot path gives exactly the level and uint8 distance code the recorder would store."""
    from lts_core.distance import encode_distance
    w = torch.randn(513, generator=torch.Generator().manual_seed(seed)) * 2
    q = make_weight_quantizer(method, bits)
    q.init_from(w[:100])  # part of w lies outside the interval: distances above 0.5 and saturated codes
    level, dist = q.measure(w)
    level_f, code_f = q.measure_code(w)
    assert torch.equal(level_f.to(torch.int64), level)
    assert torch.equal(code_f.to(torch.uint8), encode_distance(dist))


@pytest.mark.parametrize("kw", [{"bits": 2}, {"bits": 3, "symmetric": True}, {"bits": 2, "n_levels": 3, "symmetric": True}])
def test_measure_code_reuses_forward_only_while_nothing_changed(kw):
    """With remember_forward, measure_code reuses the forward's position and level: same bits as a fresh
    measurement, and never stale after the weight or a bound changed in place."""
    torch.manual_seed(0)
    q = LearnedIntervalQuantizer(**kw)
    fresh = LearnedIntervalQuantizer(**kw)
    w = torch.nn.Parameter(torch.randn(64, 33))
    q.init_from(w * 0.4)  # many weights beyond the bounds: distances > 0.5
    fresh.load_state_dict(q.state_dict())
    q.remember_forward = True

    def same_as_fresh():
        fresh.load_state_dict(q.state_dict())
        (lv, cd), (lv0, cd0) = q.measure_code(w), fresh.measure_code(w)
        assert torch.equal(lv, lv0) and torch.equal(cd, cd0)
        return lv, cd

    q(w).sum().backward()
    assert q._seen is not None
    lv, cd = same_as_fresh()
    assert lv is q._seen[2]  # the forward's level tensor was reused, not recomputed
    assert cd.max() > 64  # out-of-range weights were measured too

    opt = torch.optim.SGD([w, *q.parameters()], lr=0.5)
    opt.step()  # weights and bounds move in place: the remembered forward is stale now
    lv2, cd2 = same_as_fresh()
    assert lv2 is not q._seen[2]
    assert not torch.equal(cd2, cd)
    q(w)
    with torch.no_grad():
        q.upper.mul_(1.5)  # only a bound changes
    lv3, _ = same_as_fresh()
    assert lv3 is not q._seen[2]
    w.data = w.data * 1.1  # storage replaced, not modified in place
    q(w)
    w.data = torch.randn_like(w)
    same_as_fresh()


def test_remember_forward_is_off_unless_asked():
    q = LearnedIntervalQuantizer(bits=2)
    w = torch.randn(10, 10)
    q(w)
    assert q._seen is None
