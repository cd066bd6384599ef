"""Per-weight level statistics of a run, in one streamed pass (`stream`).

`LevelStatsPass` follows every weight's level through the records and gives, per weight: the final level, the
settle record (the record of its last level change, 0 if it never moved: from there on it stays at its final
level), the number of level changes (flips) and of direction reversals (a change opposite to the weight's
previous change), plus the level occupancy per layer and record. It can resume from an earlier result when
records were appended (a live run): its state is the per-weight arrays themselves.

The same definitions as `lts_core.analysis.settle` (which computes them in memory); tests check that the two
agree bit for bit.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..npy_direct import aligned_empty
from .stream import Pass, Task, level_limits, place, populate, result_array

N_CODES = 256
_spare_lock = threading.Lock()


@dataclass
class LevelStats:
    """Result of `LevelStatsPass` over records 0 … n_records-1."""
    n_records: int
    layer_sizes: list[int]
    final_level: np.ndarray       # uint8 [N]: level at the last record
    settle_record: np.ndarray     # `count_dtype` [N]: record of the last level change (0 = never moved)
    flips: np.ndarray             # `count_dtype` [N]: level changes between consecutive records
    reversals: np.ndarray         # `count_dtype` [N]: changes opposite in direction to the weight's previous change
    last_dir: np.ndarray          # int8 [N]: direction of the last change (0 none, ±1); resumes a pass
    occupancy: np.ndarray         # int64 [R, n_layers, L]: weights at each level index, per record and layer
    settle_hist: np.ndarray | None = None   # int64 [n_layers, R]: by the pass (task by task) or `settle_histogram()`

    @property
    def n_weights(self) -> int:
        return int(self.final_level.size)

    def settle_histogram(self) -> np.ndarray:
        """int64 [n_layers, R]: weights whose settle record is r, per layer (computed once)."""
        if self.settle_hist is None:
            R = self.n_records
            out = np.zeros((len(self.layer_sizes), R), dtype=np.int64)
            off = 0
            for i, n in enumerate(self.layer_sizes):
                out[i] = np.bincount(self.settle_record[off:off + n], minlength=R)[:R]
                off += n
            self.settle_hist = out
        return self.settle_hist


# ---- level statistics ---------------------------------------------------------------------------------------

class LevelStatsPass(Pass):
    """Streamed level statistics; `resume` (a `LevelStats` of the first records) continues from it. With
    `files` (a `cache.ArrayFiles` of the `RESULT_NAMES` arrays) each task's per-weight results are written
    into those files as it ends, and the result's arrays are the files memory-mapped."""

    needs = ("level",)
    checks_levels = True

    def __init__(self, resume: LevelStats | None = None, files=None):
        self.resume, self.files = resume, files

    def __getstate__(self):
        return {**self.__dict__, "files": None}   # (its collector writes them, in this process)

    def worker(self, src, task: Task, first_record: int, out: dict | None = None):
        return _LevelWorker(self, src, task, first_record, out)

    def collector(self, src, first_record: int):
        return _LevelCollector(self, src, first_record, self.files)


def count_dtype(n_records: int) -> np.dtype:
    """dtype of the per-weight settle records, flips and reversals of a run of `n_records` records: int16 while
    every value fits (at most n_records − 1 ≤ 32,767), else int32. Half the bytes for any run of fewer than
    32,769 records: at 100M weights, 600 MB less to allocate and first touch. Do arithmetic on them in a wider
    type (numpy's sums and means already widen)."""
    return np.dtype(np.int16) if int(n_records) <= 32768 else np.dtype(np.int32)


def _state(n_records: int) -> tuple:
    """(name, dtype) of a level worker's per-weight state, which is its result."""
    c = count_dtype(n_records)
    return (("prev", np.dtype(np.uint8)), ("last_change", c), ("flips", c), ("reversals", c),
            ("last_dir", np.dtype(np.int8)))


RESULT_NAMES = ("final_level", "settle_record", "flips", "reversals", "last_dir")   # `_state`'s, in LevelStats


def result_specs(n_records: int, n_weights: int) -> dict[str, tuple]:
    """{name in `RESULT_NAMES`: (dtype, length)} of the per-weight results (`cache.ArrayFiles`' specs)."""
    return {name: (dt, int(n_weights)) for name, (_, dt) in zip(RESULT_NAMES, _state(n_records))}


