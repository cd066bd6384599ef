"""The numba kernels of the streamed analyses (lts_core.analysis.stream_kernels) give bit for bit what the numpy
workers they replaced give (tests/stream_reference.py), on random inputs and their edge cases: levels 0 and
the top level of every layer size (2 … 256 levels), ties of the EMA distance or the oscillation frequency with
a threshold, extreme (but NaN-free) raw distances, records from step 0 or later, resumed level passes, any
chunking and blocking; and numba is not imported until a kernel runs."""
import subprocess
import sys

import numpy as np
import pytest

from lts_core.analysis.level_stats import LevelStatsPass
from lts_core.analysis.replay_stream import FreezeStepsPass, IndexPass, OscPass
from lts_core.analysis.stream import ArraySource, run_passes, serial, thread_executor
from stream_reference import RefFreezeStepsPass, RefIndexPass, RefLevelStatsPass, RefOscPass, bincount_u8

SIZES = [37, 300, 5, 130, 64]
N_LEVELS = [2, 3, 4, 16, 256]
B, J = 64, 128          # a coarse grid: many weights in few bins, ties likely


def same(a, b, what=""):
    """Equal bit for bit (float arrays compared as their bytes: −0.0 ≠ 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype.kind == "f":
        a, b = a.view(np.uint8), b.view(np.uint8)
    np.testing.assert_array_equal(a, b, err_msg=what)


def same_tree(a, b, what=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            same_tree(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{what}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for k in a.__dataclass_fields__:
            same_tree(getattr(a, k), getattr(b, k), f"{what}.{k}")
    elif isinstance(a, np.ndarray):
        same(a, b, what)
    else:
        assert a == b, (what, a, b)


def levels(rng, R, p_move=0.3):
    """[R, N] uint8 levels in each layer's range, moving by ±1 or jumping (to 0 and the top level often); one
    weight in 11 never moves."""
    tops = np.repeat(np.array(N_LEVELS) - 1, SIZES)
    N = tops.size
    lv = np.empty((R, N), np.int64)
    lv[0] = rng.integers(0, tops + 1)
    lv[0, ::7] = 0
    lv[0, 3::7] = tops[3::7]
    for r in range(1, R):
        step = rng.choice([-1, 1], N) * (rng.random(N) < p_move)
        jump = rng.random(N) < 0.05
        row = np.clip(lv[r - 1] + step, 0, tops)
        row[jump] = np.where(rng.random(int(jump.sum())) < 0.5, 0, tops[jump])
        lv[r] = row
    lv[:, 5::11] = lv[0, 5::11]     # weights that never move
    return lv.astype(np.uint8)


def raw_distances(rng, R, steps, schedule, W, T, extreme):
    """float32 [R, N] raw distances (normalised units) where a fifth are a grid threshold of their layer at their
    record (ties) or the float32 next to it (either side), and, with `extreme`, others are 0, −0, the smallest
    subnormal, huge or +inf."""
    N = sum(SIZES)
    d = (rng.random((R, N)) * 0.6).astype(np.float32)
    p = IndexPass(steps, N_LEVELS, schedule, W, T, 0.5, B, J, True)
    layer = np.repeat(np.arange(len(SIZES)), SIZES)
    tie = rng.random((R, N)) < 0.2
    for li, L in enumerate(N_LEVELS):
        ext = p.bins(L)[3]
        for r in range(R):
            cols = np.flatnonzero(tie[r] & (layer == li))
            d[r, cols] = ext[r, 1 + rng.integers(0, J + 1, cols.size)]
            off = rng.integers(-1, 2, cols.size)    # or the float32 just below or above the threshold
            d[r, cols] = np.where(off == 0, d[r, cols], np.nextafter(d[r, cols], np.where(off > 0, np.inf, -np.inf)
                                                                     .astype(np.float32)))
    if extreme:
        special = np.array([0.0, -0.0, 1e-45, 1e-38, 3.4e38, np.finfo(np.float32).max, np.inf], np.float32)
        pick = rng.random((R, N)) < 0.05
        d[pick] = rng.choice(special, int(pick.sum()))
    return d


def run_both(ours, ref, arrays, chunk_records, sub_cols, executor=serial, first_chunk=0, layer_sizes=SIZES):
    src = ArraySource(arrays, layer_sizes, chunk_records)
    kw = {"executor": executor, "first_chunk": first_chunk, "task_cols": 211, "sub_cols": sub_cols}
    (a,) = run_passes(src, [ours], **kw)
    (b,) = run_passes(src, [ref], **kw)
    return a, b


CASES = [  # (seed, first step, step gap, chunk records, sub-block columns)
    (0, 0, 1, 1, 64), (1, 0, 3, 7, 13), (2, 1, 2, 40, 1 << 17), (3, 5, 1, 3, 50)]


@pytest.mark.parametrize("seed,first_step,gap,chunk,sub", CASES)
@pytest.mark.parametrize("schedule,W", [("linear", 6), ("fixed", 0), ("sine", 20)])
def test_index_kernel_equals_numpy(seed, first_step, gap, chunk, sub, schedule, W):
    rng = np.random.default_rng(seed)
    R = 40
    steps = first_step + gap * np.arange(R)
    T = int(steps[-1]) - 3        # the last records past T: gain 1, thresholds the layer's step exactly
    lv = levels(rng, R)
    codes = rng.integers(0, 256, lv.shape).astype(np.uint8)
    for decay in (0.0, 0.5, 0.99):
        raw = raw_distances(rng, R, steps, schedule, W, T, extreme=decay > 0)
        final = rng.integers(0, 2, lv.shape[1]).astype(np.uint8) if decay == 0.5 else None
        for use_raw, arrays in ((False, {"level": lv, "dist": codes}), (True, {"level": lv, "raw_dist": raw})):
            args = (steps, N_LEVELS, schedule, W, T, decay, B, J, use_raw, final)
            a, b = run_both(IndexPass(*args), RefIndexPass(*args), arrays, chunk, sub)
            same_tree(a, b, f"index decay {decay} raw {use_raw}")
            assert a[0][J, :, -1].sum() > 0     # weights left the overflow bin


def grids(rng, n_random_gains):
    """(B, J, L, g, scale, the float32 thresholds thr_0 … thr_J, B/(g·scale) in float32) over bins per unit,
    layer sizes and gains, the thresholds computed as `IndexPass.bins` does."""
    for Bu, Jb in ((1024, 2048), (64, 128), (1000, 2000)):
        for L in (2, 3, 4, 16, 256):
            for g in (1.0, 0.5, 1 / 3, 1e-3, 0.987654321, *rng.random(n_random_gains)):
                sc = 1 / (L - 1)
                thr = (sc * ((np.arange(Jb + 1, dtype=np.float64) / Bu) * g)).astype(np.float32)
                yield Bu, Jb, L, g, sc, thr, np.float32(Bu / (g * sc))


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")
def test_block_bins_are_grid_bins_at_and_next_to_every_threshold():
    """The index kernel's computed thresholds (`_block_bins`) give `replay.grid_bins`' bin for distances at
    every threshold of the grid, the float32 on either side of it, 0, −0, huge, +inf and NaN (J+1), over
    gains and layer sizes."""
    from lts_core.analysis.replay import grid_bins
    from lts_core.analysis.stream_kernels import _block_bins
    rng = np.random.default_rng(11)
    for Bu, Jb, L, g, sc, thr, q in grids(rng, 3):
        x = np.concatenate([thr, np.nextafter(thr, np.float32(np.inf)), np.nextafter(thr, np.float32(-np.inf)),
                            (rng.random(2000) * 1.2 * thr[-1]).astype(np.float32),
                            np.array([0, -0.0, 3e38, np.inf], np.float32)])
        got = np.empty(x.size, np.int32)
        _block_bins(x, q, np.float32(Jb + 1), g, sc, float(Bu), np.int32(Jb), got)
        np.testing.assert_array_equal(got, grid_bins(x, g, Bu, Jb, thr, scale=sc), err_msg=f"{Bu} {L} {g}")
        _block_bins(np.array([np.nan], np.float32), q, np.float32(Jb + 1), g, sc, float(Bu), np.int32(Jb), got)
        assert got[0] == Jb + 1


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")
def test_quick_bins_are_grid_bins_or_unsure():
    """The float32-only bins (`_quick_bins`) are `replay.grid_bins`' bin or UNSURE, for the same distances as
    above plus a million random ones on each grid: UNSURE at every tie with a threshold, at 0, negative
    distances and NaN, and for under 0.1 % of the random distances."""
    from lts_core.analysis.replay import grid_bins
    from lts_core.analysis.stream_kernels import UNSURE, _quick_bins
    rng = np.random.default_rng(12)
    for Bu, Jb, L, g, sc, thr, q in grids(rng, 2):
        near = np.concatenate([np.nextafter(thr, np.float32(np.inf)), np.nextafter(thr, np.float32(-np.inf))])
        rand = (rng.random(1 << 20) * 1.3 * thr[-1]).astype(np.float32)
        x = np.concatenate([thr, near, rand, np.array([0, -0.0, -1, 3e38, np.inf, np.nan], np.float32)])
        got = np.empty(x.size, np.int32)
        n_unsure = _quick_bins(x, q, np.float32(Jb + 1), got)
        want = np.append(grid_bins(x[:-1], g, Bu, Jb, thr, scale=sc), UNSURE)    # (NaN: no grid bin)
        sure = got != UNSURE
        assert n_unsure == (~sure).sum()
        np.testing.assert_array_equal(got[sure], want[sure], err_msg=f"{Bu} {L} {g}")
        assert (got[1:thr.size] == UNSURE).all()        # ties (thr_0 = 0 included)
        assert (got[-6:-3] == UNSURE).all() and got[-1] == UNSURE and got[-2] == got[-3] == Jb + 1
        r = got[3 * thr.size:3 * thr.size + rand.size]
        assert (r == UNSURE).mean() < 1e-3, (Bu, L, g, (r == UNSURE).mean())


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_index_kernel_equals_numpy_where_the_gain_is_zero_negative_or_tiny(monkeypatch):
    """Records whose gain is 0, negative or so small that B/(gain·scale) overflows float32 take the kernel's
    look-up path (`_candidate_bins`); the others its computed thresholds (`_block_bins`): both the reference's
    bins, record after record."""
    import stream_reference
    from lts_core.analysis import replay_stream
    rng = np.random.default_rng(7)
    R = 30
    steps = np.arange(R)
    special = {8: 0.0, 9: -0.5, 10: 1e-40, 14: 0.0, 20: 1e-40}

    def gain(t, schedule, W, T):
        return special.get(int(t), (int(t) + 1) / R)
    monkeypatch.setattr(replay_stream, "schedule_gain", gain)
    monkeypatch.setattr(stream_reference, "schedule_gain", gain)
    lv = levels(rng, R)
    codes = rng.integers(1, 256, lv.shape).astype(np.uint8)
    raw = (rng.random(lv.shape) * 0.6 + 1e-3).astype(np.float32)     # > 0: the reference's bins are defined
    still = np.arange(5, lv.shape[1], 11)            # weights that never move: their EMA is never reset
    codes[8:, still], raw[8:, still] = 0, 0          # d = 0 from record 8 (gain 0: bin 0) on
    for use_raw, arrays in ((False, {"level": lv, "dist": codes}), (True, {"level": lv, "raw_dist": raw})):
        args = (steps, N_LEVELS, "linear", 3, R, 0.0, B, J, use_raw, None)
        p = IndexPass(*args)
        assert not np.isfinite(p.bins(4)[2][10]) and p.bins(4)[1][9] < 0    # the cases are there
        a, b = run_both(p, RefIndexPass(*args), arrays, 4, 64)
        same_tree(a, b, f"index raw {use_raw}")
        assert a[0][J, :, -1].sum() > 0


def test_drop_keys_sixteen_at_a_time_and_one_by_one_equal_numpy():
    """`drop_keys`, in both forms (the compress-store sixteen at a time, and one by one), lists exactly the
    weights whose bin drops, in order, with the keys and new minima numpy computes: any length (whole vectors
    and a tail), levels of any integer width, ties jb == mm, keys up to the limit."""
    from lts_core.analysis.stream_kernels import KEY_LIMIT, drop_keys_scalar, drop_keys_vector
    rng = np.random.default_rng(5)
    top = KEY_LIMIT // 2 - 1                     # the largest bin whose keys fit
    for n in (0, 1, 15, 16, 17, 100, 1024):
        for dtype in (np.uint8, np.int16, np.int64):
            jb = rng.integers(0, top + 1, n).astype(np.int32)
            mm = rng.integers(0, top + 1, n).astype(np.int32)
            mm[::5] = jb[::5]                    # ties: no move
            jb[1::7], mm[2::7] = top, top
            row = rng.integers(0, 3, n).astype(dtype)
            fin = rng.integers(0, 3, n).astype(np.uint8)
            ok = (row == fin).astype(np.int64)
            drop = jb < mm
            want = (((2 * jb + ok) | ((2 * mm.astype(np.int64) + ok) << 16))[drop]).astype(np.int32)
            for fn in (drop_keys_vector, drop_keys_scalar):
                m = mm.copy()
                buf = np.full(n + 32, -7, np.int32)     # out = buf[:n]: nothing may be written past it
                nc = fn(jb, m, row, fin, n, buf[:n])
                assert (buf[n:] == -7).all(), (fn, n)
                assert nc == drop.sum(), (fn, n, dtype)
                np.testing.assert_array_equal(buf[:nc], want, err_msg=f"{n} {dtype}")
                np.testing.assert_array_equal(m, np.minimum(jb, mm))
                assert (want >= 0).all() and (want & 0xFFFF).max(initial=0) < KEY_LIMIT


def test_list_changed_sixteen_and_eight_at_a_time_equal_numpy():
    """`list_changed`, in both forms (the compress-store sixteen at a time, and 64-bit words eight at a time),
    lists the positions where the level changed, ascending, for any length and change rate."""
    from lts_core.analysis.stream_kernels import list_changed_swar, list_changed_vector
    rng = np.random.default_rng(6)
    for n in (0, 1, 7, 8, 15, 16, 17, 100, 1000, 1024):
        for rate in (0.0, 0.02, 0.5, 1.0):
            pr = rng.integers(0, 256, n).astype(np.uint8)
            row = pr.copy()
            hit = rng.random(n) < rate
            row[hit] = (pr[hit] + rng.integers(1, 256, int(hit.sum()))).astype(np.uint8)
            row[-1:] ^= np.uint8(128)             # a change in the high bit of the last byte
            for fn in (list_changed_vector, list_changed_swar):
                buf = np.full(n + 32, -7, np.int32)     # out = buf[:n]: nothing may be written past it
                nc = fn(row, pr, np.empty(max(n // 8, 1), np.int32), buf[:n])
                assert (buf[n:] == -7).all(), (fn, n)
                np.testing.assert_array_equal(buf[:nc], np.flatnonzero(row != pr), err_msg=f"{fn} {n} {rate}")


def _steps16():
    """numba loops over whole vectors of sixteen weights calling the IR steps, as the kernels do (compiled
    once, here: the test module imports numba only when a test runs)."""
    from numba import njit
    from lts_core.analysis.stream_kernels import _index_step16, _level_osc_step16, _osc_step16

    @njit
    def index_steps(row, dist, pr, dd, mm, fin, jb, out, m, k, inv128, scale, reset, q, top, unsure):
        nc = 0
        for j in range(0, row.size, 16):
            got = _index_step16(row, dist, pr, dd, mm, fin, jb, j, out, nc, m, k, inv128, scale, reset, q, top)
            unsure[j // 16] = got < 0
            nc = nc if got < 0 else got
        return nc

    @njit
    def osc_steps(row, pr, ld, fq, le, fre, out, m, k, tt):
        nc = 0
        for j in range(0, row.size, 16):
            nc = _osc_step16(row, pr, ld, fq, le, fre, j, out, nc, m, k, tt)
        return nc

    @njit
    def level_osc_steps(row, pr, ld, fq, le, fre, hits, changes, m, k, tt):
        counts = np.int64(0)
        for j in range(0, row.size, 16):
            counts = _level_osc_step16(row, pr, ld, fq, le, fre, j, hits, changes, counts, m, k, tt)
        return counts
    return index_steps, osc_steps, level_osc_steps


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")
def test_index_step_sixteen_at_a_time_equals_the_loops():
    """`_index_step16` (the EMA, the grid bins where float32 decides them and the movers' keys of an UPDATE
    record, in registers) gives what the loops it replaces give, bit for bit: `_ema_block`'s EMA with its
    reset where the level changed, `_quick_bins`' bins, `drop_keys`' keys and new minima; and where a bin of
    the sixteen is UNSURE, the bins stored, the minima untouched and −1. Codes and raw distances, ties with
    thresholds, 0 and huge distances, levels of two widths."""
    from lts_core.analysis.stream_kernels import UNSURE, _quick_bins
    index_steps = _steps16()[0]
    rng = np.random.default_rng(21)
    n, Jb, Bu = 1024, 2048, 1024
    top = np.float32(Jb + 1)
    f = np.float32
    for raw in (False, True):
        for L, dtype in ((4, np.uint8), (16, np.int16)):
            g, sc = 0.37, 1 / (L - 1)
            q = f(Bu / (g * sc))
            m, k, reset = f(0.9), f(1 - f(0.9)), f(sc)
            inv128, scale = (f(1), f(1)) if raw else (f(1 / 128), f(sc))
            row = rng.integers(0, L, n).astype(dtype)
            pr = np.where(rng.random(n) < 0.3, rng.integers(0, L, n), row).astype(dtype)
            fin = rng.integers(0, L, n).astype(np.uint8)
            dd = (rng.random(n) * 0.8).astype(np.float32)
            if raw:
                dist = (rng.random(n) * 0.8).astype(np.float32)
                dist[::97] = 0
                dist[5::101] = 3e38
            else:
                dist = rng.integers(0, 256, n).astype(np.uint8)
            mm = rng.integers(0, Jb + 2, n).astype(np.int32)
            # the EMA and bins numpy computes; then make some sixteens UNSURE (a distance at a threshold)
            want_d = np.where(row != pr, reset, dd * m + ((dist.astype(np.float32) * inv128) * scale) * k)
            tie_groups = [3, 17, 40]
            for t in tie_groups:      # d lands exactly on a threshold: choose dd so that the EMA gives one
                j = 16 * t + 5
                pr[j] = row[j]
                dd[j], dist[j] = 0, 0
                want_d[j] = f(0) * m + ((f(0) * inv128) * scale) * k
            want_d = want_d.astype(np.float32)
            bins = np.empty(n, np.int32)
            _quick_bins(want_d, q, top, bins)
            unsure_groups = (bins.reshape(-1, 16) == UNSURE).any(axis=1)
            assert unsure_groups[tie_groups].all() and not unsure_groups.all()
            ok = (row == fin).astype(np.int64)
            keys, want_mm = [], mm.copy()
            for grp in np.flatnonzero(~unsure_groups):
                s = slice(16 * grp, 16 * grp + 16)
                drop = bins[s] < mm[s]
                kk = (2 * bins[s] + ok[s]) | ((2 * mm[s].astype(np.int64) + ok[s]) << 16)
                keys.extend(kk[drop].tolist())
                want_mm[s] = np.minimum(bins[s], mm[s])
            got_pr, got_d, got_mm = pr.copy(), dd.copy(), mm.copy()
            jb = np.full(n, 99, np.int32)
            buf = np.full(n + 32, -7, np.int32)
            flags = np.zeros(n // 16, np.bool_)
            nc = index_steps(row, dist, got_pr, got_d, got_mm, fin, jb, buf[:n], m, k, inv128, scale, reset, q,
                             top, flags)
            same(got_d, want_d, f"EMA raw {raw} L {L}")
            np.testing.assert_array_equal(got_pr, row)
            np.testing.assert_array_equal(flags, unsure_groups)
            np.testing.assert_array_equal(got_mm, want_mm)
            assert nc == len(keys) and (buf[n:] == -7).all()
            np.testing.assert_array_equal(buf[:nc], np.array(keys, np.int32), err_msg=f"raw {raw} L {L}")
            u = np.repeat(unsure_groups, 16)
            np.testing.assert_array_equal(jb[u], bins[u])     # the bins of an UNSURE sixteen, for the caller
            assert (jb[~u] == 99).all()


def _osc_reference(row, pr, ld, fq, le, fre, m, k, tt):
    """`osc_kernel`'s update of one record in numpy (float32, the same operations in the same order)."""
    up, down = row.astype(np.int64) > pr, row.astype(np.int64) < pr
    osc = (up & (ld == -1)) | (down & (ld == 1))
    ld2 = np.where(up, 1, np.where(down, -1, ld)).astype(np.int8)
    f = (fq * k + np.where(osc, m, np.float32(0))).astype(np.float32)
    le2 = (le * k + row.astype(np.float32) * m).astype(np.float32)
    hits = np.flatnonzero(fre & (f > tt))
    return ld2, f, le2, osc, hits


