"""Streamed passes over a recorded run: bounded memory, parallel over weights, a pluggable executor.

Every analysis of a run (settle records, flips, occupancy, distributions, the replays) follows each weight
through the records in order, and weights are independent of each other. A pass therefore splits the flat
weight index into **tasks**, contiguous column ranges of about equal size, each cut into **sub-blocks** that
lie inside one layer and hold at most `SUB_COLS` weights (small enough for the CPU cache):

- *map*: one task per column range, `scan_task(source, task, passes)`: for each chunk of the run, in record
  order, read the task's columns of the arrays the passes need (one chunk's columns at a time, into reused
  buffers, double-buffered: a reader thread reads the next chunk while the task computes on this one) and
  feed each sub-block's columns to every pass's worker; return each worker's result;
- *reduce*: each pass's collector takes the task results in any order, places per-weight results at their
  columns and adds per-layer tables.

Memory: the pass outputs (O(weights)) plus, per task in flight, its two sets of chunk buffers and the
workers' state for its columns; never O(records × weights). The executor is any `map(fn, items) -> iterable
of results in item order`: `thread_executor()` (the default: one thread per core; numpy releases the GIL in
its loops), `serial` (debugging), or on a cluster e.g. Dask:
`lambda fn, items: client.gather(client.map(fn, items))` — sources, tasks and passes are plain picklable
objects, and `RunSource` reopens its run from its path.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np

SUB_COLS = 1 << 17          # weights per sub-block: numpy's per-call cost (~1 µs) is small against a call's
                            # work, and the workers' state (~25 bytes per weight) stays in the CPU's L2/L3
                            # (10-20 % less CPU than 2^15 at 10M weights; the workers run numpy only: a torch op
                            # above its grain size would start an intra-op thread team per call, which under
                            # load costs milliseconds)
TASK_COLS = 1 << 22         # at most this many weights per task (bounds a task's chunk buffers)

Executor = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


# ---- executors ----------------------------------------------------------------------------------------------

def serial(fn, items):
    """The executor that runs every task in this thread, in order."""
    return map(fn, items)


def default_workers() -> int:
    """Threads for a pass: $SCRATCHOFF_ANALYSIS_THREADS, else the number of usable cores."""
    env = os.environ.get("SCRATCHOFF_ANALYSIS_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def thread_executor(workers: int | None = None) -> Executor:
    """An executor running tasks on `workers` threads (default `default_workers()`); results in order."""
    n = default_workers() if workers is None else int(workers)

    def run(fn, items):
        items = list(items)
        if n <= 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="lts-analysis") as pool:
            yield from pool.map(fn, items)
    return run


# ---- sources ------------------------------------------------------------------------------------------------

class RunSource:
    """A stored run as a pass source: chunked [r, N] arrays read by column range (`Run.read_columns`).
    Pickles as its path (a task on another process reopens the run)."""

    def __init__(self, run):
        self.run = run
        self.path = str(run.path)
        self.n_records = int(run.n_records)
        self.n_weights = int(run.n_weights)
        self.layer_sizes = [int(lay["numel"]) for lay in run.layers]
        self.chunk_sizes = list(run.chunk_sizes)

    def has(self, name: str) -> bool:
        if name == "level":
            return True
        return all(name in self.run._chunk_arrays(ch) for ch in self.run._chunks)

    def read(self, chunk: int, name: str, start: int, stop: int, out=None) -> np.ndarray:
        return self.run.read_columns(chunk, name, start, stop, out)

    def __getstate__(self):
        return {"path": self.path, "n_chunks": len(self.chunk_sizes)}

    def __setstate__(self, state):
        from ..store import open_run
        run = open_run(state["path"])
        self.__init__(run)
        if len(self.chunk_sizes) < state["n_chunks"]:
            raise RuntimeError(f"{self.path}: the run has fewer chunks than when the pass was planned")
        self.chunk_sizes = self.chunk_sizes[:state["n_chunks"]]


class ArraySource:
    """In-memory (or memory-mapped) [R, N] arrays as a pass source, cut into chunks of `chunk_records`."""

    def __init__(self, arrays: dict[str, Any], layer_sizes: Sequence[int] | None = None,
                 chunk_records: int | None = None):
        first = arrays["level"]
        if getattr(first, "ndim", None) != 2:
            raise ValueError(f"levels must be a 2-D [records, weights] array, got shape "
                             f"{getattr(first, 'shape', None)}")
        self.arrays = dict(arrays)
        R, N = (int(x) for x in first.shape)
        for name, a in self.arrays.items():
            if a is not None and tuple(a.shape) != (R, N):
                raise ValueError(f"{name} shape {tuple(a.shape)} differs from levels shape {(R, N)}")
        self.n_records, self.n_weights = R, N
        self.layer_sizes = [N] if layer_sizes is None else [int(s) for s in layer_sizes]
        k = max(1, R if chunk_records is None else int(chunk_records))
        self.chunk_sizes = [min(k, R - a) for a in range(0, R, k)]

    def has(self, name: str) -> bool:
        return self.arrays.get(name) is not None

    def read(self, chunk: int, name: str, start: int, stop: int, out=None) -> np.ndarray:
        r0 = sum(self.chunk_sizes[:chunk])
        part = self.arrays[name][r0:r0 + self.chunk_sizes[chunk], start:stop]
        if out is None:
            return np.array(part)
        view = out.reshape(-1)[:part.size].reshape(part.shape)
        view[...] = part
        return view


# ---- plan ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubBlock:
    layer: int      # layer index
    start: int      # flat column range [start, stop)
    stop: int
    offset: int     # start - task.start

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Task:
    start: int
    stop: int
    subs: tuple[SubBlock, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.subs})


def plan_tasks(layer_sizes: Sequence[int], workers: int = 1, task_cols: int | None = None,
               sub_cols: int | None = None) -> list[Task]:
    """Cut the flat weight index into tasks (contiguous, about equal, at least 2 per worker when there is
    enough work) and each task into sub-blocks inside one layer."""
    sizes = [int(s) for s in layer_sizes]
    N = sum(sizes)
    if N == 0:
        return []
    sub = max(1, int(sub_cols or SUB_COLS))
    cap = max(1, int(task_cols or TASK_COLS))
    n_tasks = max(math.ceil(N / cap), min(2 * max(1, workers), math.ceil(N / sub)))
    bounds = np.linspace(0, N, n_tasks + 1).round().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    tasks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        a, b = int(a), int(b)
        if b <= a:
            continue
        subs = []
        pos = a
        while pos < b:
            layer = int(np.searchsorted(offsets, pos, side="right") - 1)
            while sizes[layer] == 0:
                layer += 1
            end = min(b, int(offsets[layer + 1]), pos + sub)
            subs.append(SubBlock(layer, pos, end, pos - a))
            pos = end
        tasks.append(Task(a, b, tuple(subs)))
    return tasks


# ---- passes -------------------------------------------------------------------------------------------------

class Pass:
    """One analysis streamed over the records. Subclasses define `needs` (arrays read), `worker(source, task,
    first_record)` (an object with `feed(r0, data, sub)` and `result()`) and `collector(source)` (an object
    with `add(task, result)` and `finish()`)."""

    needs: tuple[str, ...] = ("level",)

    def worker(self, src, task: Task, first_record: int):  # pragma: no cover - interface
        raise NotImplementedError

    def collector(self, src, first_record: int):  # pragma: no cover - interface
        raise NotImplementedError


def _read_chunk(src, names: Sequence[str], task: Task, c: int, bufs: dict[str, np.ndarray]) -> dict:
    """The task's columns of chunk `c` of every array in `names`, read into the reusable buffers `bufs`."""
    r = src.chunk_sizes[c]
    data = {}
    for name in names:
        buf = bufs.get(name)
        got = src.read(c, name, task.start, task.stop, None if buf is None or buf.size < r * task.size else buf)
        if buf is None or buf.size < got.size:
            bufs[name] = got.reshape(-1) if got.flags.c_contiguous else np.ascontiguousarray(got).reshape(-1)
        data[name] = got
    return data