class _LevelWorker:
    """`stream_kernels.level_kernel` on one task's columns. Its state is the per-weight result itself (the
    last level seen, the settle record, flips, reversals, last direction): its own arrays, or with `out` the
    collector's (`_LevelCollector.views`)."""

    def __init__(self, p: LevelStatsPass, src, task: Task, first_record: int, out: dict | None = None):
        a, b = task.start, task.stop
        n = task.size
        self.src, self.task, self.first = src, task, first_record
        self.limits = level_limits(src)
        old = p.resume if first_record > 0 else None
        if first_record > 0 and (old is None or old.n_records != first_record):
            raise ValueError("resuming a level pass needs the statistics of every earlier record")
        if out is None:
            out = {name: np.empty(n, dtype) for name, dtype in _state(src.n_records)}
        self.prev, self.last_change, self.flips, self.reversals, self.last_dir = (
            out[name] for name in ("prev", "last_change", "flips", "reversals", "last_dir"))
        if old is None:      # (prev is set at record 0)
            for a_ in (self.last_change, self.flips, self.reversals, self.last_dir):
                a_.fill(0)
        else:
            for a_, name in zip((self.prev, self.last_change, self.flips, self.reversals, self.last_dir),
                                ("final_level", "settle_record", "flips", "reversals", "last_dir")):
                a_[...] = getattr(old, name)[a:b]
        R_new = src.n_records - first_record
        self.occ = {layer: np.zeros((R_new, N_CODES), np.int64) for layer in task.layers()}

    def feed(self, r0: int, data: dict, sub) -> None:
        from .stream_kernels import level_kernel
        s = slice(sub.offset, sub.offset + sub.size)
        top = level_kernel(data["level"], sub.offset, sub.size, r0, self.first, self.prev[s], self.last_change[s],
                           self.flips[s], self.reversals[s], self.last_dir[s], self.occ[sub.layer])
        if top >= self.limits[sub.layer]:
            self.src.level_error(r0, data["level"], self.task, sub)

    def result(self):
        from .stream_kernels import add_counts
        R = self.src.n_records     # per layer, the histogram of the settle records (the task's part of it)
        hist = {layer: np.zeros(R, np.int64) for layer in self.task.layers()}
        for sub in self.task.subs:
            add_counts(self.last_change[sub.offset:sub.offset + sub.size], hist[sub.layer])
        return (self.prev, self.last_change, self.flips, self.reversals, self.last_dir, self.occ, hist)


class _LevelCollector:
    """The per-weight results in arrays of their own (filled in place by the workers, `views`), or with
    `files` in those files: a task's workers then fill buffers reused from task to task, which `add` writes."""

    def __init__(self, p: LevelStatsPass, src, first_record: int, files=None):
        N = src.n_weights
        self.src, self.first, self.resume = src, first_record, p.resume if first_record > 0 else None
        self.state = _state(src.n_records)
        self.files = files
        self.spare: list[dict] = []      # (with files) buffers of tasks that ended, for the next ones,
        self.lent: dict[int, dict] = {}  # and those of the tasks running (by their first column)
        if files is None:
            self.final, self.settle, self.flips, self.reversals, self.last_dir = (result_array(N, dt)
                                                                                  for _, dt in self.state)
        self.occ = np.zeros((src.n_records - first_record, len(src.layer_sizes), N_CODES), np.int64)
        self.settle_hist = np.zeros((len(src.layer_sizes), src.n_records), np.int64)   # (tasks add theirs)

    def _arrays(self):
        return self.final, self.settle, self.flips, self.reversals, self.last_dir

    def views(self, task: Task) -> dict:
        """The task's columns of the per-weight results, for its worker to fill in place (with files:
        buffers of the task's size, reused)."""
        if self.files is not None:
            with _spare_lock:
                fit = [k for k, b in enumerate(self.spare) if len(b["prev"]) >= task.size]
                bufs = self.spare.pop(fit[0]) if fit else None
            if bufs is None:   # (aligned: `ArrayFiles.write` sends them to the disk with O_DIRECT)
                bufs = {name: aligned_empty(task.size, dt) for name, dt in self.state}
            with _spare_lock:
                self.lent[task.start] = bufs
            return {name: b[:task.size] for name, b in bufs.items()}
        views = {name: a[task.start:task.stop] for (name, _), a in zip(self.state, self._arrays())}
        populate(*views.values())
        return views

    def add(self, task: Task, res) -> None:
        if self.files is not None:
            with _spare_lock:
                bufs = self.lent.pop(task.start, None)

            def free():            # the task's buffers, free for a later task once written
                if bufs is not None:
                    with _spare_lock:
                        self.spare.append(bufs)
            self.files.write_later(task.start, dict(zip(RESULT_NAMES, res[:5])), free)
        else:
            sl = slice(task.start, task.stop)
            for out, part in zip(self._arrays(), res[:5]):
                place(out, sl, part)
        for layer, table in res[5].items():
            self.occ[:, layer] += table
        for layer, h in res[6].items():
            self.settle_hist[layer] += h

    def finish(self) -> LevelStats:
        deltas = self.occ
        if self.resume is None:
            occ = np.cumsum(deltas, axis=0)
        else:
            old = _pad_last(self.resume.occupancy, N_CODES)
            occ = np.concatenate([old, old[-1] + np.cumsum(deltas, axis=0)]) if deltas.shape[0] else old
        used = np.flatnonzero(occ.any(axis=(0, 1)))
        occ = occ[..., :int(used[-1]) + 1 if used.size else 1]
        if self.files is not None:
            self.spare, self.lent = [], {}
            arrays = self.files.arrays()
            self.final, self.settle, self.flips, self.reversals, self.last_dir = (arrays[n] for n in RESULT_NAMES)
        return LevelStats(self.src.n_records, list(self.src.layer_sizes), self.final, self.settle, self.flips,
                          self.reversals, self.last_dir, occ, self.settle_hist)


def _pad_last(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[-1] >= width:
        return a
    out = np.zeros(a.shape[:-1] + (width,), dtype=a.dtype)
    out[..., :a.shape[-1]] = a
    return out


__all__ = ["LevelStats", "LevelStatsPass", "N_CODES", "RESULT_NAMES", "count_dtype", "result_specs"]