def test_osc_steps_sixteen_at_a_time_equal_the_loop():
    """`_osc_step16` (the oscillation update with its freezes listed) and `_level_osc_step16` (the same, also
    listing the level changes keyed for the level statistics) give what `osc_kernel`'s loop gives, bit for bit:
    directions, frequencies, level EMAs, previous levels, the free weights above the threshold (a tie is not
    above), the changes' positions, levels, previous levels and reversals; nothing written past the lists."""
    from lts_core.analysis.stream_kernels import CHANGE_POS_BITS, LEVEL_BITS
    _, osc_steps, level_osc_steps = _steps16()
    rng = np.random.default_rng(22)
    n = 1024
    m, k = np.float32(0.5), np.float32(0.5)
    for rate in (0.0, 0.05, 0.6):
        row = rng.integers(0, 256, n).astype(np.uint8)
        pr = np.where(rng.random(n) < rate, rng.integers(0, 256, n), row).astype(np.uint8)
        pr[:16] = row[:16] ^ np.uint8(128)        # changes in the high bit
        ld = rng.integers(-1, 2, n).astype(np.int8)
        fq = rng.choice(np.array([0, 0.25, 0.5, 0.75, 1.0], np.float32), n)
        le = (rng.random(n) * 255).astype(np.float32)
        fre = rng.random(n) < 0.7
        tt = np.float32(0.5)                       # 0.5·0.5 + 0.5 = 0.75 > 0.5; 0.5·0.5 + 0.25 … ties at 0.5
        ld2, f, le2, osc, hits = _osc_reference(row, pr, ld, fq, le, fre, m, k, tt)
        assert rate == 0 or (f == tt).any()
        changed = np.flatnonzero(row != pr)
        want_keys = (changed | (row[changed].astype(np.int64) << CHANGE_POS_BITS)
                     | (pr[changed].astype(np.int64) << (CHANGE_POS_BITS + LEVEL_BITS))
                     | (osc[changed].astype(np.int64) << (CHANGE_POS_BITS + 2 * LEVEL_BITS)))
        for fused in (False, True):
            a = [x.copy() for x in (pr, ld, fq, le)]
            hbuf, cbuf = np.full(n + 32, -7, np.int32), np.full(n + 32, -7, np.int32)
            if fused:
                counts = level_osc_steps(row, *a, fre, hbuf[:n], cbuf[:n], m, k, tt)
                nh, ncg = counts & 0xFFFFFFFF, counts >> 32
                assert ncg == changed.size and (cbuf[n:] == -7).all()
                np.testing.assert_array_equal(cbuf[:ncg], want_keys.astype(np.int32))
            else:
                nh = osc_steps(row, *a, fre, hbuf[:n], m, k, tt)
            assert (hbuf[n:] == -7).all()
            np.testing.assert_array_equal(hbuf[:nh], hits, err_msg=f"rate {rate} fused {fused}")
            np.testing.assert_array_equal(a[0], row)
            np.testing.assert_array_equal(a[1], ld2)
            same(a[2], f, "frequency")
            same(a[3], le2, "level EMA")


