"""Streamed replays of a stored run (`stream`): the LTS replay index, the direct LTS replay and oscillation
freezing, one pass over the chunks on all cores, memory O(weights) plus one chunk.

The semantics are exactly those of `replay` (its module docstring): the same float32 operations on the same
values as its torch code, done with numpy on column blocks instead of whole records (torch rounds a Python
scalar to float32 before a float32 operation or comparison, as `np.float32(x)` does here), so every result is
bit for bit the in-memory one (tests check it). Each sub-block lies inside one layer, so its unit (one step =
1/(L−1)) is a scalar. The workers run numpy only, in place into per-task buffers: a torch op above its grain
size starts an OpenMP team, which costs milliseconds per call when the cores are shared with other work.
"""
from __future__ import annotations

import functools

import numpy as np

from ..schedules import eligible, osc_threshold_at, ratio_at, schedule_gain, threshold_norm
from .stream import Pass, Task

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


class _Ema:
    """The replay's EMA over one task's columns: `replay._ema_stream`, applied to one sub-block at a time.

    The same float32 operations in the same order as `replay._ema_stream` (the decoded distance c/128 is
    exact), in place into preallocated buffers: per record a uint8 compare, a few float32 passes over the
    sub-block and the reset of the weights whose level changed.
    """

    def __init__(self, n: int, steps: np.ndarray, decay: float, use_raw: bool, width: int):
        self.d = np.zeros(n, np.float32)
        self.prev = np.zeros(n, np.uint8)
        self.steps, self.decay, self.use_raw = steps, float(decay), use_raw
        self.start = ema_start(steps)
        self.r = np.empty(width, np.float32)       # the record's distance (normalised), then r·(1−m)
        self.chg = np.empty(width, bool)

    def update(self, rec: int, lv: np.ndarray, dist_row: np.ndarray, s: slice, n_levels: int
               ) -> np.ndarray | None:
        """EMA (normalised units, float32) of sub-block `s` after record `rec`, a view of the state; None
        before the EMA starts."""
        prev = self.prev[s]
        out = None
        if rec >= self.start:
            scale, reset = layer_units(n_levels)
            n = prev.size
            r, chg, d = self.r[:n], self.chg[:n], self.d[s]
            if self.use_raw:
                r[:] = dist_row
            else:   # decode_distance: code / 128 (exact), then × fl32(1/(L−1))
                np.copyto(r, dist_row, casting="unsafe")
                r *= np.float32(1 / 128)
                if scale is not None:
                    r *= scale
            np.not_equal(lv, prev, out=chg)
            if rec > self.start:   # ema_update_compounded: r·(1−m) + d·m, then the reset where the level changed
                gap = int(self.steps[rec]) - int(self.steps[rec - 1])
                m = self.decay if gap == 1 else self.decay ** gap
                r *= np.float32(1.0 - m)
                d *= np.float32(m)
                d += r
                d[chg] = reset
            else:   # d = r, reset to one step where the level changed since the previous record (t ≥ 2)
                d[:] = r
                if rec > 0 and int(self.steps[rec]) >= 2:
                    d[chg] = reset
            out = d
        prev[:] = lv
        return out


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

    def __init__(self, steps, layer_n_levels, schedule: str, warmup_steps: int, total_steps: int, decay: float,
                 bins_per_unit: int, max_bin: int, use_raw: bool, final: np.ndarray | None = None):
        self.steps = np.asarray(steps, dtype=np.int64)
        self.n_levels = [max(int(L), 2) for L in layer_n_levels]
        self.schedule, self.W, self.T, self.decay = schedule, int(warmup_steps), int(total_steps), float(decay)
        self.B, self.J = int(bins_per_unit), int(max_bin)
        self.use_raw = use_raw
        self.needs = ("level", RAW if use_raw else "dist")
        self.final = final

    def worker(self, src, task: Task, first_record: int):
        return _IndexWorker(self, src, task, first_record)

    def collector(self, src, first_record: int):
        return _IndexCollector(self, src)


