"""Streamed replays (lts_core.analysis.replay_stream) equal the in-memory ones bit for bit: the replay index, the
direct LTS replay and oscillation freezing, on stored runs with mixed level counts, exact raw distances or
codes, records starting at step 0 or later, any chunking, blocking and executor; and their cached versions."""
import numpy as np
import pytest

from lts_core.analysis import (ReplayIndex, cached_oscillation_summary, cached_replay_index, oscillation_summary,
                               replay_freeze_steps)
from lts_core.analysis import cache
from lts_core.analysis.replay_stream import FreezeStepsPass, IndexPass, OscPass, ema_start
from lts_core.analysis.settle import arrays_from_run
from lts_core.analysis.stream import RunSource, run_passes, serial
from lts_core.store import RunWriter, open_run
from test_stream import SIZES, _process_map, trajectories

LEVELS = {"uniform": [4, 4, 4, 4, 4], "mixed": [2, 4, 3, 8, 2]}
BITS = {"uniform": [2, 2, 2, 2, 2], "mixed": [1, 2, 2, 3, 8]}


def in_range(lv, n_levels):
    """Levels clipped to each layer's range (the store refuses a level above its layer's n_levels)."""
    return np.minimum(lv, np.repeat(np.array(LEVELS[n_levels]) - 1, SIZES).astype(np.uint8))


def make_run(folder, n_levels="mixed", raw=False, first_step=0, gap=3, R=30, chunk=7, seed=0):
    lv, dist, _ = trajectories(R=R, p_move=0.25, seed=seed)
    lv = in_range(lv, n_levels)
    rng = np.random.default_rng(seed)
    raw_d = (rng.random(lv.shape) * 0.3).astype(np.float32)
    layers = [{"name": f"l{i}", "shape": [n], "numel": n, "n_levels": L, "bits": b, "flops": 10 * (i + 1)}
              for i, (n, L, b) in enumerate(zip(SIZES, LEVELS[n_levels], BITS[n_levels]))]
    steps = first_step + np.arange(R) * gap
    w = RunWriter.create(folder, "r", {"layers": layers, "steps_per_epoch": gap, "total_steps": int(steps[-1]) + 2,
                                       "warmup_steps": 9})
    for a in range(0, R, chunk):
        arrays = {"step": steps[a:a + chunk], "level": lv[a:a + chunk], "dist": dist[a:a + chunk],
                  "bounds": np.zeros((len(lv[a:a + chunk]), len(SIZES), 2), np.float32)}
        if raw:
            arrays["raw_dist"] = raw_d[a:a + chunk]
        w.append_chunk(arrays)
    return open_run(folder / "r")


CASES = [("uniform", False, 0), ("mixed", False, 1), ("mixed", True, 0), ("uniform", True, 5)]


@pytest.mark.parametrize("n_levels,raw,first_step", CASES)
def test_index_streamed_equals_in_memory(tmp_path, n_levels, raw, first_step):
    run = make_run(tmp_path, n_levels, raw, first_step)
    arr = arrays_from_run(run)
    assert (arr.raw_dists is not None) == raw
    for schedule, W, decay in (("linear", 9, 0.9), ("fixed", 0, 0.5), ("sine", 40, 0.99)):
        ref = ReplayIndex.build(arr, schedule=schedule, warmup_steps=W, decay=decay)
        got = ReplayIndex.build(run, schedule=schedule, warmup_steps=W, decay=decay)
        np.testing.assert_array_equal(got.cum, ref.cum)
        np.testing.assert_array_equal(got.tick_cum, ref.tick_cum)
        assert got.exact_distances == ref.exact_distances == raw
        p = IndexPass(arr.steps, [max(L, 2) for L in arr.layer_n_levels], schedule, W, arr.total_steps, decay,
                      1024, 2048, raw)
        for kw in ({"executor": serial, "task_cols": 101, "sub_cols": 13}, {"executor": _process_map}):
            (tables,) = run_passes(RunSource(run), [p], **kw)
            np.testing.assert_array_equal(tables[0], ref.cum)
            np.testing.assert_array_equal(tables[1], ref.tick_cum)
        for ratio in (0.0, 0.25, 1.0, 2.0):   # and the index answers what the direct replay does
            fs = replay_freeze_steps(arr.steps, arr.levels, arr.dist_codes, schedule, ratio, W, arr.total_steps,
                                     decay, layer_sizes=SIZES, layer_n_levels=arr.layer_n_levels,
                                     raw_dists=arr.raw_dists)
            assert got.query(ratio).n_frozen == int((fs >= 0).sum())