@pytest.mark.parametrize("schedule,W", [("linear", 6), ("sine", 20)])
def test_index_kernel_equals_numpy_on_a_grid_too_fine_for_keys(schedule, W):
    """A grid whose histogram keys do not fit in 16 bits (2·(J+2) > KEY_LIMIT) takes the moves one weight at a
    time: the same index as the reference."""
    from lts_core.analysis.stream_kernels import KEY_LIMIT
    rng = np.random.default_rng(3)
    R, Bf, Jf = 24, 8192, 16384
    assert 2 * (Jf + 2) > KEY_LIMIT
    steps = np.arange(R)
    lv = levels(rng, R)
    codes = rng.integers(0, 256, lv.shape).astype(np.uint8)
    args = (steps, N_LEVELS, schedule, W, R - 2, 0.5, Bf, Jf, False, None)
    a, b = run_both(IndexPass(*args), RefIndexPass(*args), {"level": lv, "dist": codes}, 5, 64)
    same_tree(a, b, "fine grid")
    assert a[0][Jf, :, -1].sum() > 0


def test_kernels_without_the_compress_instruction(tmp_path):
    """For a CPU without AVX-512 (numba told so with NUMBA_CPU_FEATURES; its own cache), the index kernel
    lists the moves one by one (`drop_keys_scalar`), the level kernel the changes as 64-bit words
    (`list_changed_swar`), the oscillation replay freezes as before, the cache build keeps the level
    statistics and the oscillation replay apart (`fuse_level_osc`), and all still equal the reference."""
    import os
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64-v3", NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               NUMBA_CPU_FEATURES="+64bit,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+bmi,+bmi2")
    check = ("from lts_core.analysis import stream_kernels as k\n"
             "assert not k.HAS_COMPRESS and k.drop_keys is k.drop_keys_scalar\n"
             "assert k.list_changed is k.list_changed_swar\n"
             "from lts_core.analysis.level_osc import fuse_level_osc\n"
             "from lts_core.analysis.level_stats import LevelStatsPass\n"
             "from lts_core.analysis.replay_stream import OscPass\n"
             "ps = [LevelStatsPass(), OscPass([0, 1], 2, 0.5, 0.0, 0.5, 0.5)]\n"
             "assert fuse_level_osc(ps)[0] == ps\n")
    subprocess.run([sys.executable, "-c", check], check=True, env=env)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                    "test_index_kernel_equals_numpy and linear and 0-0-1-1-64 or test_level_kernel or test_osc_kernel"],
                   check=True, env=env)


