"""Streamed replays of a stored run (`stream`): the LTS replay index, the direct LTS replay and oscillation
freezing, one pass over the chunks on all cores, memory O(weights) plus one chunk.

The semantics are exactly those of `replay` (its module docstring): the same float32 operations on the same
values as its torch code (torch rounds a Python scalar to float32 before a float32 operation or comparison, as
`np.float32(x)` does here), so every result is bit for bit the in-memory one (tests check it). The workers
call the numba kernels of `stream_kernels` (one loop over a sub-block's weights, the chunk's records inside,
GIL released) with per-record parameters computed once per pass; each sub-block lies inside one layer, so its
unit (one step = 1/(L−1)) is a scalar. numba is imported on a worker's first `feed`, not with this module.
"""
from __future__ import annotations

import functools

import numpy as np

from ..schedules import eligible, osc_threshold_at, ratio_at, schedule_gain, threshold_norm
from .stream import Pass, Task, level_limits, place, populate, result_array

RAW = "raw_dist"


@functools.lru_cache(maxsize=64)
def layer_units(n_levels: int) -> tuple[np.float32 | None, np.float32]:
    """(scale of a decoded code to normalised units, reset value) of a layer with `n_levels` levels: (None,
    1.0) in Δ units (L = 2), else fl32(1/(L−1)) for both, as `replay._units` makes them."""
    if n_levels <= 2:
        return None, np.float32(1.0)
    step = np.float32(1 / (n_levels - 1))
    return step, step


def ema_start(steps: np.ndarray) -> int:
    """Index of the record that starts the replay's EMA: the first at a step ≥ 1 (len(steps) if none)."""
    later = np.flatnonzero(np.asarray(steps) >= 1)
    return int(later[0]) if later.size else len(steps)


def sub_width(task: Task) -> int:
    """Columns of the task's widest sub-block (the size of a worker's scratch buffers)."""
    return max((sub.size for sub in task.subs), default=0)


class _EmaState:
    """The replay's EMA state over one task's columns (`replay._ema_stream`, which the kernels follow record by
    record): the EMA distance (normalised units, float32) and the previous level of every weight."""

    def __init__(self, n: int):
        self.d = np.zeros(n, np.float32)
        self.prev = np.zeros(n, np.uint8)


class _EmaParams:
    """Per record the EMA's mode and float32 decays (`stream_kernels.ema_modes`), per layer size the decoding
    scale and reset value (`layer_units`), as the kernels take them."""

    def __init__(self, steps: np.ndarray, decay: float, use_raw: bool):
        from .stream_kernels import ema_modes
        self.mode, self.m32, self.k32 = ema_modes(steps, ema_start(steps), decay)
        self.use_raw = bool(use_raw)

    def args(self, n_levels: int) -> tuple:
        """(1/128, scale, reset, mode, m, 1−m): the EMA arguments of a kernel for a layer of `n_levels` (raw
        distances are taken as they are: × 1 × 1, exact)."""
        scale, reset = layer_units(n_levels)
        one = np.float32(1.0)
        if self.use_raw:
            return one, one, reset, self.mode, self.m32, self.k32
        return np.float32(1 / 128), one if scale is None else scale, reset, self.mode, self.m32, self.k32


def _dist_name(src) -> tuple[str, bool]:
    return (RAW, True) if src.has(RAW) else ("dist", False)


# ---- the LTS replay index --------------------------------------------------------------------------------------

def index_nbytes(n_records: int, n_layers: int, bins_per_unit: int = 1024, max_ratio: float = 2.0) -> int:
    """Bytes of a `ReplayIndex`'s main table (int32 [bins, layers, records]); building it takes about twice."""
    return 4 * (int(round(max_ratio * bins_per_unit)) + 2) * n_layers * n_records