@pytest.mark.parametrize("n_levels,raw,first_step", CASES)
def test_direct_replay_and_oscillation_streamed_equal_in_memory(tmp_path, n_levels, raw, first_step):
    run = make_run(tmp_path, n_levels, raw, first_step, seed=2)
    arr = arrays_from_run(run)
    for schedule, ratio, W in (("linear", 1.0, 9), ("fixed", 0.3, 0), ("sine", 0.7, 30)):
        ref = replay_freeze_steps(arr.steps, arr.levels, arr.dist_codes, schedule, ratio, W, arr.total_steps, 0.9,
                                  layer_sizes=SIZES, layer_n_levels=arr.layer_n_levels, raw_dists=arr.raw_dists)
        np.testing.assert_array_equal(replay_freeze_steps(run, schedule=schedule, ratio=ratio, warmup_steps=W,
                                                          decay=0.9), ref)
        p = FreezeStepsPass(arr.steps, [max(L, 2) for L in arr.layer_n_levels], schedule, ratio, W, arr.total_steps,
                            0.9, raw)
        (fs,) = run_passes(RunSource(run), [p], serial, task_cols=77, sub_cols=9)
        np.testing.assert_array_equal(fs, ref)
    ra, pa = oscillation_summary(arr.steps, arr.levels, SIZES, arr.layer_flops, arr.total_steps, decay=0.3,
                                 steps_per_epoch=arr.steps_per_epoch, layer_bits=arr.layer_bits)
    rb, pb = oscillation_summary(run, decay=0.3)
    assert (pa.freeze_steps >= 0).sum() > 20
    for name in ("freeze_steps", "frozen_level", "freq"):
        np.testing.assert_array_equal(getattr(pa, name), getattr(pb, name))
    for name in ("frozen_fraction", "layer_frozen_fraction", "layer_ticket_precision"):
        np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name))
    for name in ("updates_eliminated", "backward_flops_saved", "ticket_precision", "n_frozen",
                 "n_frozen_correct"):
        assert getattr(ra, name) == getattr(rb, name), name
    watch = [b <= 4 for b in arr.layer_bits]
    (o,) = run_passes(RunSource(run), [OscPass(arr.steps, arr.total_steps, 0.3, 0.25, 0.1, 0.01, watch)], serial,
                      task_cols=61, sub_cols=7)
    np.testing.assert_array_equal(o["freeze_steps"], pa.freeze_steps)
    # the accounting alone (what the cache keeps): the same tables from the tasks' own scratch arrays
    (t,) = run_passes(RunSource(run), [OscPass(arr.steps, arr.total_steps, 0.3, 0.25, 0.1, 0.01, watch,
                                               per_weight=False)], serial, task_cols=61, sub_cols=7)
    assert t["freeze_steps"] is None and t["frozen_level"] is None and t["freq"] is None
    for name in ("frozen_by_record", "sum_freeze_steps", "n_frozen", "n_correct"):
        np.testing.assert_array_equal(t[name], o[name])
    rc, pc = oscillation_summary(run, decay=0.3, per_weight=False)
    assert pc is None
    for name in ("frozen_fraction", "layer_frozen_fraction", "layer_ticket_precision"):
        np.testing.assert_array_equal(getattr(ra, name), getattr(rc, name))
    for name in ("updates_eliminated", "backward_flops_saved", "ticket_precision", "n_frozen", "n_frozen_correct"):
        assert getattr(ra, name) == getattr(rc, name), name


def test_every_streamed_entry_point_runs_on_any_executor(tmp_path):
    """Going distributed is a change of executor: the public entry points take `executor=` and run their tasks
    in other processes (pickled, as on a Dask cluster) with the same results."""
    run = make_run(tmp_path, "mixed", True, 0, seed=4)
    used = []

    def pool(fn, items):
        used.append(len(items))
        return _process_map(fn, items)

    kw = {"schedule": "linear", "warmup_steps": 9, "decay": 0.9}
    ref_fs = replay_freeze_steps(run, ratio=0.5, executor=serial, **kw)
    np.testing.assert_array_equal(replay_freeze_steps(run, ratio=0.5, executor=pool, **kw), ref_fs)
    ref_idx = ReplayIndex.build(run, executor=serial, **kw)
    np.testing.assert_array_equal(ReplayIndex.build(run, executor=pool, **kw).cum, ref_idx.cum)
    ra, pa = oscillation_summary(run, decay=0.3, executor=serial)
    rb, pb = oscillation_summary(run, decay=0.3, executor=pool)
    np.testing.assert_array_equal(pa.freeze_steps, pb.freeze_steps)
    assert ra.updates_eliminated == rb.updates_eliminated
    np.testing.assert_array_equal(cached_replay_index(run, executor=pool, **kw).cum, ref_idx.cum)
    assert used == [1, 1, 1, 1]                       # each ran its (one, small) task through `pool`