class _IndexWorker:
    def __init__(self, p: IndexPass, src, task: Task, first_record: int):
        if first_record:
            raise ValueError("the replay index is built from the first record")
        self.p, self.task = p, task
        n = task.size
        OV = p.J + 1
        self.ema = _Ema(n, p.steps, p.decay, p.use_raw, sub_width(task))
        self.M = np.full(n, OV, dtype=np.intp)      # index dtype: gathers need no conversion
        self.thr_m = np.empty(sub_width(task), np.float32)   # scratch: each weight's threshold of bin M
        self.below = np.empty(sub_width(task), bool)
        if p.final is not None:
            self.final = np.asarray(p.final[task.start:task.stop])
        else:
            last = len(src.chunk_sizes) - 1
            self.final = np.array(src.read(last, "level", task.start, task.stop)[-1])
        NB = p.J + 2
        R = src.n_records
        # per record, the change of the running-minimum histogram (int32: bounded by the layer's size; zeroed
        # pages of records without changes, e.g. the warm-up, are never touched)
        self.counts = {layer: np.zeros((R, NB), np.int32) for layer in task.layers()}
        self.tick = {layer: np.zeros(NB, np.int64) for layer in task.layers()}
        self._thr: dict = {}

    def _thresholds(self, rec: int, L: int):
        key = (rec, L)
        if key not in self._thr:
            p = self.p
            g = schedule_gain(int(p.steps[rec]), p.schedule, p.W, p.T)
            thr32 = ((1 / (L - 1)) * ((np.arange(p.J + 1, dtype=np.float64) / p.B) * g)).astype(np.float32)
            ext = np.empty(p.J + 3, dtype=np.float32)
            ext[0], ext[1:p.J + 2], ext[p.J + 2] = -np.inf, thr32, np.inf
            if len(self._thr) > 64:
                self._thr.clear()
            self._thr[key] = (g, thr32, ext)
        return self._thr[key]

    def feed(self, r0: int, data: dict, sub) -> None:
        from .replay import grid_bins
        p, ema = self.p, self.ema
        lv_all, dist_all = data["level"], data[p.needs[1]]
        s = slice(sub.offset, sub.offset + sub.size)
        L = p.n_levels[sub.layer]
        M, final = self.M[s], self.final[s]
        counts, tick = self.counts[sub.layer], self.tick[sub.layer]
        thr_m, below = self.thr_m[:sub.size], self.below[:sub.size]
        for i in range(lv_all.shape[0]):
            rec = r0 + i
            lv = lv_all[i]
            d = ema.update(rec, lv, dist_all[i], s, L)
            t = int(p.steps[rec])
            if d is None or not eligible(t, p.W):
                continue
            g, thr32, ext = self._thresholds(rec, L)
            np.take(ext, M, out=thr_m)
            cand = np.flatnonzero(np.less_equal(d, thr_m, out=below))   # exactly the weights whose bin drops
            if not cand.size:                                             # below M
                continue
            jt = grid_bins(d[cand], g, p.B, p.J, thr32, scale=1 / (L - 1), ext=ext)
            old = M[cand]
            M[cand] = jt
            ok = np.equal(lv, final, out=below)[cand].view(np.int8)    # at its final level: ticket-correct
            # one bincount for the new bins and one for the old, keyed 2·bin + ok: per bin (all, correct)
            jt <<= 1
            jt += ok
            old <<= 1
            old += ok
            nb = 2 * counts.shape[1]
            delta = np.bincount(jt, minlength=nb)
            delta -= np.bincount(old, minlength=nb)
            delta = delta.reshape(-1, 2)
            counts[rec] += (delta[:, 0] + delta[:, 1]).astype(np.int32)
            tick += delta[:, 1]

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

    def worker(self, src, task: Task, first_record: int):
        return _FreezeWorker(self, task)

    def collector(self, src, first_record: int):
        return _PlaceCollector(src.n_weights, np.int64)


class _FreezeWorker:
    def __init__(self, p: FreezeStepsPass, task: Task):
        self.p = p
        self.ema = _Ema(task.size, p.steps, p.decay, p.use_raw, sub_width(task))
        self.freeze = np.full(task.size, -1, np.int64)
        self.free = np.ones(task.size, bool)      # not frozen yet
        self.newly = np.empty(sub_width(task), bool)

    def feed(self, r0: int, data: dict, sub) -> None:
        p = self.p
        s = slice(sub.offset, sub.offset + sub.size)
        L = p.n_levels[sub.layer]
        freeze, free, newly = self.freeze[s], self.free[s], self.newly[:sub.size]
        lv_all, dist_all = data["level"], data[p.needs[1]]
        for i in range(lv_all.shape[0]):
            rec = r0 + i
            d = self.ema.update(rec, lv_all[i], dist_all[i], s, L)
            t = int(p.steps[rec])
            rho = ratio_at(t, p.schedule, p.ratio, p.W, p.T)
            if d is None or rho < 0:
                continue
            np.less_equal(d, np.float32(threshold_norm(rho, L)), out=newly)   # torch's float32 comparison
            newly &= free
            idx = np.flatnonzero(newly)
            if idx.size:
                freeze[idx] = t
                free[idx] = False

    def result(self):
        return self.freeze


class _PlaceCollector:
    """Places each task's per-weight array at its columns."""

    def __init__(self, n: int, dtype):
        self.out = np.empty(n, dtype)

    def add(self, task: Task, res) -> None:
        self.out[task.start:task.stop] = res

    def finish(self) -> np.ndarray:
        return self.out


# ---- oscillation freezing --------------------------------------------------------------------------------------

class OscPass(Pass):
    """`replay.replay_oscillation` streamed, with its accounting per layer and record: per weight the freeze
    step (int64), the frozen level (int16, -1 never) and the final frequency EMA (float32); per layer the
    number of weights frozen by each record, Σ of their freeze steps, and how many froze on their final level.
    `watch_layers` (bool per layer) restricts freezing as `OscillationRule` does (≤ 4 bits)."""

    needs = ("level",)

    def __init__(self, steps, total_steps: int, decay: float, start_frac: float, thr_start: float, thr_end: float,
                 watch_layers=None):
        self.steps = np.asarray(steps, dtype=np.int64)
        self.T, self.m = int(total_steps), float(decay)
        self.thr = [osc_threshold_at(int(t), self.T, start_frac, thr_start, thr_end) for t in self.steps]
        self.watch_layers = None if watch_layers is None else [bool(w) for w in watch_layers]

    def worker(self, src, task: Task, first_record: int):
        return _OscWorker(self, src, task)

    def collector(self, src, first_record: int):
        return _OscCollector(src)