class IndexPass(Pass):
    """Per record and layer, the histogram of the running-minimum threshold bin (`ReplayIndex`), and the
    telescoped ticket-correct counts. `final` (uint8 [N]) is the level every weight is compared with for ticket
    precision (default: the source's last record)."""

    checks_levels = True   # (its kernel returns the largest level it read)

    def __init__(self, steps, layer_n_levels, schedule: str, warmup_steps: int, total_steps: int, decay: float,
                 bins_per_unit: int, max_bin: int, use_raw: bool, final: np.ndarray | None = None):
        self.steps = np.asarray(steps, dtype=np.int64)
        self.n_levels = [max(int(L), 2) for L in layer_n_levels]
        self.schedule, self.W, self.T, self.decay = schedule, int(warmup_steps), int(total_steps), float(decay)
        self.B, self.J = int(bins_per_unit), int(max_bin)
        self.use_raw = use_raw
        self.needs = ("level", RAW if use_raw else "dist")
        self.final = final
        self.ema = _EmaParams(self.steps, self.decay, use_raw)
        self._bins: dict = {}

    def bins(self, n_levels: int) -> tuple:
        """(eligible bool [R], gain float64 [R], B/(gain·scale) float32 [R], ext float32 [R, J+3], J+1 float32,
        scale float64, B float64): per record the grid of thresholds of a layer of `n_levels` levels, as
        `replay.grid_bins` takes them (ext[r] = −inf, fl32(scale·((j/B)·gain)) for j = 0 … J, +inf; scale =
        1/(L−1)), and the operands the kernel computes them from."""
        got = self._bins.get(n_levels)
        if got is None:
            R, J, B, L = len(self.steps), self.J, self.B, n_levels
            ok = np.array([eligible(int(t), self.W) for t in self.steps], bool)
            gain = np.array([schedule_gain(int(t), self.schedule, self.W, self.T) for t in self.steps], np.float64)
            qscale = np.zeros(R, np.float32)
            ext = np.empty((R, J + 3), np.float32)
            ext[:, 0], ext[:, J + 2] = -np.inf, np.inf
            grid = np.arange(J + 1, dtype=np.float64) / B
            for rec in range(R):
                g = float(gain[rec])
                ext[rec, 1:J + 2] = ((1 / (L - 1)) * (grid * g)).astype(np.float32)
                if g > 0:
                    qscale[rec] = np.float32(B / (g * (1 / (L - 1))))
            got = self._bins[n_levels] = (ok, gain, qscale, ext, np.float32(J + 1), float(1 / (L - 1)), float(B))
        return got

    def worker(self, src, task: Task, first_record: int):
        return _IndexWorker(self, src, task, first_record)

    def collector(self, src, first_record: int):
        return _IndexCollector(self, src)


class _IndexWorker:
    """`stream_kernels.index_kernel` on one task's columns: the EMA state, each weight's running-minimum bin
    M, and per layer the records' histogram changes and telescoped ticket-correct counts."""

    def __init__(self, p: IndexPass, src, task: Task, first_record: int):
        if first_record:
            raise ValueError("the replay index is built from the first record")
        self.p, self.task, self.src, self.limits = p, task, src, level_limits(src)
        n = task.size
        self.ema = _EmaState(n)
        self.M = np.full(n, p.J + 1, dtype=np.int32)    # every weight starts at the overflow bin
        from .stream_kernels import BLOCK
        self.cand = np.empty(BLOCK, np.int32)           # the kernel's scratch: a block's candidates
        self.jb = np.empty(BLOCK, np.int32)             # and their grid bins
        if p.final is not None:
            self.final = np.ascontiguousarray(p.final[task.start:task.stop], dtype=np.uint8)
        else:
            last = len(src.chunk_sizes) - 1
            self.final = np.array(src.read(last, "level", task.start, task.stop)[-1])
        NB = p.J + 2
        R = src.n_records
        # per record, the change of the running-minimum histogram (int32: bounded by the layer's size; zeroed
        # pages of records without changes, e.g. the warm-up, are never touched)
        self.counts = {layer: np.zeros((R, NB), np.int32) for layer in task.layers()}
        self.tick = {layer: np.zeros(NB, np.int64) for layer in task.layers()}

    def feed(self, r0: int, data: dict, sub) -> None:
        from .stream_kernels import index_kernel
        p, ema = self.p, self.ema
        s = slice(sub.offset, sub.offset + sub.size)
        L = p.n_levels[sub.layer]
        top = index_kernel(data["level"], data[p.needs[1]], sub.offset, sub.size, r0, *p.ema.args(L),
                           *p.bins(L), ema.prev[s], ema.d[s], self.M[s], self.final[s], self.counts[sub.layer],
                           self.tick[sub.layer], self.cand, self.jb)
        if top >= self.limits[sub.layer]:
            self.src.level_error(r0, data["level"], self.task, sub)

    def result(self):
        return self.counts, self.tick


