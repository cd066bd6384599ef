"""Streamed analysis (lts_core.analysis.stream / level_stats / cache / summaries): the streamed results equal the
in-memory ones bit for bit, whatever the chunking, blocking and executor; cached results are reused, extended
when the run grows, and rebuilt when it changes."""
import json
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from lts_core import level_delta
from lts_core.analysis import cache, settle as st
from lts_core.analysis import build_cache, cached_level_stats, cached_settle_summary, settle_summary
from lts_core.analysis.level_stats import LevelStatsPass
from lts_core.analysis.stream import (ArraySource, RunSource, plan_tasks,
                                      run_passes, serial, thread_executor)
from lts_core.store import RunWriter, open_run

SIZES = [300, 1, 0, 700, 45]


def trajectories(R=23, N=sum(SIZES), p_move=0.2, seed=0):
    rng = np.random.default_rng(seed)
    steps = rng.integers(-1, 2, size=(R, N)) * (rng.random((R, N)) < p_move)
    lv = np.clip(np.cumsum(steps, axis=0) + 1, 0, 3).astype(np.uint8)
    dist = rng.integers(0, 65, size=(R, N)).astype(np.uint8)
    ema = rng.integers(0, 256, size=(R, N)).astype(np.uint8)
    return lv, dist, ema


def write_run(folder, lv, dist, ema=None, chunk=5, run_id="r", sizes=SIZES):
    layers = [{"name": f"l{i}", "shape": [n], "numel": n, "n_levels": 4} for i, n in enumerate(sizes)]
    w = RunWriter.create(folder, run_id, {"layers": layers, "steps_per_epoch": 10, "total_steps": 10 * len(lv)})
    for a in range(0, len(lv), chunk):
        arrays = {"step": np.arange(a, min(len(lv), a + chunk)) * 10, "level": lv[a:a + chunk],
                  "dist": dist[a:a + chunk], "bounds": np.zeros((len(lv[a:a + chunk]), len(sizes), 2), np.float32)}
        if ema is not None:
            arrays["ema"] = ema[a:a + chunk]
        w.append_chunk(arrays)
    return w


def reference(lv, dist, sizes=SIZES):
    """Every statistic, computed in memory by lts_core.analysis.settle and numpy."""
    R = lv.shape[0]
    occ, off = [], 0
    for n in sizes:
        occ.append(st.level_occupancy(lv[:, off:off + n], 4) if n else np.zeros((R, 4), np.int64))
        off += n
    return {"final_level": lv[-1], "settle_record": st.settle_records(lv), "flips": st.flips(lv),
            "reversals": st.direction_reversals(lv), "occupancy": np.stack(occ, axis=1)}


def check_stats(stats, ref):
    for name in ("final_level", "settle_record", "flips", "reversals"):
        np.testing.assert_array_equal(getattr(stats, name), ref[name], err_msg=name)
    occ = stats.occupancy
    np.testing.assert_array_equal(occ[..., :4], ref["occupancy"])
    assert not occ[..., 4:].any()
    R, off = stats.n_records, 0      # the settle histogram per layer (the pass adds up its tasks' parts)
    for i, n in enumerate(stats.layer_sizes):
        np.testing.assert_array_equal(stats.settle_histogram()[i],
                                      np.bincount(ref["settle_record"][off:off + n], minlength=R)[:R])
        off += n


@pytest.mark.parametrize("chunk_records,task_cols,sub_cols,workers",
                         [(None, None, None, 1), (4, 97, 13, 2), (1, 5, 3, 2), (7, 1000, 1000, 3)])
def test_streamed_equals_in_memory_on_arrays(chunk_records, task_cols, sub_cols, workers):
    lv, dist, _ = trajectories()
    src = ArraySource({"level": lv, "dist": dist}, SIZES, chunk_records)
    (stats,) = run_passes(src, [LevelStatsPass()], task_cols=task_cols, sub_cols=sub_cols, workers=workers)
    ref = reference(lv, dist)
    check_stats(stats, ref)
    np.testing.assert_array_equal(stats.settle_histogram().sum(0), st.settle_histogram(ref["settle_record"], 23))