@pytest.mark.parametrize("seed,first_step,gap,chunk,sub", CASES)
def test_freeze_kernel_equals_numpy(seed, first_step, gap, chunk, sub):
    rng = np.random.default_rng(seed)
    R = 40
    steps = first_step + gap * np.arange(R)
    T = int(steps[-1]) - 3
    lv = levels(rng, R)
    codes = rng.integers(0, 256, lv.shape).astype(np.uint8)
    seen = set()
    for schedule, W, ratio in (("linear", 6, 1.0), ("fixed", 0, 0.3), ("sine", 20, 2.0), ("linear", 6, 0.0)):
        for decay in (0.0, 0.5, 0.99):
            raw = raw_distances(rng, R, steps, schedule, W, T, extreme=decay > 0)
            # ties with the rule's own float32 threshold, as well as with the index's grid
            p = FreezeStepsPass(steps, N_LEVELS, schedule, ratio, W, T, decay, True)
            layer = np.repeat(np.arange(len(SIZES)), SIZES)
            for li, L in enumerate(N_LEVELS):
                active, thr = p.thresholds(L)
                tie = (rng.random(raw.shape) < 0.1) & (layer == li)[None] & active[:, None]
                raw[tie] = np.broadcast_to(thr[:, None], raw.shape)[tie]
            for use_raw, arrays in ((False, {"level": lv, "dist": codes}), (True, {"level": lv, "raw_dist": raw})):
                args = (steps, N_LEVELS, schedule, ratio, W, T, decay, use_raw)
                a, b = run_both(FreezeStepsPass(*args), RefFreezeStepsPass(*args), arrays, chunk, sub)
                same(a, b, f"freeze {schedule} {ratio} decay {decay} raw {use_raw}")
                seen.update(np.unique(a).tolist())
    assert len(seen) > 5      # weights froze at many different steps