def scan_task(src, passes: Sequence[Pass], first_chunk: int, task: Task) -> list:
    """The map step: stream the task's columns of every chunk from `first_chunk` on, in record order, through
    one worker per pass; returns the workers' results. Double-buffered: a reader thread reads the next chunk
    (disk, page cache, decoding of levels stored as changes) while this thread computes on the current one."""
    first_record = sum(src.chunk_sizes[:first_chunk])
    workers = [p.worker(src, task, first_record) for p in passes]
    names = sorted({n for p in passes for n in p.needs})
    chunks = [c for c in range(first_chunk, len(src.chunk_sizes)) if src.chunk_sizes[c]]
    bufsets: tuple[dict, dict] = ({}, {})
    r0 = first_record
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lts-read") as reader:
        pending = reader.submit(_read_chunk, src, names, task, chunks[0], bufsets[0]) if chunks else None
        for i, c in enumerate(chunks):
            data = pending.result()
            if i + 1 < len(chunks):   # into the other buffer set, which no worker looks at now
                pending = reader.submit(_read_chunk, src, names, task, chunks[i + 1], bufsets[(i + 1) % 2])
            for sub in task.subs:
                cols = slice(sub.offset, sub.offset + sub.size)
                view = {name: arr[:, cols] for name, arr in data.items()}
                for w in workers:
                    w.feed(r0, view, sub)
            r0 += src.chunk_sizes[c]
    return [w.result() for w in workers]