class _IndexCollector:
    def __init__(self, p: IndexPass, src):
        self.p, self.src = p, src
        nl, NB = len(src.layer_sizes), p.J + 2
        self.deltas = np.zeros((src.n_records, nl, NB), np.int32)
        self.tick = np.zeros((nl, NB), np.int64)

    def add(self, task: Task, res) -> None:
        counts, tick = res
        for layer, table in counts.items():
            self.deltas[:, layer] += table
            self.tick[layer] += tick[layer]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(cum int32 [NB, n_layers, R], tick_cum int64 [n_layers, NB]) as `ReplayIndex` keeps them."""
        p, sizes = self.p, np.asarray(self.src.layer_sizes, dtype=np.int32)
        hist = np.cumsum(self.deltas, axis=0, out=self.deltas)   # in place: int32 as the in-memory build
        hist[:, :, p.J + 1] += sizes[None, :]                   # every weight starts at the overflow bin
        cum = np.cumsum(hist, axis=2, out=hist)                  # [R, n_layers, NB]
        self.deltas = None
        return np.ascontiguousarray(cum.transpose(2, 1, 0)), np.cumsum(self.tick, axis=1)


# ---- the direct LTS replay (one ratio, per-weight freeze steps) ------------------------------------------------

class FreezeStepsPass(Pass):
    """`replay.replay_freeze_steps` streamed: int64 [N] freeze step per weight (-1 never)."""

    def __init__(self, steps, layer_n_levels, schedule: str, ratio: float, warmup_steps: int, total_steps: int,
                 decay: float, use_raw: bool):
        self.steps = np.asarray(steps, dtype=np.int64)
        self.n_levels = [max(int(L), 2) for L in layer_n_levels]
        self.schedule, self.ratio = schedule, float(ratio)
        self.W, self.T, self.decay, self.use_raw = int(warmup_steps), int(total_steps), float(decay), use_raw
        self.needs = ("level", RAW if use_raw else "dist")
        self.ema = _EmaParams(self.steps, self.decay, use_raw)
        self._thr: dict = {}

    def thresholds(self, n_levels: int) -> tuple[np.ndarray, np.ndarray]:
        """(active bool [R], thr float32 [R]) of a layer of `n_levels` levels: the records where the rule
        freezes (ρ ≥ 0) and its threshold there, rounded to float32 as torch compares a tensor with a float."""
        got = self._thr.get(n_levels)
        if got is None:
            R = len(self.steps)
            active, thr = np.zeros(R, bool), np.zeros(R, np.float32)
            for rec, t in enumerate(self.steps):
                rho = ratio_at(int(t), self.schedule, self.ratio, self.W, self.T)
                if rho >= 0:
                    active[rec], thr[rec] = True, np.float32(threshold_norm(rho, n_levels))
            got = self._thr[n_levels] = (active, thr)
        return got

    def worker(self, src, task: Task, first_record: int, out: dict | None = None):
        return _FreezeWorker(self, task, out)

    def collector(self, src, first_record: int):
        return _PlaceCollector(src.n_weights, np.int64)


class _FreezeWorker:
    """`stream_kernels.freeze_kernel` on one task's columns."""

    def __init__(self, p: FreezeStepsPass, task: Task, out: dict | None = None):
        self.p = p
        self.ema = _EmaState(task.size)
        self.freeze = np.empty(task.size, np.int64) if out is None else out["out"]   # (in place: the collector's)
        self.freeze.fill(-1)
        self.free = np.ones(task.size, bool)      # not frozen yet

    def feed(self, r0: int, data: dict, sub) -> None:
        from .stream_kernels import freeze_kernel
        p, ema = self.p, self.ema
        s = slice(sub.offset, sub.offset + sub.size)
        L = p.n_levels[sub.layer]
        freeze_kernel(data["level"], data[p.needs[1]], sub.offset, sub.size, r0, *p.ema.args(L), *p.thresholds(L),
                      p.steps, ema.prev[s], ema.d[s], self.freeze[s], self.free[s])

    def result(self):
        return self.freeze


