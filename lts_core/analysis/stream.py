"""Streamed passes over a recorded run: bounded memory, parallel over weights, a pluggable executor.

Every analysis of a run (settle records, flips, occupancy, distributions, the replays) follows each weight
through the records in order, and weights are independent of each other. A pass therefore splits the flat
weight index into **tasks**, contiguous column ranges of about equal size, each cut into **sub-blocks** that
lie inside one layer and hold at most `SUB_COLS` weights (small enough for the CPU cache):

- *map*: one task per column range, `scan_task(source, task, passes)`: for each group of consecutive chunks
  of the run (`chunk_groups`: about `GROUP_BYTES` per array), in record order, read the task's columns of the
  arrays the passes need (into reused buffers from `source.column_buffer`: `READ_THREADS` reader threads
  read the next `READ_AHEAD` groups while the task computes on this one; a run's big chunk files are read
  with O_DIRECT, `npy_direct.PositionalReader`) and feed each sub-block to every pass's worker, whose
  compiled kernel (`stream_kernels`) follows each weight through the group's records; return each worker's
  result. In this process (`in_process` executors) each thread runs a chain of tasks (`scan_chain`), taking
  the next task while the last groups of its current one are computed on, with one reading pipeline: no
  task starts by waiting for its first reads;
- *reduce*: each pass's collector takes the task results in any order, places per-weight results at their
  columns and adds per-layer tables. When the executor runs tasks in this process (`in_process`: `serial`,
  `thread_executor()`), a collector may hand each task's worker views of its own per-weight arrays
  (`views(task)`), which the worker fills in place: no second copy of the results, no copying them over.

Memory: the pass outputs (O(weights)) plus, per task in flight, its READ_AHEAD + 1 sets of group buffers and the
workers' state for its columns; never O(records × weights). The executor is any `map(fn, items) -> iterable
of results in item order`: `thread_executor()` (the default: one thread per core; the kernels release the
GIL; its `workers` says how many chains run at once), `serial` (debugging), or on a cluster e.g. Dask:
`lambda fn, items: client.gather(client.map(fn, items))` — sources, tasks and passes are plain picklable
objects, and `RunSource` reopens its run from its path.
"""
from __future__ import annotations

import ctypes
import errno
import gc
import math
import mmap
import os
import sys
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np

SUB_COLS = 1 << 17          # weights per sub-block (one kernel call: its per-call cost, a few µs, is small
                            # against its work; the kernels then walk it in L1 blocks of 1024 weights)
TASK_COLS = 1 << 21         # at most this many weights per task (bounds a task's chunk buffers)
GROUP_BYTES = 1 << 24       # a task reads chunks in groups of about this many bytes per array (of 1-byte
                            # values): e.g. 8 records of 2M weights, so that a kernel visits each weight's state
                            # once per 8 records instead of once per record (the state, 10-25 bytes per weight,
                            # goes to memory and back between visits)
ALIGN_COLS = 4096           # task bounds fall on multiples of this many columns when tasks are wide (≥ 16×):
                            # a task's row slices then sit at one offset modulo 4096 in every one-record chunk
                            # file, so they are read with O_DIRECT straight into its buffers (npy_direct)
READ_AHEAD = 3              # groups a task reads ahead of the one it computes on (1 was 4-10 % slower, reading
                            # alone included: a group's reads then waited on the end of the one before)
READ_THREADS = 4            # reads of a task in flight at once (its groups' chunks and arrays, split over them)

Executor = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


# ---- executors ----------------------------------------------------------------------------------------------

def serial(fn, items):
    """The executor that runs every task in this thread, in order."""
    return map(fn, items)


serial.in_process = True   # its tasks share this process's memory (workers may fill the collectors' arrays)


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
    run.in_process = True
    run.workers = n      # threads at once (`run_passes` runs one chain of tasks per thread)
    return run


# ---- sources ------------------------------------------------------------------------------------------------

