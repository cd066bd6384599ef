"""The numpy workers that the numba kernels (`lts_core.analysis.stream_kernels`) replaced, kept as the tested
reference: the code of main at fc77b35 (replay_stream.py, level_stats.py), unchanged but for the imports
and for the index, oscillation and level workers, which take their state and `result` from the kernel workers. A
`Ref*Pass` is the pass with these workers; tests/test_stream_kernels.py checks that the kernels give bit for bit
what they give."""
from __future__ import annotations

import numpy as np

from lts_core.analysis import level_stats, replay_stream
from lts_core.analysis.level_stats import N_CODES, LevelStatsPass
from lts_core.analysis.replay_stream import FreezeStepsPass, IndexPass, OscPass, ema_start, layer_units, sub_width
from lts_core.schedules import eligible, ratio_at, schedule_gain, threshold_norm


def bincount_u8(x: np.ndarray) -> np.ndarray:
    """int64 [256] counts of a uint8 array's values (pairs of bytes counted as one uint16: half the work)."""
    x = np.ascontiguousarray(x).reshape(-1)
    if x.size % 2 == 0 and x.size >= 4096:
        pairs = np.bincount(x.view(np.uint16), minlength=1 << 16).reshape(256, 256)
        return pairs.sum(axis=0) + pairs.sum(axis=1)
    return np.bincount(x, minlength=256)


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


class _IndexWorker(replay_stream._IndexWorker):
    """The replay index on one task's columns: numpy, candidates found with `np.take` and binned with
    `grid_bins`. The final levels, the per-record histogram changes, the ticks and `result` are the kernel
    worker's; the EMA, the running-minimum bins (intp: gathers need no conversion) and `feed` are the numpy
    code's."""

    def __init__(self, p: IndexPass, src, task: Task, first_record: int):
        super().__init__(p, src, task, first_record)
        n = task.size
        OV = p.J + 1
        self.ema = _Ema(n, p.steps, p.decay, p.use_raw, sub_width(task))
        self.M = np.full(n, OV, dtype=np.intp)
        self.thr_m = np.empty(sub_width(task), np.float32)   # scratch: each weight's threshold of bin M
        self.below = np.empty(sub_width(task), bool)
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
        from lts_core.analysis.replay import grid_bins
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


class _OscWorker(replay_stream._OscWorker):
    """`replay.replay_oscillation` on one task's columns: numpy, the same float32 operations as
    `osc_ema_update` (x·m + f·(1−m)), int8 directions, preallocated buffers. The state and `result` are the
    kernel worker's; `feed` is the numpy code."""

    def __init__(self, p: OscPass, src, task: Task, out=None):
        super().__init__(p, src, task, out)
        w = sub_width(task)
        self.b1, self.b2 = np.empty(w, bool), np.empty(w, bool)
        self.i1, self.i2 = np.empty(w, np.int8), np.empty(w, np.int8)
        self.f1 = np.empty(w, np.float32)

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


class _LevelWorker(level_stats._LevelWorker):
    """The level statistics' numpy `feed`; the state and `result` are the kernel worker's."""

    def __init__(self, p: LevelStatsPass, src, task: Task, first_record: int, out=None):
        super().__init__(p, src, task, first_record, out)
        self.ne = None     # bool scratch of one sub-block

    def feed(self, r0: int, data: dict, sub) -> None:
        lv = data["level"]
        s = slice(sub.offset, sub.offset + sub.size)
        prev, last_change, flips = self.prev[s], self.last_change[s], self.flips[s]
        reversals, last_dir = self.reversals[s], self.last_dir[s]
        occ = self.occ[sub.layer]
        if self.ne is None or self.ne.size < sub.size:
            self.ne = np.empty(max(s.size for s in self.task.subs), bool)
        ne = self.ne[:sub.size]
        for i in range(lv.shape[0]):
            rec = r0 + i
            cur = lv[i]
            if rec == 0:
                prev[:] = cur
                occ[0] += bincount_u8(cur)
                continue
            # uint8 compare into a reused mask, then work only on the changed columns (a few % per record)
            idx = np.flatnonzero(np.not_equal(cur, prev, out=ne))
            if not idx.size:
                continue
            new, old = cur[idx], prev[idx]
            direction = np.greater(new, old).view(np.int8)
            direction += direction          # 0/2 …
            direction -= 1                  # … -1/+1
            flips[idx] += 1
            last_change[idx] = rec
            reversals[idx] += last_dir[idx] == -direction
            last_dir[idx] = direction
            prev[idx] = new
            row = occ[rec - self.first]
            row += np.bincount(new, minlength=N_CODES)
            row -= np.bincount(old, minlength=N_CODES)


class _Sliced:
    """A numpy worker fed as before the kernels: the sub-block's columns only."""

    def __init__(self, worker):
        self.worker = worker

    def feed(self, r0, data, sub):
        cols = slice(sub.offset, sub.offset + sub.size)
        self.worker.feed(r0, {name: arr[:, cols] for name, arr in data.items()}, sub)

    def result(self):
        return self.worker.result()


class RefIndexPass(IndexPass):
    def worker(self, src, task, first_record):
        return _Sliced(_IndexWorker(self, src, task, first_record))


class RefFreezeStepsPass(FreezeStepsPass):
    def worker(self, src, task, first_record, out=None):   # (its own array: the collector copies it)
        return _Sliced(_FreezeWorker(self, task))


class RefOscPass(OscPass):
    def worker(self, src, task, first_record, out=None):   # (in place where the collector offers its arrays)
        return _Sliced(_OscWorker(self, src, task, out))


class RefLevelStatsPass(LevelStatsPass):
    def worker(self, src, task, first_record, out=None):
        return _Sliced(_LevelWorker(self, src, task, first_record, out))