def test_tasks_cover_every_weight_once_and_stay_inside_layers():
    for workers, task_cols, sub in ((1, None, None), (2, 97, 13), (4, 1, 1)):
        tasks = plan_tasks(SIZES, workers, task_cols, sub)
        cols = np.concatenate([np.arange(s.start, s.stop) for t in tasks for s in t.subs])
        np.testing.assert_array_equal(cols, np.arange(sum(SIZES)))
        offsets = np.concatenate([[0], np.cumsum(SIZES)])
        for t in tasks:
            assert t.subs[0].start == t.start and t.subs[-1].stop == t.stop
            for s in t.subs:
                assert offsets[s.layer] <= s.start < s.stop <= offsets[s.layer + 1]
                assert s.offset == s.start - t.start
    assert plan_tasks([0, 0], 2) == []


@pytest.mark.parametrize("p_move", [0.2, 0.004])   # dense level chunks, and chunks stored as changes
def test_streamed_equals_in_memory_on_a_stored_run(tmp_path, p_move):
    lv, dist, ema = trajectories(p_move=p_move)
    write_run(tmp_path, lv, dist, ema, chunk=6)
    run = open_run(tmp_path / "r")
    stored_as_changes = ["level_base" in ch["arrays"] for ch in run.manifest["chunks"]]
    assert any(stored_as_changes) == (p_move < 0.01)
    ref = reference(lv, dist)
    for executor in (serial, thread_executor(2)):
        (stats,) = run_passes(RunSource(run), [LevelStatsPass()], executor, task_cols=101, sub_cols=17)
        check_stats(stats, ref)
    # the same through settle_summary(run), which streams
    a, b = settle_summary(lv, SIZES), settle_summary(run)
    np.testing.assert_array_equal(a.settle_records, b.settle_records)
    np.testing.assert_allclose(a.layer_curves, b.layer_curves, rtol=0, atol=0)
    np.testing.assert_array_equal(a.histogram, b.histogram)
    np.testing.assert_array_equal(b.final_levels, lv[-1])
    assert (a.n_never_moved, a.n_converged_later, a.n_not_settled) == \
        (b.n_never_moved, b.n_converged_later, b.n_not_settled)


def _process_map(fn, items):
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        return list(pool.map(fn, items))


def test_a_process_pool_executor_gives_the_same_result(tmp_path):
    """The executor is pluggable: tasks pickle (the run travels as its path) and run in other processes,
    as they would on a Dask cluster."""
    lv, dist, _ = trajectories(seed=3)
    write_run(tmp_path, lv, dist)
    src = RunSource(open_run(tmp_path / "r"))
    assert pickle.loads(pickle.dumps(src)).chunk_sizes == src.chunk_sizes
    (stats,) = run_passes(src, [LevelStatsPass()], _process_map, task_cols=200)
    check_stats(stats, reference(lv, dist))
    # the cache build too: its level statistics' files stay in this process (the pass pickles without them)
    check_stats(build_cache(open_run(tmp_path / "r"), executor=_process_map)["levels"], reference(lv, dist))
    assert not list((tmp_path / "r" / "cache").glob("*.tmp-*"))


def test_in_process_workers_fill_the_collectors_arrays_in_place():
    """On an executor that runs tasks in this process (serial, threads) each worker keeps its per-weight
    results in its collector's own arrays, so nothing is copied over; on any other executor (which may pickle
    tasks to other processes) workers have arrays of their own, which the collector copies. Same results."""
    lv, dist, _ = trajectories(seed=4)
    src = ArraySource({"level": lv}, SIZES, 4)
    shared: dict[str, list[bool]] = {}

    class Spy(LevelStatsPass):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def collector(self, src_, first_record):
            col = super().collector(src_, first_record)
            add = col.add

            def spy_add(task, res):   # res[2]: the task's flips
                shared.setdefault(self.kind, []).append(np.shares_memory(res[2], col.flips))
                add(task, res)
            col.add = spy_add
            return col

    for kind, executor in (("serial", serial), ("threads", thread_executor(2)),
                           ("other", lambda fn, items: map(fn, items))):
        (stats,) = run_passes(src, [Spy(kind)], executor, task_cols=200, sub_cols=50)
        check_stats(stats, reference(lv, dist))
    n_tasks = len(plan_tasks(SIZES, 2, 200, 50))
    assert shared["serial"] == shared["threads"] == [True] * n_tasks
    assert shared["other"] == [False] * n_tasks