def run_passes(src, passes: Sequence[Pass], executor: Executor | None = None, first_chunk: int = 0,
               task_cols: int | None = None, sub_cols: int | None = None, workers: int | None = None) -> list:
    """Run `passes` in one streamed scan of `src` (records of chunks `first_chunk` … end); returns each
    pass's collected result."""
    n_workers = default_workers() if workers is None else int(workers)
    executor = thread_executor(n_workers) if executor is None else executor
    tasks = plan_tasks(src.layer_sizes, n_workers, task_cols, sub_cols)
    first_record = sum(src.chunk_sizes[:first_chunk])
    collectors = [p.collector(src, first_record) for p in passes]
    for task, results in zip(tasks, executor(partial(scan_task, src, list(passes), first_chunk), tasks)):
        for col, res in zip(collectors, results):
            col.add(task, res)
    return [c.finish() for c in collectors]


# ---- helpers for workers --------------------------------------------------------------------------------------

def changed_columns(cur: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Indices where cur != prev (1-D uint8 arrays of one length), fast when changes are rare: the
    comparison is scanned 8 weights at a time and only non-zero words are expanded."""
    ne = np.not_equal(cur, prev)
    n = ne.size
    n8 = n - n % 8
    words = ne[:n8].view(np.uint64)
    nz = np.flatnonzero(words)
    idx = (nz[:, None] * 8 + np.arange(8))[ne[:n8].reshape(-1, 8)[nz]] if nz.size else np.empty(0, np.int64)
    if n8 < n:
        tail = np.flatnonzero(ne[n8:]) + n8
        if tail.size:
            idx = np.concatenate([idx, tail])
    return idx


def bincount_u8(x: np.ndarray) -> np.ndarray:
    """int64 [256] counts of a uint8 array's values (pairs of bytes counted as one uint16: half the work)."""
    x = np.ascontiguousarray(x).reshape(-1)
    if x.size % 2 == 0 and x.size >= 4096:
        pairs = np.bincount(x.view(np.uint16), minlength=1 << 16).reshape(256, 256)
        return pairs.sum(axis=0) + pairs.sum(axis=1)
    return np.bincount(x, minlength=256)


__all__ = ["SUB_COLS", "TASK_COLS", "Executor", "serial", "thread_executor", "default_workers", "RunSource",
           "ArraySource", "SubBlock", "Task", "plan_tasks", "Pass", "scan_task", "run_passes",
           "changed_columns", "bincount_u8"]