class RunSource:
    """A stored run as a pass source: chunked [r, N] arrays read by column range (`Run.read_columns`, into
    buffers from `Run.column_buffer`).
    Pickles as its path (a task on another process reopens the run)."""

    def __init__(self, run):
        self.run = run
        self.path = str(run.path)
        self.n_records = int(run.n_records)
        self.n_weights = int(run.n_weights)
        self.layer_sizes = [int(lay["numel"]) for lay in run.layers]
        self.level_limits = [int(lay.get("n_levels") or 256) for lay in run.layers]   # levels below these
        self.chunk_sizes = list(run.chunk_sizes)

    def has(self, name: str) -> bool:
        if name == "level":
            return True
        return all(name in self.run._chunk_arrays(ch) for ch in self.run._chunks)

    def read(self, chunk: int, name: str, start: int, stop: int, out=None, check: bool = True) -> np.ndarray:
        return self.run.read_columns(chunk, name, start, stop, out, check)

    def level_error(self, r0: int, levels: np.ndarray, task: "Task", sub: "SubBlock") -> None:
        """Raise the store's error for a level out of its layer's range among a group's records (from the
        run's record r0 on) at the sub-block's columns, as read with check=False (`Pass.checks_levels`)."""
        a = task.start + sub.offset
        block = levels[:, sub.offset:sub.offset + sub.size]
        rec = 0
        for c, r in enumerate(self.chunk_sizes):   # (a group holds whole chunks)
            if r0 <= rec < r0 + len(block):
                self.run.check_level_columns(c, block[rec - r0:rec - r0 + r], a, a + sub.size)
            rec += r
        raise AssertionError("level_error found no level out of range")

    def column_buffer(self, name: str, start: int, stop: int, records: int, reuse=None) -> np.ndarray:
        return self.run.column_buffer(name, start, stop, records, reuse)

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
        self.level_limits = [256] * len(self.layer_sizes)   # (arrays in memory: not checked)
        k = max(1, R if chunk_records is None else int(chunk_records))
        self.chunk_sizes = [min(k, R - a) for a in range(0, R, k)]

    def has(self, name: str) -> bool:
        return self.arrays.get(name) is not None

    def column_buffer(self, name: str, start: int, stop: int, records: int, reuse=None) -> np.ndarray:
        n, dtype = int(records) * (int(stop) - int(start)), self.arrays[name].dtype
        if reuse is not None and reuse.dtype == dtype and reuse.size >= n:
            return reuse
        return np.empty(n, dtype)

    def read(self, chunk: int, name: str, start: int, stop: int, out=None, check: bool = True) -> np.ndarray:
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
    enough work; bounds on multiples of `ALIGN_COLS` when tasks are at least 16 times wider) and each task into
    sub-blocks inside one layer."""
    sizes = [int(s) for s in layer_sizes]
    N = sum(sizes)
    if N == 0:
        return []
    sub = max(1, int(sub_cols or SUB_COLS))
    cap = max(1, int(task_cols or TASK_COLS))
    n_tasks = max(math.ceil(N / cap), min(2 * max(1, workers), math.ceil(N / sub)))
    bounds = np.linspace(0, N, n_tasks + 1).round().astype(np.int64)
    if N >= 16 * ALIGN_COLS * n_tasks:
        bounds[1:-1] = (bounds[1:-1] + ALIGN_COLS // 2) // ALIGN_COLS * ALIGN_COLS
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
    with `add(task, result)` and `finish()`). `feed` gets the task's columns of one chunk, `data[name]` C-order
    [records, task.size] starting at record r0, and works on the sub-block's columns sub.offset … +sub.size.
    Optionally the collector has `views(task)` (a dict of writable views of its per-weight arrays at the
    task's columns, or None: the worker then keeps arrays of its own); on an in-process executor the worker is
    then made with `worker(…, out=views)`, keeps its per-weight results there and returns them from
    `result()`, and `place` sees that nothing is to copy."""

    needs: tuple[str, ...] = ("level",)
    # True when its workers check every level they read against its layer's range (`source.level_limits`,
    # `source.level_error`), as its kernel loads them anyway: the readers then skip the store's check (a max
    # over each read, one more pass over memory) when every pass of a scan that reads levels does so
    checks_levels: bool = False

    def worker(self, src, task: Task, first_record: int):  # pragma: no cover - interface
        raise NotImplementedError

    def collector(self, src, first_record: int):  # pragma: no cover - interface
        raise NotImplementedError