@pytest.mark.parametrize("seed,first_step,gap,chunk,sub", CASES)
def test_osc_kernel_equals_numpy(seed, first_step, gap, chunk, sub):
    rng = np.random.default_rng(seed)
    R = 60
    steps = first_step + gap * np.arange(R)
    T = int(steps[-1])
    lv = levels(rng, R, p_move=0.5)
    # decay 0.5 and a constant threshold 0.5: the frequency hits 0.5 exactly (a tie: no freeze) and 0.75 after
    for decay, thr_start, thr_end in ((0.5, 0.5, 0.5), (0.25, 0.3, 0.01), (0.01, 0.1, 0.01)):
        for watch in (None, [True, False, True, True, False]):
            args = (steps, T, decay, 0.2, thr_start, thr_end, watch)
            a, b = run_both(OscPass(*args), RefOscPass(*args), {"level": lv}, chunk, sub)
            same_tree(a, b, f"osc decay {decay} watch {watch}")
            assert (a["freeze_steps"] >= 0).any()
    # the tie: some weight's frequency was exactly 0.5 at an active record and did not freeze there
    p = OscPass(steps, T, 0.5, 0.0, 0.5, 0.5)
    freq = np.zeros(lv.shape[1], np.float32)
    last = np.zeros(lv.shape[1], np.int64)
    tie = False
    for r in range(1, R):
        d = np.sign(lv[r].astype(int) - lv[r - 1])
        osc = (last * d == -1)
        last = np.where(d != 0, d, last)
        freq = freq * np.float32(0.5) + osc.astype(np.float32) * np.float32(0.5)
        tie |= bool((freq == np.float32(0.5)).any()) and p.thr[r] == 0.5
    assert tie


