"""Replay of the LTS rule and of oscillation freezing on recorded trajectories.

Hand-made trajectories use decay m = 0.5 and distance codes that are multiples of 1/128 Δ, so every EMA value
below is exact in binary floating point and written out by hand in the comments.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from hypothesis.extra.numpy import arrays

from lts_core.analysis import (ReplayIndex, agreement, ema_trace, freeze_accounting, oscillation_summary,
                               replay_freeze_steps, replay_oscillation, ticket_precision)
from lts_core.analysis.replay import osc_threshold_at
from lts_core.schedules import SCHEDULES


def _col(*cols):
    return np.array(cols, dtype=np.uint8).T.copy()


# ---- direct replay, one record per step ------------------------------------------------------------------

# 8 steps, records at every step. Codes 64 = 0.5 Δ, 32 = 0.25 Δ, 0 = 0. No layer information: Δ units.
STEPS8 = np.arange(8)
CODES8 = _col([64, 32, 32, 0, 0, 0, 0, 0], [64, 32, 32, 0, 0, 0, 0, 0])
LEVELS8 = _col([1, 1, 1, 1, 1, 1, 1, 1],      # A: never changes level
               [1, 1, 1, 2, 2, 2, 2, 2])      # B: changes level at step 3 → EMA reset to 1 Δ


def test_ema_step_by_step_reference_start_and_reset():
    d = ema_trace(STEPS8, LEVELS8, CODES8, decay=0.5)
    # A: step 0 discarded (nan); d1 = r1 = .25; d2 = .5·.25 + .5·.25 = .25; d3 = .125; then halves
    np.testing.assert_array_equal(d[:, 0], [np.nan, 0.25, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125])
    # B: same until step 2, reset to 1 at step 3, then halves (r = 0): .5, .25, .125, .0625
    np.testing.assert_array_equal(d[:, 1], [np.nan, 0.25, 0.25, 1.0, 0.5, 0.25, 0.125, 0.0625])
    np.testing.assert_array_equal(ema_trace(STEPS8, LEVELS8, CODES8, 0.5, weights=[1])[:, 0], d[:, 1])
    # a level change at step 1 does not reset (the reference sets d1 = r1 whatever the level did)
    c = ema_trace(STEPS8, _col([1, 2, 2, 2, 2, 2, 2, 2]), CODES8[:, :1], 0.5)
    np.testing.assert_array_equal(c[:, 0], d[:, 0])


def test_fixed_threshold_and_equality():
    # ratio 0.2: A first ≤ 0.2 at step 3 (0.125); B at step 6 (0.125)
    fs = replay_freeze_steps(STEPS8, LEVELS8, CODES8, "fixed", 0.2, 0, 8, 0.5)
    np.testing.assert_array_equal(fs, [3, 6])
    # ratio 0.25: d1 = 0.25 ≤ 0.25 (equality freezes) for both, at the first eligible step
    fs = replay_freeze_steps(STEPS8, LEVELS8, CODES8, "fixed", 0.25, 0, 8, 0.5)
    np.testing.assert_array_equal(fs, [1, 1])
    # ratio 0: never reaches 0 exactly in 8 steps
    np.testing.assert_array_equal(replay_freeze_steps(STEPS8, LEVELS8, CODES8, "fixed", 0.0, 0, 8, 0.5), [-1, -1])
    # ratio 0.4: both meet it at step 1; B's later reset cannot unfreeze it
    fs = replay_freeze_steps(STEPS8, LEVELS8, CODES8, "fixed", 0.4, 0, 8, 0.5)
    np.testing.assert_array_equal(fs, [1, 1])


def test_schedules_and_strict_warmup():
    # W = 2, T = 10, constant levels. Codes: 48 (0.375 Δ), 16 (0.125 Δ), 0. With constant r the EMA stays r.
    steps = np.arange(10)
    codes = _col([48] * 10, [16] * 10, [0] * 10)
    levels = _col([1] * 10, [2] * 10, [0] * 10)
    # linear ρ_t = (t-2)/8 from t = 3 (t > W): 0.375 first at t=5 (equality); 0.125 at t=3; 0 at t=3 too
    np.testing.assert_array_equal(replay_freeze_steps(steps, levels, codes, "linear", 1.0, 2, 10, 0.5), [5, 3, 3])
    # sine ρ_t = sin((t-2)/8·π/2): t=3 → 0.195, t=4 → 0.383: 0.375 at 4, 0.125 at 3, 0 at 3
    np.testing.assert_array_equal(replay_freeze_steps(steps, levels, codes, "sine", 1.0, 2, 10, 0.5), [4, 3, 3])
    # fixed 0.5: everybody meets it from step 1 but the warm-up holds them to step W + 1 = 3
    np.testing.assert_array_equal(replay_freeze_steps(steps, levels, codes, "fixed", 0.5, 2, 10, 0.5), [3, 3, 3])
    # the distance-0 weight freezes exactly at W + 1 for any warm-up (t > W), not before
    for W in (0, 1, 5, 8):
        for sched in SCHEDULES:
            fs = replay_freeze_steps(steps, levels, codes, sched, 0.1, W, 10, 0.5)
            assert fs[2] == W + 1
    # growth ratio multiplier: linear with ratio 0.5 → ρ_t = (t-2)/16: 0.125 at t = 4
    assert replay_freeze_steps(steps, levels, codes, "linear", 0.5, 2, 10, 0.5)[1] == 4
    # the reference's schedule names are the same schedules; an unknown name is an error
    np.testing.assert_array_equal(replay_freeze_steps(steps, levels, codes, "linear-growth", 1.0, 2, 10, 0.5),
                                  [5, 3, 3])
    with pytest.raises(ValueError, match="unknown schedule"):
        replay_freeze_steps(steps, levels, codes, "cosine", 1.0, 2, 10, 0.5)


def test_per_layer_thresholds_in_normalised_units():
    """With layer level counts the replay decides as the rule: d (normalised) ≤ fl32(1/(L−1)·ρ) per layer."""
    steps = np.arange(6)
    codes = _col([32] * 6, [32] * 6)           # 0.25 Δ in both layers
    levels = _col([1] * 6, [1] * 6)
    # a 2-bit layer (L = 4) and a 4-bit one (L = 16): the same distance in Δ freezes at the same ratio
    fs = replay_freeze_steps(steps, levels, codes, "fixed", 0.25, 0, 6, 0.5, layer_sizes=[1, 1],
                             layer_n_levels=[4, 16])
    np.testing.assert_array_equal(fs, [1, 1])
    fs = replay_freeze_steps(steps, levels, codes, "fixed", 0.2, 0, 6, 0.5, layer_sizes=[1, 1],
                             layer_n_levels=[4, 16])
    np.testing.assert_array_equal(fs, [-1, -1])
    # the EMA comes back in Δ units
    np.testing.assert_allclose(ema_trace(steps, levels, codes, 0.5, layer_sizes=[1, 1],
                                         layer_n_levels=[4, 16])[1:], 0.25, rtol=1e-6)
    # exact raw distances (normalised units) take precedence over the codes
    raw = np.full((6, 2), 0.05, dtype=np.float32)   # 0.15 Δ at L = 4, 0.75 Δ at L = 16
    fs = replay_freeze_steps(steps, levels, codes, "fixed", 0.2, 0, 6, 0.5, layer_sizes=[1, 1],
                             layer_n_levels=[4, 16], raw_dists=raw)
    np.testing.assert_array_equal(fs, [1, -1])


# ---- coarse records ---------------------------------------------------------------------------------------

def _expand_per_step(steps, levels, codes):
    """Per-step arrays equivalent to the records: between records the recorded distance holds and the level
    change (if any) happens at the record step."""
    lv, cd = [levels[0]], [codes[0]]
    for r in range(1, len(steps)):
        for s in range(steps[r - 1] + 1, steps[r] + 1):
            lv.append(levels[r] if s == steps[r] else levels[r - 1])
            cd.append(codes[r])
    return np.arange(steps[0], steps[-1] + 1), np.array(lv), np.array(cd)


def test_coarse_records_compound_decay():
    steps = np.array([0, 4, 8, 12])
    levels = _col([1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 2, 2])
    codes = _col([128, 128, 0, 0], [128, 128, 32, 32], [128, 32, 32, 32])
    d = ema_trace(steps, levels, codes, 0.5)
    # weight 0: record 0 discarded, d = 1 at step 4, then m**4 = 0.0625, then 0.0625**2
    np.testing.assert_array_equal(d[:, 0], [np.nan, 1.0, 0.0625, 0.00390625])
    # weight 1: reset at record 2 (level change), then (1 - 1/16)·0.25 + 1/16·1 = 0.296875
    np.testing.assert_array_equal(d[:, 1], [np.nan, 1.0, 1.0, 0.296875])
    # weight 2: its level changed between steps 0 and 4, after step 1 → the first EMA record resets too
    np.testing.assert_array_equal(d[:, 2], [np.nan, 1.0, 0.296875, 0.2529296875])
    ps, pl, pc = _expand_per_step(steps, levels, codes)
    dp = ema_trace(ps, pl, pc, 0.5)
    np.testing.assert_array_equal(dp[steps - steps[0]], d)
    # a first EMA record at step 1 never resets (the rule's d1 = r1)
    np.testing.assert_array_equal(ema_trace(np.array([0, 1, 5]), _col([1, 2, 2]), _col([128, 32, 32]), 0.5)[:, 0],
                                  [np.nan, 0.25, 0.25])


@settings(max_examples=30, deadline=None)
@given(hs.data())
def test_coarse_equals_per_step_random(data):
    R = data.draw(hs.integers(2, 5))
    N = data.draw(hs.integers(1, 6))
    gaps = data.draw(hs.lists(hs.integers(1, 3), min_size=R - 1, max_size=R - 1))
    steps = np.concatenate([[0], np.cumsum(gaps)])
    levels = data.draw(arrays(np.uint8, (R, N), elements=hs.integers(0, 3)))
    codes = data.draw(arrays(np.uint8, (R, N), elements=hs.integers(0, 255)))
    ps, pl, pc = _expand_per_step(steps, levels, codes)
    np.testing.assert_array_equal(ema_trace(ps, pl, pc, 0.5)[steps], ema_trace(steps, levels, codes, 0.5))


# ---- ReplayIndex against the direct replay ---------------------------------------------------------------

def _partition(data, N):
    cuts = sorted(data.draw(hs.lists(hs.integers(0, N), max_size=3)))
    edges = [0] + cuts + [N]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


@settings(max_examples=80, deadline=None)
@given(hs.data())
def test_index_matches_direct_replay(data):
    R = data.draw(hs.integers(1, 7))
    N = data.draw(hs.integers(1, 10))
    gaps = data.draw(hs.lists(hs.integers(1, 3), min_size=R - 1, max_size=R - 1))
    steps = data.draw(hs.integers(0, 2)) + np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)
    T = int(steps[-1]) + data.draw(hs.integers(1, 4))
    W = data.draw(hs.integers(0, T - 1))
    schedule = data.draw(hs.sampled_from(SCHEDULES))
    decay = data.draw(hs.sampled_from([0.0, 0.5, 0.9, 0.99]))
    B = data.draw(hs.sampled_from([4, 16, 1024]))
    levels = data.draw(arrays(np.uint8, (R, N), elements=hs.integers(0, 3)))
    codes = data.draw(arrays(np.uint8, (R, N),
                             elements=hs.sampled_from([0, 1, 8, 16, 32, 48, 64, 100, 128, 200, 255])))
    sizes = _partition(data, N)
    flops = data.draw(hs.lists(hs.integers(1, 100), min_size=len(sizes), max_size=len(sizes)))
    n_levels = data.draw(hs.lists(hs.sampled_from([2, 3, 4, 16]), min_size=len(sizes), max_size=len(sizes)))
    raw = data.draw(hs.one_of(hs.none(), arrays(np.float32, (R, N), elements=hs.floats(0, 1, width=32))))
    units = {"layer_sizes": sizes, "layer_n_levels": n_levels, "raw_dists": raw}
    idx = ReplayIndex.build(steps, levels, codes, sizes, flops, schedule, W, T, decay, device="cpu",
                            bins_per_unit=B, max_ratio=2.0, layer_n_levels=n_levels, raw_dists=raw)
    js = data.draw(hs.lists(hs.integers(0, idx.max_bin), min_size=1, max_size=4))
    E = max(T, int(steps[-1]) + 1)
    heat = idx.heatmap([j / B for j in js])
    sweep = idx.sweep()
    for row, j in enumerate(js):
        ratio = j / B
        fs = replay_freeze_steps(steps, levels, codes, schedule, ratio, W, T, decay, **units)
        res = idx.query(ratio)
        assert res.ratio == ratio
        frozen_at = (fs[None, :] >= 0) & (fs[None, :] <= steps[:, None])          # [R, N]
        np.testing.assert_allclose(res.frozen_fraction, frozen_at.mean(1), rtol=0, atol=1e-12)
        np.testing.assert_allclose(heat[row], res.frozen_fraction, rtol=0, atol=0)
        off = 0
        for li, n in enumerate(sizes):
            if n:
                np.testing.assert_allclose(res.layer_frozen_fraction[li], frozen_at[:, off:off + n].mean(1),
                                           atol=1e-12)
            off += n
        # ticket precision by brute force: level at the freeze record == final level
        frozen = fs >= 0
        assert res.n_frozen == frozen.sum()
        if frozen.any():
            rec = np.searchsorted(steps, fs[frozen])
            ok = levels[rec, np.flatnonzero(frozen)] == levels[-1, frozen]
            assert math.isclose(res.ticket_precision, ok.mean(), abs_tol=1e-12)
            assert math.isclose(ticket_precision(fs, steps, levels), ok.mean(), abs_tol=1e-12)
        else:
            assert math.isnan(res.ticket_precision)
        # whole-run figures: brute force over every optimizer step 0 … E-1
        per_step = np.array([((fs >= 0) & (fs <= t)).mean() for t in range(E)])
        assert math.isclose(res.updates_eliminated, per_step.mean(), abs_tol=1e-12)
        F = np.asarray(flops, dtype=float)
        fl = []
        for t in range(E):
            fr = []
            off = 0
            for n in sizes:
                fr.append(((fs[off:off + n] >= 0) & (fs[off:off + n] <= t)).mean() if n else 0.0)
                off += n
            fl.append((np.array(fr) * F).sum() / (2 * F.sum()))
        assert math.isclose(res.backward_flops_saved, np.mean(fl), abs_tol=1e-12)
        acc = freeze_accounting(fs, steps, sizes, flops, T)
        assert math.isclose(acc.updates_eliminated, res.updates_eliminated, abs_tol=1e-12)
        assert math.isclose(acc.backward_flops_saved, res.backward_flops_saved, abs_tol=1e-12)
        np.testing.assert_allclose(acc.frozen_fraction, res.frozen_fraction, atol=1e-12)
        assert math.isclose(sweep["updates_eliminated"][j], res.updates_eliminated, abs_tol=1e-12)
        assert math.isclose(sweep["backward_flops_saved"][j], res.backward_flops_saved, abs_tol=1e-12)


def test_index_snapping_and_range():
    idx = ReplayIndex.build(STEPS8, LEVELS8, CODES8, [1, 1], [10, 10], "fixed", 0, 8, 0.5, device="cpu")
    assert idx.snap(0.2) == round(0.2 * 1024) / 1024
    res = idx.query(0.3125)
    np.testing.assert_allclose(res.frozen_fraction, [0, 1, 1, 1, 1, 1, 1, 1])
    # B (layer 1) freezes at step 1 on level 1, but ends at level 2 → not a ticket; A is
    assert res.ticket_precision == 0.5
    np.testing.assert_array_equal(res.layer_ticket_precision, [1.0, 0.0])
    # updates eliminated: both frozen from step 1 on, 7 of 8 steps
    assert res.updates_eliminated == 7 / 8
    assert res.backward_flops_saved == 7 / 16
    assert math.isnan(res.updates_eliminated_all_params)  # the number of trainable parameters is unknown
    idx = ReplayIndex.build(STEPS8, LEVELS8, CODES8, [1, 1], [10, 10], "fixed", 0, 8, 0.5, device="cpu",
                            n_trainable=5)
    assert idx.query(0.3125).updates_eliminated_all_params == pytest.approx(7 / 8 * 2 / 5)
    assert idx.sweep()["updates_eliminated_all_params"][320] == pytest.approx(7 / 8 * 2 / 5)
    with pytest.raises(ValueError):
        idx.query(2.5)
    with pytest.raises(ValueError):
        idx.query(-0.1)


def test_build_from_run_object():
    run = SimpleNamespace(
        steps=STEPS8, levels=lambda: LEVELS8, dist_codes=lambda: CODES8,
        layers=[{"name": "a", "numel": 1, "flops": 10}, {"name": "b", "numel": 1, "flops": 30}],
        manifest={"total_steps": 8, "steps_per_epoch": 4, "rule": {"warmup_steps": 0}})
    idx = ReplayIndex.build(run, schedule="fixed", decay=0.5, device="cpu")
    res = idx.query(0.2)
    np.testing.assert_allclose(res.epochs, STEPS8 / 4)
    np.testing.assert_array_equal(res.frozen_fraction, [0, 0, 0, 0.5, 0.5, 0.5, 1, 1])
    assert idx.layer_names == ["a", "b"]
    np.testing.assert_array_equal(replay_freeze_steps(run, schedule="fixed", ratio=0.2, decay=0.5), [3, 6])
    with pytest.raises(ValueError):
        ReplayIndex.build(run, "fixed", 0, decay=0.5)


# ---- oscillation freezing -------------------------------------------------------------------------------

def test_oscillation_replay_hand_made():
    # 20 steps; w0 oscillates 0,1,0,1,…; w1 climbs 0,1,2,3 then stays; w2 never moves.
    T = 20
    steps = np.arange(T)
    w0 = [r % 2 for r in range(T)]
    w1 = [min(r, 3) for r in range(T)]
    levels = _col(w0, w1, [2] * T)
    # m = 0.5, constant threshold 0.5 from step 5 = 0.25·20. f: r1 0 (no previous direction), r2 .5, r3 .75,
    # r4 .875, r5 .9375 > .5 → w0 freezes at step 5 (not before: threshold 0 = no freezing before the start).
    # Level EMA of w0: 0 → .5 → .25 → .625 → .3125 → .65625 → round = 1.
    rep = replay_oscillation(steps, levels, T, decay=0.5, start_frac=0.25, thr_start=0.5, thr_end=0.5)
    np.testing.assert_array_equal(rep.freeze_steps, [5, -1, -1])
    np.testing.assert_array_equal(rep.frozen_level, [1, -1, -1])
    assert rep.freq[1] == 0 and rep.freq[2] == 0
    # default settings (m = 0.01, 0.1 → 0.01 cosine after 25%): the oscillating weight freezes after the
    # start, the monotone one never
    rep = replay_oscillation(steps, levels, T)
    assert rep.freeze_steps[0] >= 5 and rep.freeze_steps[1] == -1 and rep.freeze_steps[2] == -1
    assert osc_threshold_at(4, T) == 0.0 and osc_threshold_at(5, T) == pytest.approx(0.1)
    assert osc_threshold_at(T, T) == pytest.approx(0.01)
    # watch mask: unwatched weights never freeze
    rep = replay_oscillation(steps, levels, T, 0.5, 0.25, 0.5, 0.5, watch=[False, True, True])
    assert rep.freeze_steps[0] == -1
    # summary: w0 frozen from step 5 → 15 of 20 steps, one of three weights → 0.25 of updates
    res, _ = oscillation_summary(steps, levels, [3], [100], T, decay=0.5, start_frac=0.25, thr_start=0.5,
                                 thr_end=0.5)
    assert res.updates_eliminated == pytest.approx(15 / 60)
    assert res.backward_flops_saved == pytest.approx(15 / 120)
    # w0 is frozen onto level 1 (rounded level EMA) and its last recorded level is 19 % 2 = 1 → a ticket
    assert res.ticket_precision == 1.0 and res.n_frozen == 1
    # an 8-bit first layer holding w0 is not watched (max_bits = 4, as the live rule)
    res, rep = oscillation_summary(steps, levels, [1, 2], [100, 100], T, decay=0.5, start_frac=0.25,
                                   thr_start=0.5, thr_end=0.5, layer_bits=[8, 2])
    assert res.n_frozen == 0 and rep.freeze_steps[0] == -1


def test_agreement():
    pred = np.array([3, 5, -1, 7, -1])
    act = np.array([3, -1, 4, 9, -1])
    a = agreement(pred, act)
    # P = {0,1,3}, A = {0,2,3}, P∩A = {0,3}, P∪A = {0,1,2,3}
    assert a["jaccard"] == 0.5 and a["precision"] == 2 / 3 and a["recall"] == 2 / 3
    assert a["mean_abs_step_diff"] == 1.0      # |3-3|, |7-9| → mean 1
    assert a["exact_match"] == 2 / 5           # weight 0 and weight 4 (both never)
    assert a["exact_match_frozen"] == 0.5
    assert agreement([-1], [-1])["jaccard"] == 1.0


# ---- devices -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_identical():
    rng = np.random.default_rng(1)
    R, N = 30, 5000
    steps = np.arange(R) * 3
    levels = rng.integers(0, 4, size=(R, N)).astype(np.uint8)
    codes = rng.integers(0, 256, size=(R, N)).astype(np.uint8)
    for sched in SCHEDULES:
        a = replay_freeze_steps(steps, levels, codes, sched, 0.3, 10, 100, 0.9, device="cpu")
        b = replay_freeze_steps(steps, levels, codes, sched, 0.3, 10, 100, 0.9, device="cuda")
        np.testing.assert_array_equal(a, b)
        ic = ReplayIndex.build(steps, levels, codes, [N], [1], sched, 10, 100, 0.9, device="cpu")
        ig = ReplayIndex.build(steps, levels, codes, [N], [1], sched, 10, 100, 0.9, device="cuda")
        np.testing.assert_array_equal(ic.cum, ig.cum)
        np.testing.assert_array_equal(ic.tick_cum, ig.tick_cum)
    a = replay_oscillation(steps, levels, 100, device="cpu")
    b = replay_oscillation(steps, levels, 100, device="cuda")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ---- against the live rules: a run recorded at every step replays its own freeze steps ---------------------

from probe import probe as _probe  # noqa: E402


def _drive(rule, layer, seq):
    """Levels (uint8), distance codes (uint8 grid) and exact raw distances (float32, normalised) per step."""
    lv, cd, raw = [], [], []
    rule.record_codes = True
    for row in seq:
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(row, dtype=torch.float32)[:, None])
        rule.step()
        lv.append(rule.last_level[0].flatten().numpy().astype(np.uint8))
        cd.append(rule.last_dist_code[0].flatten().numpy().astype(np.uint8))
        raw.append(rule.last_raw[0].flatten().numpy())
    return np.stack(lv), np.stack(cd), np.stack(raw)


@pytest.mark.parametrize("schedule,ratio", [("fixed", 0.25), ("linear", 1.0), ("sine", 0.75)])
def test_every_step_record_replays_live_lts_rule(schedule, ratio):
    from lts_core.rules import LTSRule
    rng = np.random.default_rng(7)
    T, n, W = 60, 400, 10
    # random walks in weight units (grid 0..3, Δ = 1) that slow down over time, so weights settle
    scale = np.linspace(0.4, 0.01, T)[:, None]
    seq = np.clip(1.5 + np.cumsum(rng.normal(size=(T, n)) * scale, axis=0), -0.3, 3.3)
    model, layer = _probe(n)
    rule = LTSRule(model, None, total_steps=T, warmup_steps=W, schedule=schedule, ratio=ratio, decay=0.9)
    levels, codes, raw = _drive(rule, layer, seq)
    live = rule.freeze_steps_flat().numpy()
    assert (live >= 0).sum() > 0
    steps = np.arange(T)
    exact = {"layer_sizes": [n], "layer_n_levels": [4], "raw_dists": raw}
    np.testing.assert_array_equal(replay_freeze_steps(steps, levels, codes, schedule, ratio, W, T, 0.9, **exact),
                                  live)
    # the replayed EMA is the rule's, in Δ units, bit for bit
    np.testing.assert_array_equal(ema_trace(steps, levels, codes, 0.9, **exact)[-1], rule.ema_steps(0).flatten())
    # from the 1/128 Δ codes alone the replay is close but not exact (the rule decides on exact distances)
    coarse = replay_freeze_steps(steps, levels, codes, schedule, ratio, W, T, 0.9, layer_sizes=[n],
                                 layer_n_levels=[4])
    assert agreement(coarse, live)["exact_match"] > 0.8
    idx = ReplayIndex.build(steps, levels, codes, [n], [1], schedule, W, T, 0.9, device="cpu",
                            layer_n_levels=[4], raw_dists=raw)
    res = idx.query(ratio)
    np.testing.assert_allclose(res.frozen_fraction,
                               ((live[None] >= 0) & (live[None] <= steps[:, None])).mean(1), rtol=0, atol=1e-12)
    assert math.isclose(res.updates_eliminated, rule.updates_eliminated(), rel_tol=1e-12)


def test_every_step_record_replays_live_oscillation_rule():
    from lts_core.rules import OscillationRule
    rng = np.random.default_rng(3)
    T, n = 80, 300
    base = rng.integers(0, 3, size=n) + 0.5          # sit near a level boundary → many oscillations
    seq = base + rng.normal(size=(T, n)) * rng.uniform(0.05, 0.6, size=n)
    model, layer = _probe(n)
    rule = OscillationRule(model, None, total_steps=T, decay=0.1, start_frac=0.25, thr_start=0.3, thr_end=0.1)
    levels, _, _ = _drive(rule, layer, seq)
    live = rule.freeze_steps_flat().numpy()
    assert (live >= 0).any()
    rep = replay_oscillation(np.arange(T), levels, T, decay=0.1, start_frac=0.25, thr_start=0.3, thr_end=0.1)
    np.testing.assert_array_equal(rep.freeze_steps, live)
    np.testing.assert_array_equal(rep.freq, rule.freq[0].flatten().numpy())


@settings(max_examples=60, deadline=None)
@given(hs.data())
def test_grid_bins_equal_searchsorted(data):
    from lts_core.analysis.replay import grid_bins
    B = data.draw(hs.sampled_from([1, 3, 10, 128, 1000, 1024]))
    J = int(data.draw(hs.sampled_from([0.5, 1.0, 2.0, 3.7])) * B)
    g = data.draw(hs.one_of(hs.just(0.0), hs.just(1.0), hs.floats(1e-6, 1.0)))
    scale = data.draw(hs.sampled_from([1.0, 1 / 3, 1 / 15, 1 / 255]))
    thr32 = (scale * ((np.arange(J + 1, dtype=np.float64) / B) * g)).astype(np.float32)
    d = np.concatenate([
        np.asarray(data.draw(hs.lists(hs.floats(0, 2, width=32), min_size=1, max_size=50)), dtype=np.float32),
        thr32, np.nextafter(thr32, np.float32(np.inf)), np.nextafter(thr32, np.float32(-np.inf)).clip(0)])
    np.testing.assert_array_equal(grid_bins(d, g, B, J, scale=scale), np.searchsorted(thr32, d))


def test_per_weight_units_are_built_only_when_used():
    """A streamed replay needs only the layers' level counts: the per-weight unit tensors (800 MB at 100M
    weights) are built on first use, with the values fl32(1/(L−1)) and L−1 per weight."""
    from lts_core.analysis.replay import _units
    u = _units([3, 2], [4, 2], 5, torch.device("cpu"))
    assert u.n_levels == [4, 2] and u._w is None
    assert torch.equal(u.step_w, torch.tensor([1 / 3] * 3 + [1.0] * 2, dtype=torch.float32))
    assert torch.equal(u.span_w, torch.tensor([3.0] * 3 + [1.0] * 2))
    assert _units([3, 2], None, 5, torch.device("cpu")).step_w is None