def chunk_groups(chunk_sizes: Sequence[int], first_chunk: int, width: int,
                 group_bytes: int | None = None) -> list[list[int]]:
    """Consecutive non-empty chunks from `first_chunk` on, grouped so that a group's records of `width` columns
    hold about `group_bytes` (default `GROUP_BYTES`) at one byte per value: a worker then follows each weight
    through several records per visit, with its state in registers (a chunk larger than that is a group)."""
    target = max(1, int(group_bytes or GROUP_BYTES) // max(1, int(width)))
    groups: list[list[int]] = []
    rows = 0
    for c in range(first_chunk, len(chunk_sizes)):
        r = int(chunk_sizes[c])
        if not r:
            continue
        if groups and rows + r <= target:
            groups[-1].append(c)
            rows += r
        else:
            groups.append([c])
            rows = r
    return groups


def level_limits(src) -> list[int]:
    """Per layer, the bound every level must stay below (`source.level_limits`; 256, no check, for a source
    that has none)."""
    return list(getattr(src, "level_limits", None) or [256] * len(src.layer_sizes))


def _read_chunk(src, name: str, task: Task, chunk: int, part: np.ndarray, check: bool = True) -> None:
    """The task's columns of one chunk's array `name` into `part` (a [records, task.size] view of a buffer);
    levels checked against their layers' range unless `check` is False (the workers check them)."""
    got = src.read(chunk, name, task.start, task.stop, part) if check else \
        src.read(chunk, name, task.start, task.stop, part, check=False)
    if got.__array_interface__["data"][0] != part.__array_interface__["data"][0]:
        part[...] = got


def _read_group(pool, src, names: Sequence[str], task: Task, group: Sequence[int], bufs: dict[str, np.ndarray],
                check: bool = True) -> tuple[dict, list]:
    """Start reading the task's columns of the chunks in `group` of every array in `names` on the threads of
    `pool`, one read per chunk and array, into the flat buffers `bufs` (`src.column_buffer`, sized for the
    largest group); returns the [records, task.size] arrays they fill and the reads' futures."""
    w = task.size
    data, reads = {}, []
    for name in names:
        buf, row = bufs[name], 0
        for c in group:
            r = int(src.chunk_sizes[c])
            reads.append(pool.submit(_read_chunk, src, name, task, c, buf[row * w:(row + r) * w].reshape(r, w),
                                     check))
            row += r
        data[name] = buf[:row * w].reshape(row, w)
    return data, reads


def _wait(reads: list) -> None:
    for f in reads:   # every read, then the first error (a failed read leaves its buffer half-filled)
        f.exception()
    for f in reads:
        f.result()


class BufferPool:
    """Read buffers handed from one task to the next of a pass (`run_passes` makes one per pass): a task takes a
    tuple of up to READ_AHEAD + 1 buffer sets when it starts and gives it back when it ends, so that a pass allocates
    (and the OS page-faults in) about one tuple per task in flight instead of one per task. Pickles empty (a task on
    another process allocates its own)."""

    def __init__(self):
        self._free: list = []
        self._lock = threading.Lock()

    def take(self) -> tuple | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, bufsets: tuple) -> None:
        with self._lock:
            self._free.append(bufsets)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


# ---- per-weight results ---------------------------------------------------------------------------------------

RESULT_MAP_MIN = 1 << 25    # bytes from which `result_array` maps a result array of its own
_MADV_POPULATE_WRITE = 23   # Linux ≥ 5.14: fault a range in, writable, in one call
_PAGE = mmap.PAGESIZE
_madvise = None


