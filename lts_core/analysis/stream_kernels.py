"""The streamed analyses' per-chunk kernels, compiled with numba (`lts_core.jit`): one loop over the weights of
a sub-block, the chunk's records inside it, the state kept in registers and updated in place, no temporaries.

Each kernel is the fused form of the numpy code that defined it (kept as the tested reference in
tests/stream_reference.py): the same float32 operations in the same order, float32 constants passed in (never
a float64 literal), no fastmath, so every result is bit for bit the reference's. Per-record parameters (EMA
decays, thresholds, which records count) are computed once per pass in Python and passed as small arrays.

Arguments shared by the kernels: `lv` (and `dist`) are a chunk's [records, task columns] arrays (C order); the
sub-block is their columns `c0 … c0+n`; `rec0` is the run's record index of their row 0; per-weight state arrays
are the sub-block's slices (length n); per-record arrays are indexed by the run's record index.

This module imports numba: import it only where a pass runs (the workers' constructors), never at
`import lts_core` or on an app page's first view.
"""
from __future__ import annotations

import numpy as np

from ..jit import kernel

# EMA modes per record (`ema_modes`)
BEFORE, START, START_RESET, UPDATE = 0, 1, 2, 3


def ema_modes(steps: np.ndarray, start: int, decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per record: (mode int8, m float32, 1−m float32) of the replay's EMA (`replay._ema_stream`): BEFORE the
    EMA starts (record < start), START (d = r), START_RESET (d = r, then reset where the level changed: a record
    after the first at a step ≥ 2), UPDATE (d = d·m + r·(1−m), then reset where the level changed) with
    m = decay^(step gap) rounded as `ema_update_compounded` does (decay itself for a gap of 1)."""
    steps = np.asarray(steps, dtype=np.int64)
    R = len(steps)
    mode = np.zeros(R, np.int8)
    m32 = np.zeros(R, np.float32)
    k32 = np.zeros(R, np.float32)
    decay = float(decay)
    for rec in range(start, R):
        if rec > start:
            gap = int(steps[rec]) - int(steps[rec - 1])
            m = decay if gap == 1 else decay ** gap
            mode[rec], m32[rec], k32[rec] = UPDATE, np.float32(m), np.float32(1.0 - m)
        else:
            mode[rec] = START_RESET if rec > 0 and int(steps[rec]) >= 2 else START
    return mode, m32, k32


@kernel
def _ema_step(mode, d, x, changed, m, k, reset):
    """One record of the EMA for one weight (mode ≠ BEFORE): float32 in, float32 out."""
    if mode == 3:
        d = d * m + x * k
        if changed:
            d = reset
    else:
        d = x
        if mode == 2 and changed:
            d = reset
    return d


@kernel
def _decode(dist, i, c, raw, inv128, scale):
    """The record's distance of one weight in normalised units: raw float32 as is, else code/128 × scale."""
    if raw:
        return np.float32(dist[i, c])
    return (np.float32(dist[i, c]) * inv128) * scale


@kernel
def index_kernel(lv, dist, c0, n, rec0, raw, inv128, scale, reset, mode, m32, k32, eligible, gain, qscale, ext,
                 top, prev, d, M, final, counts, tick):
    """`IndexPass`: the EMA, then per eligible record each weight whose distance is ≤ the threshold of bin M−1
    moves to its grid bin (`replay.grid_bins`); counts[rec] gets +1 at the new bin and −1 at the old, tick the
    same for weights at their final level. ext float32 [R, J+3] (−inf, the record's thresholds, +inf), gain
    float64 [R], qscale float32 [R] (B / (gain·scale)), top = J+1 (the overflow bin) as float32."""
    J1 = np.int64(top)
    for j in range(n):
        c = c0 + j
        p = prev[j]
        dd = d[j]
        mj = M[j]
        fin = final[j]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            cur = lv[i, c]
            md = mode[rec]
            if md != 0:
                dd = _ema_step(md, dd, _decode(dist, i, c, raw, inv128, scale), cur != p, m32[rec], k32[rec],
                               reset)
            p = cur
            if md == 0 or not eligible[rec] or not dd <= ext[rec, mj]:
                continue
            if gain[rec] <= 0:
                jt = np.int64(0) if dd <= 0 else J1
            else:
                q = np.ceil(dd * qscale[rec])
                q = min(q, top)
                q = max(q, np.float32(0))
                jt = np.int64(q)
                if ext[rec, jt] >= dd:
                    jt -= 1
                if ext[rec, jt + 1] < dd:
                    jt += 1
            counts[rec, jt] += 1
            counts[rec, mj] -= 1
            if cur == fin:
                tick[jt] += 1
                tick[mj] -= 1
            mj = jt
        prev[j] = p
        d[j] = dd
        M[j] = mj


@kernel
def freeze_kernel(lv, dist, c0, n, rec0, raw, inv128, scale, reset, mode, m32, k32, active, thr, steps, prev, d,
                  freeze, free):
    """`FreezeStepsPass`: the EMA, then at each active record (ρ ≥ 0) a free weight with distance ≤ thr[rec]
    freezes at steps[rec]. A frozen weight's EMA is not needed any more and is not followed."""
    for j in range(n):
        if not free[j]:
            continue
        c = c0 + j
        p = prev[j]
        dd = d[j]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            cur = lv[i, c]
            md = mode[rec]
            if md != 0:
                dd = _ema_step(md, dd, _decode(dist, i, c, raw, inv128, scale), cur != p, m32[rec], k32[rec],
                               reset)
            p = cur
            if md != 0 and active[rec] and dd <= thr[rec]:
                freeze[j] = steps[rec]
                free[j] = False
                break
        prev[j] = p
        d[j] = dd


@kernel
def osc_kernel(lv, c0, n, rec0, m, k, active, thr, steps, freq, level_ema, prev, last_dir, fs, flevel, free,
               new_by_record):
    """`OscPass`: per record the direction of the level change, an oscillation where it is opposite to the
    last change, freq = freq·(1−m) + osc·m and level_ema = level_ema·(1−m) + level·m (float32; record 0 sets
    level_ema = level); at an active record a free weight with freq > thr[rec] freezes at steps[rec] on
    rint(level_ema) (half to even)."""
    zero = np.float32(0)
    for j in range(n):
        c = c0 + j
        p = prev[j]
        ld = last_dir[j]
        fr = freq[j]
        le = level_ema[j]
        fre = free[j]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            cur = lv[i, c]
            if rec == 0:
                le = np.float32(cur)
            else:
                direction = np.int8(1) if cur > p else (np.int8(-1) if cur < p else np.int8(0))
                osc = ld * direction == -1
                if direction != 0:
                    ld = direction
                fr = fr * k + (m if osc else zero)
                le = le * k + np.float32(cur) * m
            p = cur
            if fre and active[rec] and fr > thr[rec]:
                fs[j] = steps[rec]
                flevel[j] = np.int16(np.rint(le))
                fre = False
                new_by_record[rec] += 1
        prev[j] = p
        last_dir[j] = ld
        freq[j] = fr
        level_ema[j] = le
        free[j] = fre


@kernel
def level_kernel(lv, c0, n, rec0, first, prev, last_change, flips, reversals, last_dir, occ):
    """`LevelStatsPass`: per weight and record, a level change counts a flip, sets the settle record, counts a
    reversal when opposite to the weight's previous change; occ[rec − first] gets +1 at the new level and −1 at
    the old (record 0: +1 at every level)."""
    for j in range(n):
        c = c0 + j
        p = prev[j]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            cur = lv[i, c]
            if rec == 0:
                occ[0, cur] += 1
            elif cur != p:
                direction = np.int8(1) if cur > p else np.int8(-1)
                flips[j] += 1
                last_change[j] = rec
                if last_dir[j] == -direction:
                    reversals[j] += 1
                last_dir[j] = direction
                occ[rec - first, cur] += 1
                occ[rec - first, p] -= 1
            p = cur
        prev[j] = p


__all__ = ["BEFORE", "START", "START_RESET", "UPDATE", "ema_modes", "index_kernel", "freeze_kernel", "osc_kernel",
           "level_kernel"]