def test_no_full_gc_during_a_scan_and_the_thresholds_as_they_were_after():
    """`run_passes` holds off the cyclic GC's full collections (`full_gc_paused`): the workers see the
    generation-2 threshold raised and the GC still on (young collections go on); afterwards the thresholds are
    as they were, whatever they were, also when the pass fails; of two overlapping scans, the first to end
    leaves them raised for the other."""
    import gc
    from lts_core.analysis.stream import NO_FULL_GC, full_gc_paused
    lv, dist, _ = trajectories(seed=5)
    src = ArraySource({"level": lv}, SIZES, 4)
    seen: list[tuple] = []

    class Spy(LevelStatsPass):
        def __init__(self, fail=False):
            super().__init__()
            self.fail = fail

        def worker(self, src_, task, first_record, out=None):
            w = super().worker(src_, task, first_record, out)
            seen.append((gc.isenabled(), gc.get_threshold()))
            if self.fail:
                raise RuntimeError("a damaged chunk")
            return w

    was = gc.get_threshold()
    try:
        for before in ((700, 10, 10), (1000, 20, 5)):
            gc.set_threshold(*before)
            seen.clear()
            (stats,) = run_passes(src, [Spy()], thread_executor(2), task_cols=200, sub_cols=50)
            check_stats(stats, reference(lv, dist))
            assert seen and set(seen) == {(True, (before[0], before[1], NO_FULL_GC))}
            assert gc.get_threshold() == before
            with pytest.raises(RuntimeError, match="damaged"):
                run_passes(src, [Spy(fail=True)], thread_executor(2), task_cols=200, sub_cols=50)
            assert gc.get_threshold() == before
        with full_gc_paused():
            with full_gc_paused():
                assert gc.get_threshold()[2] == NO_FULL_GC
            assert gc.get_threshold()[2] == NO_FULL_GC      # the inner scan ended, the outer one still runs
        assert gc.get_threshold() == (1000, 20, 5)
    finally:
        gc.set_threshold(*was)


def test_a_task_reads_groups_ahead_into_rotating_buffers(monkeypatch):
    """With one chunk per group, a task has many more groups than buffer sets: it reads READ_AHEAD groups ahead
    of the one it computes on, each into the set the group before last used, and the results are the
    in-memory ones, serially and on threads, with the chunk reads slowed at random."""
    import time
    from lts_core.analysis import stream
    monkeypatch.setattr(stream, "GROUP_BYTES", 1)         # one chunk per group
    lv, dist, _ = trajectories(R=31, seed=8)
    src = ArraySource({"level": lv}, SIZES, 2)
    assert len(stream.chunk_groups(src.chunk_sizes, 0, 200)) > 2 * (stream.READ_AHEAD + 1)
    rng = np.random.default_rng(0)
    real = ArraySource.read

    def slow(self, *a, **k):     # reads finishing out of order
        time.sleep(float(rng.random()) * 2e-3)
        return real(self, *a, **k)
    monkeypatch.setattr(ArraySource, "read", slow)
    for executor in (serial, thread_executor(2)):
        (stats,) = run_passes(src, [LevelStatsPass()], executor, task_cols=200, sub_cols=50)
        check_stats(stats, reference(lv, dist))