class _OscWorker:
    """`replay.replay_oscillation` on one task's columns: numpy, the same float32 operations as
    `osc_ema_update` (x·m + f·(1−m)), int8 directions, preallocated buffers."""

    def __init__(self, p: OscPass, src, task: Task):
        n, w = task.size, sub_width(task)
        self.p, self.task = p, task
        self.freq = np.zeros(n, np.float32)
        self.level_ema = np.zeros(n, np.float32)
        self.prev = np.zeros(n, np.uint8)
        self.last_dir = np.zeros(n, np.int8)
        self.fs = np.full(n, -1, np.int64)
        self.flevel = np.full(n, -1, np.int16)
        self.free = np.ones(n, bool)             # not frozen yet
        self.b1, self.b2 = np.empty(w, bool), np.empty(w, bool)
        self.i1, self.i2 = np.empty(w, np.int8), np.empty(w, np.int8)
        self.f1 = np.empty(w, np.float32)
        R = src.n_records
        self.new_by_record = {layer: np.zeros(R, np.int64) for layer in task.layers()}

    def feed(self, r0: int, data: dict, sub) -> None:
        p = self.p
        m, keep = np.float32(p.m), np.float32(1 - p.m)
        s = slice(sub.offset, sub.offset + sub.size)
        watched = p.watch_layers is None or p.watch_layers[sub.layer]
        freq, level_ema, prev, last_dir = self.freq[s], self.level_ema[s], self.prev[s], self.last_dir[s]
        fs, flevel, free = self.fs[s], self.flevel[s], self.free[s]
        k = sub.size
        b1, b2, direction, i2, f1 = self.b1[:k], self.b2[:k], self.i1[:k], self.i2[:k], self.f1[:k]
        new_by_record = self.new_by_record[sub.layer]
        for i in range(data["level"].shape[0]):
            rec = r0 + i
            lv = data["level"][i]
            if rec == 0:
                np.copyto(level_ema, lv, casting="unsafe")
            else:
                # direction of the change (−1, 0, +1) without widening: (lv > prev) − (lv < prev)
                np.subtract(np.greater(lv, prev, out=b1).view(np.int8), np.less(lv, prev, out=b2).view(np.int8),
                            out=direction)
                osc = np.equal(np.multiply(last_dir, direction, out=i2), -1, out=b1)  # opposite to the last
                # last_dir = direction where the level changed: & 0xFF where it did not, then | direction
                np.negative(np.equal(direction, 0, out=b2).view(np.int8), out=i2)
                last_dir &= i2
                last_dir |= direction
                freq *= keep                               # f·(1−m) + osc·m
                np.copyto(f1, osc, casting="unsafe")
                f1 *= m
                freq += f1
                level_ema *= keep                          # level_ema·(1−m) + level·m
                np.copyto(f1, lv, casting="unsafe")
                f1 *= m
                level_ema += f1
            prev[:] = lv
            thr = p.thr[rec]
            if thr <= 0 or not watched:
                continue
            newly = np.greater(freq, np.float32(thr), out=b1)   # torch's float32 comparison
            newly &= free
            if newly.any():
                idx = np.flatnonzero(newly)
                fs[idx] = int(p.steps[rec])
                flevel[idx] = np.rint(level_ema[idx])     # torch.round: half to even
                free[idx] = False
                new_by_record[rec] += idx.size

    def result(self):
        t = self.task
        final = self.prev   # the level at the last record
        per_layer = {}
        for sub in t.subs:
            s = slice(sub.offset, sub.offset + sub.size)
            fz = self.fs[s] >= 0
            acc = per_layer.setdefault(sub.layer, [0, 0, 0])
            acc[0] += int(self.fs[s][fz].sum())
            acc[1] += int(fz.sum())
            acc[2] += int((fz & (self.flevel[s] == final[s])).sum())
        return self.fs, self.flevel, self.freq, self.new_by_record, per_layer


class _OscCollector:
    def __init__(self, src):
        N, nl, R = src.n_weights, len(src.layer_sizes), src.n_records
        self.fs = np.empty(N, np.int64)
        self.flevel = np.empty(N, np.int16)
        self.freq = np.empty(N, np.float32)
        self.newly = np.zeros((nl, R), np.int64)
        self.sum_fs = np.zeros(nl, np.int64)
        self.n_frozen = np.zeros(nl, np.int64)
        self.n_correct = np.zeros(nl, np.int64)

    def add(self, task: Task, res) -> None:
        fs, flevel, freq, new_by_record, per_layer = res
        sl = slice(task.start, task.stop)
        self.fs[sl], self.flevel[sl], self.freq[sl] = fs, flevel, freq
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