def result_array(n: int, dtype) -> np.ndarray:
    """An uninitialised [n] array for a collector's per-weight results. From `RESULT_MAP_MIN` bytes on, a
    private anonymous mapping of its own (unmapped when the array and its views are gone) on ordinary pages,
    which `populate` faults in task by task. NumPy's own large arrays ask for transparent huge pages, and on
    the machine of BENCHMARKS.md ("Session 8", first touch of fresh memory) those took 1.2-2.0 s per 800 MiB to touch,
    against 0.28-0.33 s on ordinary pages populated in one call; a 100M-weight pass writes 0.8-1.4 GB of
    results."""
    dtype = np.dtype(dtype)
    nbytes = int(n) * dtype.itemsize
    if nbytes < RESULT_MAP_MIN or not hasattr(mmap, "MAP_PRIVATE"):
        return np.empty(n, dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(m, dtype, int(n))


def populate(*arrays: np.ndarray) -> None:
    """Fault in the whole pages inside each (contiguous) array at once, writable (madvise MADV_POPULATE_WRITE:
    one system call instead of a page fault per page), e.g. a task's columns of a `result_array` just before
    its worker fills them. A no-op off Linux or on any error: the pages then fault in as they are written (a
    kernel before 5.14 answers EINVAL, and is not asked again)."""
    global _madvise
    if not sys.platform.startswith("linux"):
        return
    if _madvise is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).madvise
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            f = False
        _madvise = f
    if not _madvise:
        return
    for a in arrays:
        start = a.__array_interface__["data"][0]
        lo, hi = -(-start // _PAGE) * _PAGE, (start + a.nbytes) // _PAGE * _PAGE
        if hi > lo and _madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                _madvise = False
            return


def place(out: np.ndarray, cols: slice, part: np.ndarray) -> None:
    """out[cols] = part (a collector placing a task's per-weight result), unless `part` is that very view
    (its worker filled it in place)."""
    dst = out[cols]
    if (part.__array_interface__["data"][0] != dst.__array_interface__["data"][0] or part.shape != dst.shape
            or part.dtype != dst.dtype):
        dst[...] = part


def _make_workers(src, passes: Sequence[Pass], task: Task, first_record: int, sinks: Sequence | None) -> list:
    """One worker per pass for `task`; with `out=collector.views(task)` where the collector offers views."""
    workers = []
    for k, p in enumerate(passes):
        views = getattr(sinks[k], "views", None) if sinks is not None else None
        out = views(task) if views is not None else None
        workers.append(p.worker(src, task, first_record) if out is None else
                       p.worker(src, task, first_record, out=out))
    return workers


def scan_task(src, passes: Sequence[Pass], first_chunk: int, task: Task, buffers: BufferPool | None = None,
              sinks: Sequence | None = None, group_bytes: int | None = None) -> list:
    """The map step: stream the task's columns of every chunk from `first_chunk` on, in record order, a group
    of chunks at a time (`chunk_groups`), through one worker per pass; returns the workers' results.
    `READ_THREADS` reader threads read the next `READ_AHEAD` groups' chunks (disk, page cache, decoding of
    levels stored as changes), several requests in flight, while this thread computes on the current one.
    The buffers come from `buffers` (reused where `src.column_buffer` finds them fit) and go back to it.
    `sinks` (the passes' collectors, when they live in this process): a worker whose collector has
    `views(task)` fills those views in place. `group_bytes`: `chunk_groups`' (default `GROUP_BYTES`)."""
    out = []
    scan_chain(src, passes, first_chunk, iter([task]).__next__, lambda t, results: out.append(results), buffers,
               sinks, group_bytes)
    return out[0]


def scan_chain(src, passes: Sequence[Pass], first_chunk: int, next_task: Callable[[], Task],
               deliver: Callable[[Task, list], None], buffers: BufferPool | None = None,
               sinks: Sequence | None = None, group_bytes: int | None = None) -> None:
    """`scan_task` over tasks taken one after another from `next_task()` (StopIteration: none left), with
    one reading pipeline: the next task is taken, and its first groups read, while the last groups of the
    current one are computed on, so that no task starts by waiting for its reads. `deliver(task, results)`
    gets each task's results as it ends. The READ_AHEAD + 1 buffer sets rotate over the groups of all tasks."""
    first_record = sum(src.chunk_sizes[:first_chunk])
    names = sorted({n for p in passes for n in p.needs})
    # the readers check the levels, unless every pass reading them does it in its kernel and there is a
    # check to do (the source's level_limits; arrays in memory have none)
    check = not (all(getattr(p, "checks_levels", False) for p in passes if "level" in p.needs)
                 and any(lim < 256 for lim in level_limits(src)))
    spare = buffers.take() if buffers is not None else None
    slots = [dict(spare[k]) if spare is not None and k < len(spare) else {} for k in range(READ_AHEAD + 1)]
    plan: deque = deque()      # [task, its groups, rows of its largest group, next group to read] of the tasks
                               # taken and not finished, in order
    pending: deque = deque()   # reads started: (task, group index, data, futures)
    issued = 0                 # groups whose reads were started, over all tasks (their buffer slot: issued % sets)

    def take() -> bool:
        try:
            t = next_task()
        except StopIteration:
            return False
        groups = chunk_groups(src.chunk_sizes, first_chunk, t.size, group_bytes)
        rows = max((sum(int(src.chunk_sizes[c]) for c in g) for g in groups), default=0)
        plan.append([t, groups, rows, 0])
        return True

    def issue(pool) -> bool:
        """Start the reads of the next group (taking the next task when the ones taken are read)."""
        nonlocal issued
        while not plan or plan[-1][3] >= len(plan[-1][1]):
            if not take():
                return False
            if not plan[-1][1]:          # a task with no records: nothing to read
                break
        t, groups, rows, g = plan[-1]
        if g >= len(groups):
            pending.append((t, -1, None, []))
            return True
        k = issued % len(slots)
        slots[k] = {n: src.column_buffer(n, t.start, t.stop, rows, slots[k].get(n)) for n in names}
        data, reads = _read_group(pool, src, names, t, groups[g], slots[k], check)
        pending.append((t, g, data, reads))
        plan[-1][3] = g + 1
        issued += 1
        return True

    workers, r0 = None, first_record
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="lts-read") as pool:
        try:
            for _ in range(READ_AHEAD):
                if not issue(pool):
                    break
            while pending:
                t, g, data, reads = pending.popleft()
                if g <= 0:   # a task begins: its workers are made (state allocated) while its groups are read
                    workers, r0 = _make_workers(src, passes, t, first_record, sinks), first_record
                groups = plan[0][1]    # (the tasks taken and not finished, in order: this one first)
                if g >= 0:
                    _wait(reads)
                issue(pool)   # into the buffer slot of the group before this one, which no worker looks at now
                if g >= 0:
                    for sub in t.subs:
                        for w in workers:
                            w.feed(r0, data, sub)
                    r0 += sum(int(src.chunk_sizes[c]) for c in groups[g])
                if g == len(groups) - 1 or g < 0:
                    plan.popleft()
                    deliver(t, [w.result() for w in workers])
        finally:
            for _, _, _, reads in pending:   # on an error, no read may still write into a buffer when we leave
                for f in reads:
                    f.cancel()
    if buffers is not None:
        buffers.give(tuple(slots))