def test_group_bytes_sets_the_records_per_group_and_the_cache_build_reads_bigger_groups(tmp_path, monkeypatch):
    """`run_passes(…, group_bytes=)` groups as many records per kernel call as fit (same results); the cache
    build asks for `CACHE_GROUP_BYTES`."""
    from lts_core.analysis import level_stats, stream, summaries
    lv, dist, _ = trajectories(R=24, seed=9)
    src = ArraySource({"level": lv}, SIZES, 1)
    rows = []
    feed = level_stats._LevelWorker.feed

    def spy(self, r0, data, sub):
        rows.append(len(data["level"]))
        return feed(self, r0, data, sub)
    monkeypatch.setattr(level_stats._LevelWorker, "feed", spy)
    for group_bytes, most in ((3 * 200, 3), (None, 24)):
        rows.clear()
        (stats,) = run_passes(src, [LevelStatsPass()], serial, task_cols=200, group_bytes=group_bytes)
        check_stats(stats, reference(lv, dist))
        assert max(rows) == most
    seen = {}
    real = summaries.run_passes
    monkeypatch.setattr(summaries, "run_passes", lambda *a, **k: seen.update(k) or real(*a, **k))
    write_run(tmp_path, lv, dist)
    build_cache(open_run(tmp_path / "r"))
    assert seen["group_bytes"] == summaries.CACHE_GROUP_BYTES == 2 * stream.GROUP_BYTES


def test_the_next_task_is_read_while_this_one_ends(monkeypatch):
    """One reading pipeline per thread across tasks (`scan_chain`): while a task computes on its last group,
    the next task's first groups are being read (the worker below waits for that read, and would time out
    on a scan that reads each task's groups only when the task starts), serially and on two threads, which
    take the tasks in turn; every task is computed once and the results are the in-memory ones."""
    from lts_core.analysis import stream
    monkeypatch.setattr(stream, "GROUP_BYTES", 1)         # one chunk per group
    lv, dist, _ = trajectories(R=9, seed=3)

    class Logged(ArraySource):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.cond, self.read_cols = threading.Condition(), set()

        def read(self, chunk, name, start, stop, out=None):
            got = super().read(chunk, name, start, stop, out)
            with self.cond:
                self.read_cols.add((chunk, start))
                self.cond.notify_all()
            return got

    class WaitForNextTask(LevelStatsPass):
        def worker(self, src, task, first_record, out=None):
            w = super().worker(src, task, first_record, out)
            feed, starts = w.feed, [t.start for t in tasks]
            begun.append(task.start)

            def waiting_feed(r0, data, sub):
                i = starts.index(task.start)
                if r0 == len(lv) - 1 and sub.offset == 0 and i + 1 < len(starts):   # the task's last group
                    with src.cond:
                        assert src.cond.wait_for(lambda: any((0, starts[j]) in src.read_cols
                                                             for j in range(i + 1, len(starts))), 10), \
                            "no later task's first group was read while this task ended"
                feed(r0, data, sub)
            w.feed = waiting_feed
            return w

    for executor in (serial, thread_executor(2)):
        src = Logged({"level": lv}, SIZES, 1)
        tasks = stream.plan_tasks(src.layer_sizes, 2, task_cols=150, sub_cols=50)
        assert len(tasks) >= 4
        begun = []
        (stats,) = run_passes(src, [WaitForNextTask()], executor, task_cols=150, sub_cols=50, workers=2)
        check_stats(stats, reference(lv, dist))
        assert sorted(begun) == [t.start for t in tasks]                    # each task once


def test_a_failed_read_stops_every_chain(monkeypatch):
    """On two threads, a read that fails in one chain raises from `run_passes`, and the other chain takes no
    more tasks (it would otherwise scan the rest of the run for nothing)."""
    import time
    from lts_core.analysis import stream
    monkeypatch.setattr(stream, "GROUP_BYTES", 1)         # one chunk per group
    lv, dist, _ = trajectories(R=6, seed=2)

    class Failing(ArraySource):
        def read(self, chunk, name, start, stop, out=None):
            time.sleep(0.005)
            if start == 0 and chunk == 1:
                raise OSError("disk error")
            return super().read(chunk, name, start, stop, out)

    class Counted(LevelStatsPass):
        def worker(self, src, task, first_record, out=None):
            begun.append(task.start)
            return super().worker(src, task, first_record, out)

    begun = []
    src = Failing({"level": lv}, SIZES, 1)
    tasks = stream.plan_tasks(src.layer_sizes, 2, task_cols=40, sub_cols=40)
    assert len(tasks) >= 12
    with pytest.raises(OSError, match="disk error"):
        run_passes(src, [Counted()], thread_executor(2), task_cols=40, sub_cols=40, workers=2)
    assert len(begun) <= 4