@pytest.mark.parametrize("seed,first_step,gap,chunk,sub", CASES)
def test_level_kernel_equals_numpy(seed, first_step, gap, chunk, sub):
    rng = np.random.default_rng(seed)
    R = 50
    lv = levels(rng, R, p_move=0.4)
    a, b = run_both(LevelStatsPass(), RefLevelStatsPass(), {"level": lv}, chunk, sub)
    same_tree(a, b, "levels")
    assert a.reversals.sum() > 0 and (a.settle_record == 0).sum() > 0 and a.occupancy[0, -1, 255] > 0
    # resumed from the statistics of the first chunks (a live run), on two threads
    first = ArraySource({"level": lv}, SIZES, chunk)
    n_first = first.chunk_sizes[0] if len(first.chunk_sizes) > 1 else 0
    if n_first:
        (old,) = run_passes(ArraySource({"level": lv[:n_first]}, SIZES, chunk), [LevelStatsPass()],
                            sub_cols=sub)
        a, b = run_both(LevelStatsPass(old), RefLevelStatsPass(old), {"level": lv}, chunk, sub,
                        executor=thread_executor(2), first_chunk=1)
        same_tree(a, b, "levels resumed")


def test_level_kernel_finds_rare_changes():
    """Rare changes, as in a late QAT run (the kernel lists them sixteen weights at a time, or eight as one
    64-bit word): full blocks of 1,024 weights whose words mostly do not change, words with one to eight
    changed bytes, and byte values that differ in the high bit only (127 ↔ 128, 0 ↔ 255), at any column offset
    of the task's chunks."""
    rng = np.random.default_rng(11)
    sizes, R = [5000, 3001], 30
    lv = np.empty((R, sum(sizes)), np.uint8)
    lv[0] = rng.integers(0, 256, lv.shape[1])
    for r in range(1, R):
        row = lv[r - 1].copy()
        moved = rng.random(row.size) < 0.004
        row[moved] = rng.integers(0, 256, int(moved.sum()))
        lv[r] = row
    lv[::2, 1000:1008] = 127     # a whole word of high-bit-only changes every record
    lv[1::2, 1000:1008] = 128
    lv[3::4, 2001] = 255         # 0 ↔ 255 in one byte of a word
    lv[1::4, 2001] = 0
    assert (lv[1:] != lv[:-1]).mean() < 0.01
    for task_cols, sub in ((4096, 1 << 17), (3000, 1029)):
        src = ArraySource({"level": lv}, sizes, 7)
        kw = {"task_cols": task_cols, "sub_cols": sub}
        (a,) = run_passes(src, [LevelStatsPass()], **kw)
        (b,) = run_passes(src, [RefLevelStatsPass()], **kw)
        same_tree(a, b, f"tasks of {task_cols}")
        assert a.flips[1000:1008].tolist() == [R - 1] * 8 and a.reversals[1000] == R - 2