class _PlaceCollector:
    """Places each task's per-weight array at its columns (or hands the worker its columns: `views`)."""

    def __init__(self, n: int, dtype):
        self.out = result_array(n, dtype)

    def views(self, task: Task) -> dict:
        out = self.out[task.start:task.stop]
        populate(out)
        return {"out": out}

    def add(self, task: Task, res) -> None:
        place(self.out, slice(task.start, task.stop), res)

    def finish(self) -> np.ndarray:
        return self.out


# ---- oscillation freezing --------------------------------------------------------------------------------------

class OscPass(Pass):
    """`replay.replay_oscillation` streamed, with its accounting per layer and record: per weight the freeze
    step (int64), the frozen level (int16, -1 never) and the final frequency EMA (float32); per layer the
    number of weights frozen by each record, Σ of their freeze steps, and how many froze on their final level.
    `watch_layers` (bool per layer) restricts freezing as `OscillationRule` does (≤ 4 bits). With
    `per_weight=False` only the per-layer accounting is kept: each task's per-weight state is scratch, so the
    pass holds no [N] arrays (14 bytes per weight, 1.4 GB at 100M weights, that would be written once each)."""

    needs = ("level",)
    checks_levels = True   # (its kernel returns the largest level it read)

    def __init__(self, steps, total_steps: int, decay: float, start_frac: float, thr_start: float, thr_end: float,
                 watch_layers=None, per_weight: bool = True):
        self.steps = np.asarray(steps, dtype=np.int64)
        self.T, self.m = int(total_steps), float(decay)
        self.per_weight = bool(per_weight)
        self.thr = [osc_threshold_at(int(t), self.T, start_frac, thr_start, thr_end) for t in self.steps]
        self.active = np.array([thr > 0 for thr in self.thr], bool)    # records where freezing is on
        self.never = np.zeros(len(self.steps), bool)                    # for a layer not watched
        self.thr32 = np.array([np.float32(thr) for thr in self.thr], np.float32)   # torch's float32 comparison
        self.watch_layers = None if watch_layers is None else [bool(w) for w in watch_layers]

    def kernel_args(self, layer: int) -> tuple:
        """(m, 1−m as float32, the records where freezing is on for `layer`, thresholds, steps): what the
        oscillation kernels (`osc_kernel`, `level_osc_kernel`) take for a layer's sub-block."""
        watched = self.watch_layers is None or self.watch_layers[layer]
        return (np.float32(self.m), np.float32(1 - self.m), self.active if watched else self.never, self.thr32,
                self.steps)

    def worker(self, src, task: Task, first_record: int, out: dict | None = None):
        return _OscWorker(self, src, task, out)

    def collector(self, src, first_record: int):
        return _OscCollector(src, self.per_weight)