def test_big_results_are_mapped_arrays_populated_task_by_task(monkeypatch):
    """From RESULT_MAP_MIN bytes, a collector's per-weight results live in a mapping of their own (ordinary
    pages, unmapped with the array), which each task populates before its worker fills it: the same
    results, levels and the oscillation replay, on threads; below it, plain NumPy arrays."""
    import mmap
    from lts_core.analysis import stream
    from lts_core.analysis.replay_stream import OscPass
    from stream_reference import RefOscPass

    def mapped(a):
        return isinstance(getattr(a.base, "obj", a.base), mmap.mmap)     # (frombuffer: a memoryview of the map)
    small = stream.result_array(1000, np.int16)
    assert small.base is None and small.dtype == np.int16 and small.shape == (1000,)
    big = stream.result_array(stream.RESULT_MAP_MIN // 8, np.int64)
    assert mapped(big) and big.flags.writeable and big.shape == (stream.RESULT_MAP_MIN // 8,)
    stream.populate(big[1000:70000], big[:3])     # any alignment; pages read as zeros, then take writes
    assert not big[:70000].any()
    big[5:9] = [1, -2, 3, -4]
    assert big[5:9].tolist() == [1, -2, 3, -4]
    monkeypatch.setattr(stream, "RESULT_MAP_MIN", 0)      # every result array mapped
    lv, dist, _ = trajectories(seed=5)
    src = ArraySource({"level": lv}, SIZES, 4)
    (stats,) = run_passes(src, [LevelStatsPass()], thread_executor(2), task_cols=200, sub_cols=50)
    assert mapped(stats.flips)
    check_stats(stats, reference(lv, dist))
    steps = np.arange(lv.shape[0]) * 3
    args = (steps, int(steps[-1]), 0.9, 0.2, 0.2, 0.05)
    (a,) = run_passes(src, [OscPass(*args)], thread_executor(2), task_cols=200, sub_cols=50)
    (b,) = run_passes(src, [RefOscPass(*args)], serial, task_cols=200, sub_cols=50)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert mapped(a["freeze_steps"])


def test_counts_are_int16_while_they_fit_then_int32_and_resume_across_the_boundary():
    """Settle records, flips and reversals are at most R − 1: int16 up to 32,768 records, int32 beyond, with
    the same values; a live run that grows past the boundary resumes from its int16 statistics."""
    from lts_core.analysis.level_stats import count_dtype
    assert count_dtype(1) == count_dtype(32768) == np.int16 and count_dtype(32769) == np.int32
    rng = np.random.default_rng(7)
    R, sizes = 32772, [5, 3]
    lv = np.zeros((R, 8), np.uint8)
    lv[:, 0] = np.arange(R) % 2           # flips at every record: 32,771 flips and 32,770 reversals
    lv[:, 1:] = np.clip(np.cumsum(rng.integers(-1, 2, size=(R, 7)) * (rng.random((R, 7)) < 0.01), axis=0) + 1,
                        0, 3)
    ref = reference(lv, None, sizes)
    (full,) = run_passes(ArraySource({"level": lv}, sizes, 4096), [LevelStatsPass()])
    check_stats(full, ref)
    assert full.flips.dtype == full.settle_record.dtype == np.int32 and full.flips[0] == R - 1
    (part,) = run_passes(ArraySource({"level": lv[:32000]}, sizes, 4000), [LevelStatsPass()])
    assert part.flips.dtype == part.reversals.dtype == part.settle_record.dtype == np.int16
    check_stats(part, reference(lv[:32000], None, sizes))
    (grown,) = run_passes(ArraySource({"level": lv}, sizes, 4000), [LevelStatsPass(resume=part)], first_chunk=8)
    check_stats(grown, ref)
    assert grown.flips.dtype == np.int32


def test_resume_equals_a_full_pass():
    lv, dist, _ = trajectories(seed=1)
    (first,) = run_passes(ArraySource({"level": lv[:9]}, SIZES, 3), [LevelStatsPass()], sub_cols=29)
    (full,) = run_passes(ArraySource({"level": lv}, SIZES, 3), [LevelStatsPass(resume=first)], first_chunk=3,
                         sub_cols=29)
    check_stats(full, reference(lv, dist))
    with pytest.raises(ValueError, match="earlier record"):
        run_passes(ArraySource({"level": lv}, SIZES, 3), [LevelStatsPass()], first_chunk=3)


def test_read_columns_and_decode_range(tmp_path):
    lv, dist, _ = trajectories(p_move=0.004, seed=2)
    write_run(tmp_path, lv, dist, chunk=8)
    run = open_run(tmp_path / "r")
    buf = np.empty(8 * 1046, np.uint8)
    r0 = 0
    for c, r in enumerate(run.chunk_sizes):
        for a, b in ((0, 1046), (3, 301), (700, 1046), (5, 5)):
            np.testing.assert_array_equal(run.read_columns(c, "level", a, b), lv[r0:r0 + r, a:b])
            np.testing.assert_array_equal(run.read_columns(c, "dist", a, b, out=buf), dist[r0:r0 + r, a:b])
        r0 += r
    with pytest.raises(IndexError):
        run.read_columns(0, "dist", 10, 2000)
    with pytest.raises(ValueError, match="cannot hold"):
        run.read_columns(0, "dist", 0, 1046, out=buf[:100])
    base, at, to = level_delta.encode(lv[:8])
    for a, b in ((0, 1046), (17, 18), (1000, 1046)):
        np.testing.assert_array_equal(level_delta.decode_range(base, at, to, 8, a, b),
                                      level_delta.decode(base, at, to, 8, slice(a, b)))


class _Overlap(ArraySource):
    """An ArraySource whose reads are logged and which lets a worker wait until chunk c has been read."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read_done = [threading.Event() for _ in self.chunk_sizes]
        self.log = []

    def read(self, chunk, name, start, stop, out=None):
        got = super().read(chunk, name, start, stop, out)
        self.log.append((chunk, name, start, stop))
        self.read_done[chunk].set()
        return got


class _WaitForNextRead(LevelStatsPass):
    """Level statistics whose worker, on each chunk, waits until the *next* chunk has been read: it finishes
    only if the scan reads ahead while it computes."""

    def __init__(self, src, r0_to_chunk):
        super().__init__()
        self.src, self.r0_to_chunk = src, r0_to_chunk

    def worker(self, src, task, first_record, out=None):
        w = super().worker(src, task, first_record, out)
        feed, me = w.feed, self

        def waiting_feed(r0, data, sub):
            nxt = me.r0_to_chunk[r0] + 1
            if nxt < len(me.src.chunk_sizes):
                assert me.src.read_done[nxt].wait(10), f"chunk {nxt} not read while chunk {nxt - 1} is computed"
            feed(r0, data, sub)
        w.feed = waiting_feed
        return w


def test_the_next_chunk_is_read_while_this_one_is_computed():
    lv, dist, _ = trajectories(seed=5)
    src = _Overlap({"level": lv, "dist": dist}, SIZES, 4)
    r0_to_chunk = {int(r0): c for c, r0 in enumerate(np.cumsum([0] + src.chunk_sizes[:-1]))}
    (stats,) = run_passes(src, [_WaitForNextRead(src, r0_to_chunk)], serial, workers=1)
    check_stats(stats, reference(lv, dist))
    assert sorted(c for c, *_ in src.log) == list(range(len(src.chunk_sizes)))   # each chunk read once
    for executor in (serial, thread_executor(2)):   # both buffer sets in turn: the same results on any plan
        for task_cols, sub_cols in ((97, 13), (1000, 1000)):
            src = _Overlap({"level": lv, "dist": dist}, SIZES, 3)
            (stats,) = run_passes(src, [LevelStatsPass()], executor, task_cols=task_cols, sub_cols=sub_cols)
            check_stats(stats, reference(lv, dist))


# ---- cache ----------------------------------------------------------------------------------------------------

def test_cache_is_built_once_then_read_memory_mapped(tmp_path):
    lv, dist, ema = trajectories()
    write_run(tmp_path, lv, dist, ema)
    run = open_run(tmp_path / "r")
    assert cache.load(run, "levels") is None
    s1 = cached_settle_summary(run)
    c = cache.load(open_run(tmp_path / "r"), "levels")
    assert c.status == "fresh" and isinstance(c.arrays["settle_record"], np.memmap)
    s2 = cached_settle_summary(open_run(tmp_path / "r"))
    assert isinstance(s2.settle_records, np.memmap)
    ref = settle_summary(lv, SIZES)
    for s in (s1, s2):
        np.testing.assert_array_equal(s.settle_records, ref.settle_records)
        np.testing.assert_array_equal(s.layer_curves, ref.layer_curves)
    # loading does not recompute: a damaged per-weight array would be read as is
    meta = json.loads((tmp_path / "r" / "cache" / "levels.json").read_text())
    np.save(tmp_path / "r" / "cache" / f"levels.{meta['key']}.flips.npy", np.full(sum(SIZES), 7, np.int32))
    assert (cached_level_stats(open_run(tmp_path / "r")).flips == 7).all()


def test_cache_follows_a_live_run_and_is_rebuilt_when_the_run_changes(tmp_path, monkeypatch):
    lv, dist, _ = trajectories(R=30, seed=4)
    w = write_run(tmp_path, lv[:12], dist[:12], chunk=4)
    first = cached_level_stats(open_run(tmp_path / "r"))
    assert first.n_records == 12
    for a in range(12, 30, 4):  # the run goes on
        w.append_chunk({"step": np.arange(a, min(30, a + 4)) * 10, "level": lv[a:a + 4], "dist": dist[a:a + 4],
                        "bounds": np.zeros((len(lv[a:a + 4]), len(SIZES), 2), np.float32)})
    run = open_run(tmp_path / "r")
    assert cache.load(run, "levels").status == "prefix"
    seen = []
    real = run_passes

    def spy(src, passes, executor=None, first_chunk=0, **kw):
        seen.append(first_chunk)
        return real(src, passes, executor, first_chunk, **kw)
    monkeypatch.setattr("lts_core.analysis.summaries.run_passes", spy)
    stats = cached_level_stats(run)
    assert seen == [3]             # only the 5 new chunks were read
    check_stats(stats, reference(lv, dist))
    assert cache.load(open_run(tmp_path / "r"), "levels").status == "fresh"
    # an older view of the run never overwrites the newer cache
    old_view = open_run(tmp_path / "r")
    old_view.manifest = dict(old_view.manifest, chunks=old_view.manifest["chunks"][:2])
    assert not cache.save(old_view, "levels", {}, {}, {})
    # the same run id and chunk list but another run (re-created folder): rebuilt from scratch
    lv2, dist2, _ = trajectories(R=30, seed=5)
    write_run(tmp_path / "again", lv2, dist2, chunk=4)
    os.rename(tmp_path / "r" / "cache", tmp_path / "again" / "r" / "cache")
    run2 = open_run(tmp_path / "again" / "r")
    assert run2.manifest["chunks"] == run.manifest["chunks"]
    assert cache.load(run2, "levels") is None
    seen.clear()
    check_stats(cached_level_stats(run2), reference(lv2, dist2))
    assert seen == [0]
    # a new cache version invalidates everything
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert cache.load(open_run(tmp_path / "again" / "r"), "levels") is None


def test_a_run_folder_that_cannot_be_written_is_analysed_without_a_cache(tmp_path):
    lv, dist, _ = trajectories(seed=6)
    write_run(tmp_path, lv, dist)
    (tmp_path / "r" / "cache").write_text("not a folder")   # mkdir fails, as on read-only media
    stats = build_cache(open_run(tmp_path / "r"))["levels"]
    check_stats(stats, reference(lv, dist))
    assert (tmp_path / "r" / "cache").read_text() == "not a folder"


@pytest.mark.parametrize("executor", ["serial", "threads"])
def test_a_level_out_of_its_layers_range_is_the_stores_error_in_every_streamed_analysis(tmp_path, executor):
    """A chunk file holding a level at or above its layer's n_levels (a damaged or crafted run) stops every
    streamed analysis with the store's message, which names the file, the level and the layer."""
    from lts_core.analysis import ReplayIndex, oscillation_summary, replay_freeze_steps
    from lts_core.store import CorruptChunkError, chunk_file
    lv, dist, _ = trajectories(R=12, seed=7)
    write_run(tmp_path, lv, dist, chunk=4)
    p = chunk_file(tmp_path / "r", 1, "level")
    bad = np.load(p)
    bad[2, 310] = 9                          # layer l3 (columns 301 … 1000), 4 levels
    np.save(p, bad)
    run = open_run(tmp_path / "r")
    ex = serial if executor == "serial" else thread_executor(2)
    analyses = {
        "levels": lambda: run_passes(RunSource(run), [LevelStatsPass()], ex, task_cols=200, sub_cols=64),
        "osc": lambda: oscillation_summary(run, executor=ex),
        "osc-sum": lambda: oscillation_summary(run, executor=ex, per_weight=False),
        "index": lambda: ReplayIndex.build(run, schedule="linear", warmup_steps=20, decay=0.9, executor=ex),
        "replay": lambda: replay_freeze_steps(run, schedule="linear", ratio=1.0, warmup_steps=20, decay=0.9,
                                              executor=ex),
        "cache": lambda: build_cache(run, executor=ex, save=False),
    }
    for name, analysis in analyses.items():
        with pytest.raises(CorruptChunkError, match=r"000001\.level\.npy: level 9 in layer 'l3', which has 4 "
                                                    r"levels") as err:
            analysis()
        assert "\n" not in str(err.value), name


def test_a_scan_from_past_the_last_chunk_delivers_every_task_unfed():
    """`scan_chain`'s tasks with nothing to read (a scan from past the last record, e.g. a cached result of a
    run that did not grow): every task is made, fed nothing and delivered once, serially and on threads."""
    from lts_core.analysis.stream import Pass

    class Feeds:
        def __init__(self, task):
            self.task, self.n = task, 0

        def feed(self, r0, data, sub):
            self.n += 1

        def result(self):
            return self.task.start, self.n

    class Sorted:
        def __init__(self):
            self.got = []

        def add(self, task, res):
            self.got.append(res)

        def finish(self):
            return sorted(self.got)

    class Counting(Pass):
        def worker(self, src, task, first_record, out=None):
            return Feeds(task)

        def collector(self, src, first_record):
            return Sorted()

    lv, _, _ = trajectories(R=6, seed=1)
    src = ArraySource({"level": lv}, SIZES, 2)
    starts = [t.start for t in plan_tasks(SIZES, 2, task_cols=100)]
    for executor in (serial, thread_executor(2)):
        (past,) = run_passes(src, [Counting()], executor, first_chunk=3, task_cols=100, workers=2)
        assert past == [(s, 0) for s in starts]
        (last,) = run_passes(src, [Counting()], executor, first_chunk=2, task_cols=100, workers=2)
        assert [s for s, _ in last] == starts and all(n >= 1 for _, n in last)


def test_npy_headers_are_parsed_one_at_a_time(tmp_path, monkeypatch):
    """numpy parses .npy headers with `ast.literal_eval`, which CPython 3.11 does not run safely on several
    threads at once (python/cpython#106905: a spurious SystemError that the store would report as a damaged
    chunk file). A streamed scan's reader threads open many chunk files at once: their header parsing, and the
    cache's loads, never overlap (`store.NPY_HEADER_LOCK`), and the results stay the in-memory ones."""
    import ast
    import time
    lv, dist, _ = trajectories(R=24, seed=9)
    write_run(tmp_path, lv, dist, chunk=1)                  # 24 chunks: 48 headers, read by several threads
    real, inside, most = ast.literal_eval, [0], [0]
    lock = threading.Lock()

    def tracked(node):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.002)                                   # wide enough for an overlap to be seen
        try:
            return real(node)
        finally:
            with lock:
                inside[0] -= 1
    monkeypatch.setattr(ast, "literal_eval", tracked)
    run = open_run(tmp_path / "r")
    (stats,) = run_passes(RunSource(run), [LevelStatsPass()], thread_executor(2), task_cols=300, workers=2)
    check_stats(stats, reference(lv, dist))
    build_cache(run)
    assert cache.load(open_run(tmp_path / "r"), "levels") is not None
    assert most[0] == 1