def test_kernels_follow_strided_columns_of_one_wide_chunk():
    """A sub-block is a column range of the task's chunk arrays: results do not depend on where it starts."""
    rng = np.random.default_rng(7)
    lv = levels(rng, 12)
    for sub in (1, 2, 31, 1000):
        a, b = run_both(LevelStatsPass(), RefLevelStatsPass(), {"level": lv}, 12, sub)
        same_tree(a, b, f"sub {sub}")


def test_the_first_view_of_a_cached_run_does_not_import_numba(tmp_path):
    """What the Settling and Sweep pages load on first view comes from the run's cache/, without a kernel."""
    from lts_core.analysis import build_cache
    from test_replay_stream import make_run
    run = make_run(tmp_path)
    build_cache(run)
    code = ("import sys\n"
            "from lts_core.store import open_run\n"
            "from lts_core.analysis import cached_oscillation_summary, cached_replay_index, cached_settle_summary\n"
            "from lts_core.analysis.summaries import run_settings\n"
            f"run = open_run({str(tmp_path / 'r')!r})\n"
            "from lts_core.analysis import summaries, stream\n"
            "stream.run_passes = None   # a pass would fail: everything comes from the cache\n"
            "summaries.run_passes = None\n"
            "s = cached_settle_summary(run); i = cached_replay_index(run, **run_settings(run))\n"
            "o = cached_oscillation_summary(run); i.sweep()\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numba_is_imported_only_when_a_kernel_runs():
    code = ("import sys, numpy as np\n"
            "import lts_core, lts_core.analysis\n"
            "from lts_core.analysis import replay_stream, level_stats, stream, summaries\n"
            "assert 'numba' not in sys.modules, 'imported with the modules'\n"
            "from lts_core.analysis.stream import ArraySource, run_passes\n"
            "run_passes(ArraySource({'level': np.zeros((3, 10), np.uint8)}), [level_stats.LevelStatsPass()])\n"
            "assert 'numba' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_references_byte_pair_bincount():
    """The reference's occupancy counts (uint8 values counted as byte pairs) equal np.bincount's."""
    rng = np.random.default_rng(0)
    for n in (3, 4096, 10_000, 10_001):
        x = rng.integers(0, 256, n).astype(np.uint8)
        np.testing.assert_array_equal(bincount_u8(x), np.bincount(x, minlength=256))