class _OscWorker:
    """`stream_kernels.osc_kernel` on one task's columns: the frequency and level EMAs (float32), the last
    direction (int8), the freeze step and level."""

    def __init__(self, p: OscPass, src, task: Task, out: dict | None = None):
        n = task.size
        self.p, self.task, self.src, self.limits = p, task, src, level_limits(src)
        if out is None:
            out = {"fs": np.empty(n, np.int64), "flevel": np.empty(n, np.int16), "freq": np.empty(n, np.float32)}
        self.fs, self.flevel, self.freq = out["fs"], out["flevel"], out["freq"]   # (in place: the collector's)
        if p.per_weight:     # (without per-weight results the freeze steps are written, never read)
            self.fs.fill(-1)
        self.flevel.fill(-1)
        self.freq.fill(0)
        self.level_ema = np.zeros(n, np.float32)
        self.prev = np.zeros(n, np.uint8)
        self.last_dir = np.zeros(n, np.int8)
        self.free = np.ones(n, bool)             # not frozen yet
        R = src.n_records
        self.new_by_record = {layer: np.zeros(R, np.int64) for layer in task.layers()}

    def feed(self, r0: int, data: dict, sub) -> None:
        from .stream_kernels import osc_kernel
        s = slice(sub.offset, sub.offset + sub.size)
        top = osc_kernel(data["level"], sub.offset, sub.size, r0, *self.p.kernel_args(sub.layer), self.freq[s],
                         self.level_ema[s], self.prev[s], self.last_dir[s], self.fs[s], self.flevel[s], self.free[s],
                         self.new_by_record[sub.layer])
        if top >= self.limits[sub.layer]:
            self.src.level_error(r0, data["level"], self.task, sub)

    def result(self):
        t = self.task
        final = self.prev   # the level at the last record
        per_layer = {}      # Σ freeze steps, frozen, frozen on the final level: a weight freezes once, at the
        for layer, newly in self.new_by_record.items():    # record that counts it; an unfrozen one has level −1
            per_layer[layer] = [int(newly @ self.p.steps), int(newly.sum()), 0]
        for sub in t.subs:
            s = slice(sub.offset, sub.offset + sub.size)
            per_layer[sub.layer][2] += int(np.count_nonzero(self.flevel[s] == final[s]))
        if not self.p.per_weight:
            return None, None, None, self.new_by_record, per_layer
        return self.fs, self.flevel, self.freq, self.new_by_record, per_layer


class _OscCollector:
    def __init__(self, src, per_weight: bool = True):
        N, nl, R = src.n_weights, len(src.layer_sizes), src.n_records
        self.per_weight = per_weight
        self.fs = result_array(N, np.int64) if per_weight else None
        self.flevel = result_array(N, np.int16) if per_weight else None
        self.freq = result_array(N, np.float32) if per_weight else None
        self.newly = np.zeros((nl, R), np.int64)
        self.sum_fs = np.zeros(nl, np.int64)
        self.n_frozen = np.zeros(nl, np.int64)
        self.n_correct = np.zeros(nl, np.int64)

    def views(self, task: Task) -> dict | None:
        if not self.per_weight:
            return None      # the worker's own scratch arrays
        sl = slice(task.start, task.stop)
        views = {"fs": self.fs[sl], "flevel": self.flevel[sl], "freq": self.freq[sl]}
        populate(*views.values())
        return views

    def add(self, task: Task, res) -> None:
        fs, flevel, freq, new_by_record, per_layer = res
        sl = slice(task.start, task.stop)
        if self.per_weight:
            for out, part in ((self.fs, fs), (self.flevel, flevel), (self.freq, freq)):
                place(out, sl, part)
        for layer, row in new_by_record.items():
            self.newly[layer] += row
        for layer, (sum_fs, n, c) in per_layer.items():
            self.sum_fs[layer] += sum_fs
            self.n_frozen[layer] += n
            self.n_correct[layer] += c

    def finish(self) -> dict:
        return {"freeze_steps": self.fs, "frozen_level": self.flevel, "freq": self.freq,
                "frozen_by_record": np.cumsum(self.newly, axis=1), "sum_freeze_steps": self.sum_fs,
                "n_frozen": self.n_frozen, "n_correct": self.n_correct}
