"""Distributions over training (lts_core.analysis.distributions): streamed per-record histograms checked against
counts computed directly on the full [records, weights] arrays of small runs, plus the recorder's `side` array."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from lts_core import Recorder, quantize_model
from lts_core.analysis import ema_trace, replay_freeze_steps
from lts_core.analysis.distributions import (CODE_BINS, SCALE, common_weight_edges, record_distributions,
                                             freeze_record_counts, rebin_codes, weight_axis, weight_histogram)
from lts_core.store import RunWriter, open_run

LAYERS = [{"name": "fc1", "shape": [6, 5], "n_levels": 4, "bits": 2, "flops": 60, "kind": "liq"},
          {"name": "fc2", "shape": [9], "n_levels": 8, "bits": 3, "flops": 18, "kind": "lsq"}]
N1, N = 30, 39


def synthetic(tmp_path, run_id="syn", side=True, R=11, chunks=(4, 4, 3), seed=0):
    """A run with consistent positions: level, distance code and side derived from random positions."""
    rng = np.random.default_rng(seed)
    states = ["ema", "side"] if side else ["ema"]
    w = RunWriter.create(tmp_path, run_id, {"layers": LAYERS, "steps_per_epoch": 5, "total_steps": 5 * R,
                                            "record_every": 5, "state_arrays": states,
                                            "rule": {"name": "lts", "settings": {"schedule": "fixed", "ratio": 0.2,
                                                                                 "warmup_steps": 10}}})
    full = {k: [] for k in ("level", "dist", "ema", "side", "pos")}
    r0 = 0
    for n_rec in chunks:
        ch = {k: [] for k in ("step", "level", "dist", "ema", "side", "bounds")}
        for r in range(r0, r0 + n_rec):
            L = np.r_[np.full(N1, 4), np.full(N - N1, 8)]
            pos = rng.uniform(-0.9, L - 1 + 0.9)          # some outside the range
            pos[:3] = [0.0, 1.25, 2.5]                      # exactly on a level, and exact half steps
            lev = np.clip(np.round(pos), 0, L - 1)
            code = np.clip(np.round(np.abs(pos - lev) * SCALE), 0, 255)
            pos = lev + np.where(pos >= lev, 1, -1) * code / SCALE   # positions on the code grid
            full["pos"].append(pos)
            ch["step"].append(5 * r)
            ch["level"].append(lev.astype(np.uint8))
            ch["dist"].append(code.astype(np.uint8))
            ch["ema"].append(rng.integers(0, 200, N).astype(np.uint8))
            ch["side"].append((pos >= lev).astype(np.uint8))
            ch["bounds"].append(np.array([[-1.0 - 0.01 * r, 1.0 + 0.02 * r], [0.1 + 0.001 * r, np.nan]], np.float32))
        arrays = {k: np.stack(v) for k, v in ch.items() if k != "side" or side}
        w.append_chunk(arrays)
        for k in ("level", "dist", "ema", "side"):
            full[k] += ch[k]
        r0 += n_rec
    fs = rng.choice([-1, 3, 10, 12, 24, 33], size=N).astype(np.int64)
    w.write_summary("freeze_step", fs)
    w.set_status("complete")
    return open_run(tmp_path / run_id), {k: np.stack(v) for k, v in full.items()}, fs


def classes(levels, steps, fs):
    """Direct per-record classes: 0 active, 1 frozen at the level it froze on, 2 frozen but moved."""
    R = len(steps)
    at = np.maximum(np.searchsorted(steps, fs, side="right") - 1, 0)
    froze_on = levels[at, np.arange(levels.shape[1])]
    out = np.zeros(levels.shape, np.int64)
    for r in range(R):
        frozen = (fs >= 0) & (fs <= steps[r])
        out[r] = np.where(frozen, np.where(levels[r] == froze_on, 1, 2), 0)
    return out


@pytest.mark.parametrize("layer", [0, "fc2", None])
def test_streamed_counts_equal_direct_counts(tmp_path, layer):
    run, full, fs_all = synthetic(tmp_path)
    sl = run.layer_slice(layer)
    fs = fs_all[sl]
    d = record_distributions(run, layer=layer, freeze_steps=fs)
    steps = run.steps
    lev, code, ema = (full[k][:, sl].astype(np.int64) for k in ("level", "dist", "ema"))
    cls = classes(lev, steps, fs)
    R = len(steps)
    for r in range(R):
        for c in range(3):
            np.testing.assert_array_equal(d.dist[r, c], np.bincount(code[r][cls[r] == c], minlength=CODE_BINS))
            np.testing.assert_array_equal(d.ema[r, c], np.bincount(ema[r][cls[r] == c], minlength=CODE_BINS))
    assert d.ema_source == "recorded"
    np.testing.assert_array_equal(d.frozen_by, [((fs >= 0) & (fs <= s)).sum() for s in steps])
    np.testing.assert_array_equal(d.newly_frozen, freeze_record_counts(fs, steps))
    assert d.dist.sum() == R * (sl.stop - sl.start)
    if layer is None:
        assert d.positions is None and d.occupancy is None
        return
    L = run.layers[run.layer_index(layer)]["n_levels"]
    for r in range(R):
        np.testing.assert_array_equal(d.occupancy[r], np.bincount(lev[r], minlength=L))
    # exact positions (side recorded): every weight in the bin of its position, in its class
    assert d.signed and d.pos_res == 1
    pos_code = np.round(full["pos"][:, sl] * SCALE).astype(np.int64)
    for r in range(R):
        for c in range(3):
            want = np.bincount(pos_code[r][cls[r] == c] - d.pos_first, minlength=d.positions.shape[-1])
            np.testing.assert_array_equal(d.positions[r, c], want)
    # the LTS thresholds of the run's own settings, -1 during warm-up (freezing strictly after it: t > W)
    np.testing.assert_allclose(d.thresholds, np.where(steps <= 10, -1.0, 0.2))


def test_folded_positions_without_side(tmp_path):
    run, full, fs = synthetic(tmp_path, side=False)
    d = record_distributions(run, layer="fc1", freeze_steps=fs[:N1])
    assert not d.signed
    lev, code = full["level"][:, :N1].astype(np.int64), full["dist"][:, :N1].astype(np.int64)
    edges = d.position_edges()
    centers = (edges[:-1] + edges[1:]) / 2
    for r in range(run.n_records):
        tot = d.positions[r].sum(0)
        assert tot.sum() == pytest.approx(N1)
        # mass below level 0 / above the top level: every weight outside the range, half of those on a boundary
        # level within ½ Δ of it
        below = tot[centers < 0].sum()
        out_low = ((lev[r] == 0) & (code[r] > 64)).sum()
        in_low = ((lev[r] == 0) & (code[r] > 0) & (code[r] <= 64)).sum()
        assert below == pytest.approx(out_low + in_low / 2)
        # folding keeps each weight's distance: mean |p - nearest level| equals the mean distance
        k = np.clip(np.round(centers), 0, 3)
        assert (tot * np.abs(centers - k)).sum() / N1 == pytest.approx(code[r].mean() / SCALE, abs=1e-9)


def test_replayed_ema_and_freezing_match_the_replay(tmp_path):
    run, full, _ = synthetic(tmp_path)
    settings = dict(schedule="linear", ratio=1.0, warmup_steps=15, decay=0.9)
    d = record_distributions(run, layer=None, replay=settings)
    fs = replay_freeze_steps(run, **settings)
    np.testing.assert_array_equal(d.newly_frozen, freeze_record_counts(fs, run.steps))
    assert d.ema_source == "replayed"
    # the EMA histogram counts the replay's EMA (Δ units) on the 1/128 Δ grid; no EMA yet at the step-0 record
    e = ema_trace(run.steps, run.levels(), run.dist_codes(), settings["decay"],
                  layer_sizes=[lay["numel"] for lay in run.layers], layer_n_levels=[4, 8])
    for r in range(run.n_records):
        if np.isnan(e[r]).all():
            assert d.ema[r].sum() == 0 and run.steps[r] == 0
            continue
        want = np.bincount(np.clip(np.rint(e[r] * SCALE), 0, 255).astype(int), minlength=CODE_BINS)
        np.testing.assert_array_equal(d.ema[r].sum(0), want)
    d2 = record_distributions(run, layer=None, freeze_steps=fs)   # the same freeze steps given explicitly
    np.testing.assert_array_equal(d.dist, d2.dist)


def test_weight_histogram_conserves_and_aligns(tmp_path):
    run, full, fs = synthetic(tmp_path)
    d = record_distributions(run, layer="fc1", freeze_steps=fs[:N1])
    r = 7
    w0, dw = weight_axis(d.kind, d.bits, d.n_levels, d.bounds[r])
    assert w0 == pytest.approx(-1.07) and dw == pytest.approx((1.14 + 1.07) / 3)
    counts = d.positions[r].sum(0)
    pe = d.position_edges()
    lo, hi = w0 + pe[0] * dw, w0 + pe[-1] * dw
    h = weight_histogram(counts, pe, w0, dw, common_weight_edges([(lo, hi)], 64))
    assert h.sum() == pytest.approx(N1)
    # bins aligned with the position grid give the position counts exactly
    aligned = w0 + pe[::8] * dw
    h8 = weight_histogram(counts, pe, w0, dw, aligned)
    np.testing.assert_allclose(h8, np.add.reduceat(counts, np.arange(0, len(counts), 8))[:len(h8)])
    # weights on the grid: the mass within ½ code of level value 1 is the number of weights at position 1.0
    k1 = w0 + 1.0 * dw
    at1 = weight_histogram(counts, pe, w0, dw, [k1 - dw / 256, k1 + dw / 256])
    assert at1[0] == pytest.approx((np.round(full["pos"][r, :N1] * SCALE) == SCALE).sum())
    # lsq: level 0 is the most negative value
    w0, dw = weight_axis("lsq", 3, 8, (0.1, np.nan))
    assert (w0, dw) == (pytest.approx(-0.4), pytest.approx(0.1))


def test_rebin_codes():
    counts = np.arange(CODE_BINS)
    out, edges = rebin_codes(counts, 8)
    assert out.shape == (10,) and out.sum() == counts.sum()
    assert out[0] == sum(range(8)) and out[-1] == sum(range(65, 256))
    assert edges[0] == 0 and edges[-1] == pytest.approx(64.5 / SCALE)


def _random_run(tmp_path, run_id, R, n, seed=1):
    w = RunWriter.create(tmp_path, run_id, {"layers": [{"name": "fc", "shape": [n], "n_levels": 4, "bits": 2,
                                                        "kind": "liq"}],
                                            "steps_per_epoch": 1, "total_steps": R, "state_arrays": ["ema", "side"]})
    rng = np.random.default_rng(seed)
    for c in range(0, R, 4):
        w.append_chunk({"step": np.arange(c, c + 4), "level": rng.integers(0, 4, (4, n), dtype=np.uint8),
                        "dist": rng.integers(0, 65, (4, n), dtype=np.uint8),
                        "ema": rng.integers(0, 255, (4, n), dtype=np.uint8),
                        "side": rng.integers(0, 2, (4, n), dtype=np.uint8),
                        "bounds": np.tile(np.float32([[-1, 1]]), (4, 1, 1))})
    return open_run(tmp_path / run_id)


def test_memory_does_not_grow_with_records(tmp_path):
    """One streamed pass: peak memory is O(weights + records × bins), the same for 8 or 64 records."""
    n = 100_000
    peaks = {}
    for R in (8, 64):
        run = _random_run(tmp_path, f"mem{R}", R, n)
        fs = np.random.default_rng(2).integers(-1, R, n)
        tracemalloc.start()
        d = record_distributions(run, layer=0, freeze_steps=fs)
        peaks[R] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert d.dist.sum() == R * n
    # each extra record adds only its binned counts (≈ 34 kB: 3 classes × (895 position + 2 × 256 code) bins),
    # not its 4 × 100 kB of stored arrays
    per_record = (peaks[64] - peaks[8]) / (64 - 8)
    assert per_record < 40_000, peaks


def test_recorder_side_array_is_the_sign_of_position_minus_level(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                           bits=2, first_last_bits=None, example_input=x[:2])
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "weight_quantizer")]
    rec = Recorder.create(tmp_path, model, {}, every=1, steps_per_epoch=1, total_steps=1, run_id="side",
                          layers=layers, record_side=True)
    rec.step()
    rec.finish()
    run = open_run(tmp_path / "side")
    assert "side" in run.state_arrays
    side = run.state("side")[0]
    want = []
    for _, m in layers:
        pos = m.weight_quantizer.position(m.weight.detach()).reshape(-1)
        lev = torch.clamp(torch.round(pos), 0, m.weight_quantizer.n_levels - 1)
        want.append((pos >= lev).numpy())
    np.testing.assert_array_equal(side, np.concatenate(want).astype(np.uint8))
    assert 0 < side.mean() < 1