def test_ema_start():
    assert ema_start(np.array([0, 3, 6])) == 1 and ema_start(np.array([2, 5])) == 0
    assert ema_start(np.array([0])) == 1


def test_replay_caches_are_reused_and_rebuilt_when_the_run_changes(tmp_path, monkeypatch):
    run = make_run(tmp_path, "mixed", False, 0, R=14)
    idx = cached_replay_index(run, "linear", 9, 0.9)
    res = cached_oscillation_summary(run)
    calls = []
    real = IndexPass.worker
    monkeypatch.setattr(IndexPass, "worker", lambda self, *a: calls.append(1) or real(self, *a))
    again = cached_replay_index(open_run(tmp_path / "r"), "linear", 9, 0.9)
    assert calls == []                                   # read from the cache, not computed
    np.testing.assert_array_equal(again.cum, idx.cum)
    assert again.query(0.5).updates_eliminated == idx.query(0.5).updates_eliminated
    assert again.sweep()["ticket_precision"].tolist() == pytest.approx(idx.sweep()["ticket_precision"].tolist(),
                                                                       nan_ok=True, rel=0, abs=0)
    res2 = cached_oscillation_summary(open_run(tmp_path / "r"))
    assert res2.updates_eliminated == res.updates_eliminated and res.n_frozen > 0
    np.testing.assert_array_equal(res2.frozen_fraction, oscillation_summary(run)[0].frozen_fraction)
    assert sorted(p.name.split(".")[-1] for p in (tmp_path / "r" / "cache").glob("osc.*")) == ["json", "npz"]
    # the run grows: the index is rebuilt over every record (its ticket precision depends on the last record)
    lv, dist, _ = trajectories(R=3, seed=9)
    lv = in_range(lv, "mixed")
    RunWriter(tmp_path / "r", open_run(tmp_path / "r").manifest).append_chunk(
        {"step": np.array([60, 63, 66]), "level": lv, "dist": dist, "bounds": np.zeros((3, len(SIZES), 2), np.float32)})
    grown = open_run(tmp_path / "r")
    fresh = cached_replay_index(grown, "linear", 9, 0.9)
    assert calls and fresh.cum.shape[-1] == 17
    np.testing.assert_array_equal(fresh.cum, ReplayIndex.build(arrays_from_run(grown), schedule="linear",
                                                               warmup_steps=9, decay=0.9).cum)
    # only the most recent settings are kept
    for w in range(10):
        cached_replay_index(grown, "fixed", w, 0.9)
    assert len(list((tmp_path / "r" / "cache").glob("replay-*.json"))) == 8
    assert cache.load(grown, "osc", {"max_bits": 4}).status == "prefix"


def test_an_osc_cache_of_the_older_layout_is_read_and_its_arrays_go_with_the_next_build(tmp_path, monkeypatch):
    """Caches written before the oscillation item kept only its tables (they also held the per-weight
    arrays) are read as they are; the next build of the item removes those arrays."""
    run = make_run(tmp_path)
    res = cached_oscillation_summary(run)
    c = cache.load(run, "osc", {"max_bits": 4})
    _, rep = oscillation_summary(run)
    arrays = {"freeze_steps": rep.freeze_steps, "frozen_level": rep.frozen_level, "freq": rep.freq}
    assert cache.save(run, "osc", {"max_bits": 4}, arrays, c.tables)        # the older layout
    folder = tmp_path / "r" / "cache"
    assert len(list(folder.glob("osc.*.npy"))) == 3
    monkeypatch.setattr("lts_core.analysis.summaries.run_passes", None)     # no pass may run
    old = cached_oscillation_summary(open_run(tmp_path / "r"))
    np.testing.assert_array_equal(old.frozen_fraction, res.frozen_fraction)
    assert old.n_frozen_correct == res.n_frozen_correct
    monkeypatch.undo()
    (folder / "osc.json").unlink()                                          # rebuilt: the same key
    again = cached_oscillation_summary(open_run(tmp_path / "r"))
    assert again.updates_eliminated == res.updates_eliminated
    assert list(folder.glob("osc.*.npy")) == [] and len(list(folder.glob("osc.*.npz"))) == 1