_gc_lock = threading.Lock()
_gc_scans = 0               # scans running in this process (`full_gc_paused`)
_gc_threshold = None        # the GC thresholds when the first of them began
NO_FULL_GC = 1 << 30        # generation-2 threshold meanwhile: young collections go on, full ones wait


@contextmanager
def full_gc_paused():
    """No full collections of Python's cyclic GC while a scan runs; the thresholds back as they were when the
    last concurrent scan ends. A full collection walks every tracked object of the process (torch alone brings
    ~176K) holding the GIL, which the readers and the workers need between kernel calls: 0.10–0.13 s each at
    100M weights, and a scan allocates enough to set one off (BENCHMARKS.md "Session 9"). Young collections
    (milliseconds) go on, so a reference cycle made during a scan is still freed during it."""
    global _gc_scans, _gc_threshold
    with _gc_lock:
        if _gc_scans == 0:
            _gc_threshold = gc.get_threshold()
            gc.set_threshold(_gc_threshold[0], _gc_threshold[1], NO_FULL_GC)
        _gc_scans += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_scans -= 1
            if _gc_scans == 0:
                gc.set_threshold(*_gc_threshold)


def run_passes(src, passes: Sequence[Pass], executor: Executor | None = None, first_chunk: int = 0,
               task_cols: int | None = None, sub_cols: int | None = None, workers: int | None = None,
               group_bytes: int | None = None) -> list:
    """Run `passes` in one streamed scan of `src` (records of chunks `first_chunk` … end); returns each
    pass's collected result. No full GC collections meanwhile (`full_gc_paused`). `group_bytes`: how much of
    each array a task reads per group of chunks (default `GROUP_BYTES`; more records per group, so that the
    kernels visit each weight's state less often, for more memory)."""
    n_workers = default_workers() if workers is None else int(workers)
    executor = thread_executor(n_workers) if executor is None else executor
    tasks = plan_tasks(src.layer_sizes, n_workers, task_cols, sub_cols)
    first_record = sum(src.chunk_sizes[:first_chunk])
    with full_gc_paused():
        collectors = [p.collector(src, first_record) for p in passes]
        if getattr(executor, "in_process", False):
            # tasks taken in turn by one chain per thread (`scan_chain`: reading ahead across tasks); each
            # task's results added as it ends
            queue, lock, failed = iter(tasks), threading.Lock(), threading.Event()

            def next_task() -> Task:
                if failed.is_set():       # another chain failed: take no more tasks, its error is raised
                    raise StopIteration
                with lock:
                    return next(queue)

            def deliver(task: Task, results: list) -> None:
                with lock:
                    for col, res in zip(collectors, results):
                        col.add(task, res)
            scan = partial(scan_chain, src, list(passes), first_chunk, next_task, deliver, buffers=BufferPool(),
                           sinks=collectors, group_bytes=group_bytes)

            def chain(_) -> None:
                try:
                    scan()
                except BaseException:
                    failed.set()
                    raise
            for _ in executor(chain, range(min(getattr(executor, "workers", 1), len(tasks)))):
                pass
        else:
            scan = partial(scan_task, src, list(passes), first_chunk, buffers=BufferPool(), group_bytes=group_bytes)
            for task, results in zip(tasks, executor(scan, tasks)):
                for col, res in zip(collectors, results):
                    col.add(task, res)
        return [c.finish() for c in collectors]


__all__ = ["level_limits", "SUB_COLS", "TASK_COLS", "GROUP_BYTES", "ALIGN_COLS", "READ_AHEAD", "READ_THREADS", "Executor", "serial",
           "thread_executor", "default_workers", "RunSource", "ArraySource", "SubBlock", "Task", "plan_tasks", "Pass",
           "chunk_groups", "BufferPool", "place", "scan_task", "full_gc_paused", "run_passes"]
