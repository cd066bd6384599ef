"""The streamed analyses' per-chunk kernels, compiled with numba (`lts_core.jit`): one loop over the weights of
a sub-block, the chunk's records inside it, the state kept in registers and updated in place, no temporaries.

Each kernel is the fused form of the numpy code that defined it (kept as the tested reference in
tests/stream_reference.py): the same float32 operations in the same order, float32 constants passed in (never
a float64 literal), no fastmath, so every result is bit for bit the reference's. Per-record parameters (EMA
decays, thresholds, which records count) are computed once per pass in Python and passed as small arrays.

`index_kernel`, `osc_kernel` and `level_kernel` return the largest level they read (`_row_max` on each row they
load), which their workers check against the layer's range (`Pass.checks_levels`).

Two steps are written in LLVM IR (`_drop_keys16`, the index's movers, and `_changed16`, the weights whose level
changed, sixteen at a time with a compress-store), as numba has no vector types; they are used where numba
compiles for AVX-512 (`HAS_COMPRESS`), plain loops elsewhere. numba's cache notices changes to this file only,
so helpers of these kernels stay in it.

Arguments shared by the kernels: `lv` (and `dist`) are a chunk's [records, task columns] arrays (C order); the
sub-block is their columns `c0 … c0+n`; `rec0` is the run's record index of their row 0; per-weight state arrays
are the sub-block's slices (length n); per-record arrays are indexed by the run's record index.

This module imports numba: import it only where a pass runs (the workers' constructors), never at
`import lts_core` or on an app page's first view.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from ..jit import kernel

# EMA modes per record (`ema_modes`; the kernels test them as the literals 0 … 3)
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


BLOCK = 1024    # weights whose state a kernel keeps in the L1 cache while it follows them through a group's records


@kernel
def _row_max(row, mx):
    """max(mx, the largest value of `row`): the level check of a kernel that has just loaded the row (it is in
    L1). The max runs in the row's own type (uint8: 32 values per vector instruction; widened to int64 per value
    it cost 2-5 % of the index kernel) and is widened once."""
    if row.size == 0:
        return mx
    m = row[0]
    for j in range(1, row.size):
        v = row[j]
        m = v if v > m else m
    m64 = np.int64(m)
    return m64 if m64 > mx else mx


@kernel
def _ema_block(mode, m, k, reset, inv128, scale, lv, dist, prev, d):
    """One record of the EMA for a block of weights (their level, distance, previous level and EMA slices):
    x = dist·inv128·scale (codes: /128 then × the layer's step; raw distances: × 1 × 1, exact); UPDATE:
    d = d·m + x·k, then `reset` where the level changed; START(_RESET): d = x (then the reset); always
    prev = level. Branch-free loops the compiler vectorises."""
    n = lv.size
    if mode == 3:
        for j in range(n):
            cur = lv[j]
            v = d[j] * m + (np.float32(dist[j]) * inv128) * scale * k
            d[j] = reset if cur != prev[j] else v
            prev[j] = cur
    elif mode == 0:
        for j in range(n):
            prev[j] = lv[j]
    else:
        for j in range(n):
            cur = lv[j]
            x = (np.float32(dist[j]) * inv128) * scale
            d[j] = reset if mode == 2 and cur != prev[j] else x
            prev[j] = cur


@kernel
def _exact_bin(x, q_scale, top, g, sc, bf, J):
    """The grid bin of a distance x (`replay.grid_bins`: the smallest j with x ≤ thr_j, J+1 where none, with
    thr_j = fl32(sc·((j/B)·g)), the same double operations as `IndexPass.bins`' table): ceil(x·B/(g·scale)) in
    float32 clamped to 0 … J+1, then −1 where thr_{bin−1} ≥ x and +1 where thr_bin < x, the two thresholds
    computed rather than looked up (no gather: a loop of these vectorises). For g > 0 and a finite q_scale;
    NaN lands in J+1 (never a candidate)."""
    zero = np.float32(0)
    y = np.ceil(x * q_scale)
    y = y if y < top else top       # NaN → top
    y = y if y > zero else zero
    jt = np.int32(y)
    lo = np.float32(sc * ((np.float64(jt - 1) / bf) * g))
    jt -= np.int32((jt >= 1) & (lo >= x))
    hi = np.float32(sc * ((np.float64(jt) / bf) * g))
    jt += np.int32((jt <= J) & (hi < x))
    return jt


@kernel
def _block_bins(dd, q_scale, top, g, sc, bf, J, jb):
    """jb[j] = `_exact_bin(dd[j])` for a whole block (vectorised: eight doubles at a time)."""
    for j in range(dd.size):
        jb[j] = _exact_bin(dd[j], q_scale, top, g, sc, bf, J)


UNSURE = -1                 # `_quick_bins`' mark of a distance too close to a threshold for float32 to decide
SURE_MARGIN = np.float32(4e-7)


@kernel
def _quick_bins(dd, q_scale, top, jb):
    """jb[j] = the grid bin of dd[j] (`_exact_bin`) where float32 alone decides it, else UNSURE; returns the
    number of UNSURE. With u = fl32(d·q_scale), the bin is ceil(u) when u is at least η = 4e-7·(u+1) from both
    integers around it, and J+1 when u ≥ J+1. Why that is exact: u = r·(1+δ) with r = d·B/(g·scale) and
    |δ| ≤ 1.2e-7 (q_scale and the product each rounded to float32), and thr_j = (j/B)·g·scale·(1+δ') with
    |δ'| ≤ 6.1e-8 (rounded to float32 once, the doubles' own errors ~1e-16); so d ≤ thr_j ⟺ r ≤ j·(1+δ'),
    decided for j = k−1 and j = k = ceil(u) whenever u is further than about 1.9e-7·k from them (η is twice
    that). Distances at a threshold (ties), 0, negative, NaN: UNSURE. Float32 operations only, vectorised
    sixteen at a time (`_block_bins` needs eight double operations per weight: 0.8 ns of the index kernel's
    2.2 per weight-record, BENCHMARKS.md "Session 8")."""
    zero, one = np.float32(0), np.float32(1)
    J1 = np.int32(top)
    n_unsure = 0
    for j in range(dd.size):
        u = dd[j] * q_scale
        k = np.ceil(u)
        f = k - u                                  # exact for u ≥ 1 (Sterbenz), within 6e-8 below
        eta = (u + one) * SURE_MARGIN
        sure = (f >= eta) & (f <= one - eta) & (k >= one) & (k <= top)
        kc = k if k < top else top                 # (a defined conversion for NaN and huge u)
        kc = kc if kc > zero else zero
        b = np.int32(kc) if sure else (J1 if u >= top else np.int32(UNSURE))
        jb[j] = b
        n_unsure += b < 0
    return n_unsure


UNSURE_MAX = 64     # more UNSURE in a block (many distances at thresholds): `_block_bins` for the whole block


@kernel
def _candidate_bins(dd, cand, nc, e, g, q_scale, top, jb):
    """The general case of `_block_bins` (any gain, any q_scale), for the candidates only: jb[cand[q]] = the
    grid bin of dd[cand[q]] by table look-ups (ext), as `replay.grid_bins` computes it."""
    zero = np.float32(0)
    for q in range(nc):
        j = cand[q]
        x = dd[j]
        if g <= 0:
            jb[j] = 0 if x <= 0 else np.int32(top)
        else:
            jt = np.int32(max(min(np.ceil(x * q_scale), top), zero))
            if jt > 0 and e[jt] >= x:    # (jt > 0: −inf, a damaged run's distance, stays in bin 0)
                jt -= 1
            if e[jt + 1] < x:
                jt += 1
            jb[j] = jt


# ---- lists of weights, sixteen at a time ------------------------------------------------------------------------
# A kernel that updates some weights of a block (the index: those whose bin drops, about half the weight-records
# of a run whose threshold grows; the level statistics: those whose level changed, a few %) first lists them.
# One weight at a time (`out[nc] = j; nc += test`) that took a fifth of the index kernel, and its moves then
# loaded each weight's bin, minimum, level and final level again (0.75 of its 1.3 ns per weight-record in all).
# With AVX-512's `vpcompressd` (`_compress_append`) a vector compare selects sixteen weights at a time and what
# they need is stored contiguously: `drop_keys` stores the index's two histogram keys per mover, `list_changed`
# the positions of the changed levels. numba has no vector types, so those steps are intrinsics in LLVM IR.

KEY_LIMIT = 1 << 15   # histogram keys 2·bin + (at the final level) below this: two of them in an int32


def _target_has_avx512f() -> bool:
    """Whether numba compiles for a CPU with AVX-512F (the target machine's features: the host's, or
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES where set). Without it LLVM lowers the compress-store into a branch
    per lane, slower than the plain loops, so `drop_keys` and `list_changed` are then those."""
    try:
        from numba.core.registry import cpu_target
        codegen = cpu_target.target_context.codegen()
        features = getattr(codegen, "_tm_features", None) or codegen._get_host_cpu_features()
        return "+avx512f" in str(features).split(",")
    except Exception:   # pragma: no cover - a numba without these internals: the scalar loop, always correct
        return False


HAS_COMPRESS = _target_has_avx512f()
LANES = 16


def _element_ptr(context, builder, arrty, arr, at):
    """Emit: the address of arr[at] (a 1-d numba array of type `arrty`, `at` an i64)."""
    return builder.gep(cgutils.create_struct_proxy(arrty)(context, builder, value=arr).data, [at])


def _compress_append(builder, values, mask, dst, nc):
    """Emit: the int32 lanes of `values` where `mask` is set, stored contiguously from `dst` (an i32 pointer,
    &out[nc]); returns nc (i64) + their number.
    With AVX-512: `vpcompressd` into a register, then a store of all sixteen lanes (the lanes past the selected
    ones are scratch: callers store at out[nc] with nc ≤ j and j + 16 ≤ n, so inside out[:n]); the memory form
    of `vpcompressd`, which LLVM's generic compress-store becomes, is microcoded and slow on some CPUs (AMD
    Zen 4). Without AVX-512 (only where a test calls the vector form) the generic `llvm.masked.compressstore`."""
    vec, i32 = values.type, ir.IntType(32)
    bits = ir.VectorType(ir.IntType(1), LANES)
    if HAS_COMPRESS:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, bits]),
                                            f"llvm.x86.avx512.mask.compress.v{LANES}i32")
        packed = builder.call(fn, [values, ir.Constant(vec, [0] * LANES), mask])
        builder.store(packed, builder.bitcast(dst, vec.as_pointer()), align=4)
    else:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [vec, i32.as_pointer(), bits]), f"llvm.masked.compressstore.v{LANES}i32")
        builder.call(fn, [values, builder.bitcast(dst, i32.as_pointer()), mask])
    word = ir.IntType(LANES)
    ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(word, [word]), f"llvm.ctpop.i{LANES}")
    return builder.add(nc, builder.zext(builder.call(ctpop, [builder.bitcast(mask, word)]), ir.IntType(64)))


@intrinsic
def _drop_keys16(typingctx, jb, mm, row, fin, j0, out, nc):
    """Weights j0 … j0+15: key = (2·jb+ok) | (2·mm+ok) << 16 with ok = (row == fin); where jb < mm the key is
    stored at out[nc], out[nc+1] … (ascending j) and mm = jb; returns nc + their number. jb, mm, out: 1-d int32
    arrays; row, fin: 1-d integer arrays (levels); the sixteen weights and out[nc:nc+16] must exist (all
    sixteen lanes are written, those past the selected ones as scratch)."""
    ints = (jb, mm, out)
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.int32 for a in ints):
        return None
    if not all(isinstance(a, types.Array) and a.ndim == 1 and isinstance(a.dtype, types.Integer) for a in (row, fin)):
        return None
    sig = types.int64(jb, mm, row, fin, types.int64, out, types.int64)

    def codegen(context, builder, signature, args):
        jb_, mm_, row_, fin_, j0_, out_, nc_ = args
        tys = signature.args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v32, v64 = ir.VectorType(i32, LANES), ir.VectorType(i64, LANES)

        def ptr(k, arr, at):
            return _element_ptr(context, builder, tys[k], arr, at)

        def load(k, arr):
            elem = context.get_data_type(tys[k].dtype)
            vec = ir.VectorType(elem, LANES)
            v = builder.load(builder.bitcast(ptr(k, arr, j0_), vec.as_pointer()), align=1)
            return builder.sext(v, v64) if tys[k].dtype.signed else builder.zext(v, v64)

        p_jb = builder.bitcast(ptr(0, jb_, j0_), v32.as_pointer())
        p_mm = builder.bitcast(ptr(1, mm_, j0_), v32.as_pointer())
        jt, old = builder.load(p_jb, align=4), builder.load(p_mm, align=4)
        ok = builder.zext(builder.icmp_unsigned("==", load(2, row_), load(3, fin_)), v32)
        one = ir.Constant(v32, [1] * LANES)
        new_key = builder.add(builder.shl(jt, one), ok)
        old_key = builder.add(builder.shl(old, one), ok)
        key = builder.or_(new_key, builder.shl(old_key, ir.Constant(v32, [16] * LANES)))
        drop = builder.icmp_signed("<", jt, old)
        builder.store(builder.select(drop, jt, old), p_mm, align=4)
        return _compress_append(builder, key, drop, ptr(5, out_, nc_), nc_)

    return sig, codegen


@kernel
def drop_keys_vector(jb, mm, row, fin, n, out):
    """The weights j < n whose bin jb[j] drops below their running minimum mm[j]: out[:nc] = their histogram
    keys (2·jb+ok) | (2·mm+ok) << 16, ok = row[j] == fin[j], in ascending j; mm = min(mm, jb). Returns nc.
    Sixteen weights at a time (`_drop_keys16`), the last n mod 16 one by one. Keys must be < `KEY_LIMIT`."""
    nc = 0
    j = 0
    while j + LANES <= n:
        nc = _drop_keys16(jb, mm, row, fin, j, out, nc)
        j += LANES
    return _drop_keys_tail(jb, mm, row, fin, j, n, out, nc)


@kernel
def _drop_keys_tail(jb, mm, row, fin, j0, n, out, nc):
    """`drop_keys` for the weights j0 … n−1, one at a time, appending at out[nc]; returns the new nc."""
    for j in range(j0, n):
        jt, o = jb[j], mm[j]
        ok = np.int32(row[j] == fin[j])
        out[nc] = np.int32((2 * jt + ok) | ((2 * o + ok) << 16))
        drop = jt < o
        nc += drop
        mm[j] = jt if drop else o
    return nc


@kernel
def drop_keys_scalar(jb, mm, row, fin, n, out):
    """`drop_keys_vector` one weight at a time, branch-free."""
    return _drop_keys_tail(jb, mm, row, fin, 0, n, out, 0)


drop_keys = drop_keys_vector if HAS_COMPRESS else drop_keys_scalar


@intrinsic
def _changed16(typingctx, a, b, j0, out, nc):
    """out[nc:nc+k] = the positions j of j0 … j0+15 (ascending) where a[j] != b[j]; returns nc + k. a, b: 1-d
    arrays of one integer type; out: 1-d int32 with out[nc:nc+16] (all sixteen lanes are written, those past
    the selected ones as scratch)."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array) and a.ndim == b.ndim == 1
            and a.dtype == b.dtype and isinstance(a.dtype, types.Integer)):
        return None
    if not (isinstance(out, types.Array) and out.ndim == 1 and out.dtype == types.int32):
        return None
    sig = types.int64(a, b, types.int64, out, types.int64)

    def codegen(context, builder, signature, args):
        a_, b_, j0_, out_, nc_ = args
        tys = signature.args
        i32 = ir.IntType(32)
        v32 = ir.VectorType(i32, LANES)
        vec = ir.VectorType(context.get_data_type(tys[0].dtype), LANES)

        def ptr(k, arr, at):
            return _element_ptr(context, builder, tys[k], arr, at)

        va = builder.load(builder.bitcast(ptr(0, a_, j0_), vec.as_pointer()), align=1)
        vb = builder.load(builder.bitcast(ptr(1, b_, j0_), vec.as_pointer()), align=1)
        changed = builder.icmp_unsigned("!=", va, vb)
        first = builder.insert_element(ir.Constant(v32, ir.Undefined), builder.trunc(j0_, i32), ir.Constant(i32, 0))
        positions = builder.add(builder.shuffle_vector(first, ir.Constant(v32, ir.Undefined),
                                                       ir.Constant(v32, [0] * LANES)),
                                ir.Constant(v32, list(range(LANES))))
        return _compress_append(builder, positions, changed, ptr(3, out_, nc_), nc_)

    return sig, codegen


@kernel
def list_changed_vector(row, pr, words, out):
    """out[:nc] = the j with row[j] != pr[j], ascending; returns nc. Sixteen weights at a time (`_changed16`),
    the last n mod 16 one by one. (`words`: the SWAR form's scratch, unused.)"""
    n = row.size
    nc = 0
    j = 0
    while j + LANES <= n:
        nc = _changed16(row, pr, j, out, nc)
        j += LANES
    for q in range(j, n):
        out[nc] = q
        nc += row[q] != pr[q]
    return nc


LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)   # per byte of a word: the low seven bits …
HIGH = np.uint64(0x8080808080808080)   # … and the high bit


@kernel
def list_changed_swar(row, pr, words, out):
    """`list_changed_vector` without a compress instruction, for one-byte levels: the row and the previous
    levels are read as 64-bit words, the words that differ are listed without branches (into `words`, int32
    [≥ n/8]), then each differing byte of those words (a SWAR mask: the high bit of each nonzero byte, taken
    lowest first); the last n mod 8 weights one by one."""
    n = row.size
    nw = n // 8
    r64, p64 = row[:8 * nw].view(np.uint64), pr[:8 * nw].view(np.uint64)
    nw_changed = 0
    for w in range(nw):              # the words with a change, without branches
        words[nw_changed] = w
        nw_changed += r64[w] != p64[w]
    nc = 0
    for q in range(nw_changed):      # their changed bytes, lowest first
        w = words[q]
        x = r64[w] ^ p64[w]
        mask = (((x & LOW7) + LOW7) | x) & HIGH
        while mask:
            out[nc] = 8 * w + (trailing_zeros(mask) >> 3)
            nc += 1
            mask &= mask - np.uint64(1)
    for j in range(8 * nw, n):
        out[nc] = j
        nc += row[j] != pr[j]
    return nc


list_changed = list_changed_vector if HAS_COMPRESS else list_changed_swar


@kernel
def index_kernel(lv, dist, c0, n, rec0, inv128, scale, reset, mode, m32, k32, eligible, gain, qscale, ext, top,
                 sc, bf, prev, d, M, final, counts, tick, cand, jb):
    """`IndexPass`: the EMA, then per eligible record each weight whose distance is ≤ the threshold of bin M−1
    (its bin drops) moves to its grid bin (`replay.grid_bins`); counts[rec] gets +1 at the new bin and −1 at
    the old, tick the same for weights at their final level. ext float32 [R, J+3] (−inf, the record's
    thresholds, +inf), gain float64 [R], qscale float32 [R] (B / (gain·scale)), top = J+1 (the overflow bin)
    as float32, sc = 1/(L−1) and bf = B as float64 (the thresholds' own operands); cand, jb int32 [≥ BLOCK]
    scratch. Blocks of `BLOCK` weights, the group's records inside: the EMA and the grid bins of the whole
    block vectorised (`_quick_bins`, exact where float32 cannot decide: `_exact_bin`, `_block_bins`; a weight
    moves exactly when its bin is below M, as the bin is the smallest with d ≤ its threshold), the movers'
    histogram keys 2·bin + (at its final level), old and new, listed sixteen at a time (`drop_keys`), then
    added one by one into one histogram per record (unsigned indices: no negative-index checks). A grid too
    fine for the keys (2·(J+2) > KEY_LIMIT) lists the movers' positions instead, branch-free, and keys them
    one by one. Records with gain ≤ 0 or an infinite q_scale test d ≤ ext[M] and look the bins up
    (`_candidate_bins`)."""
    NB = counts.shape[1]
    J = np.int32(NB - 2)
    rows = lv.shape[0]
    h = np.zeros((rows, 2 * NB), np.int32)    # per record: +1/−1 at 2·bin + (at its final level)
    h_used = np.zeros(rows, np.bool_)
    keyed = 2 * NB <= KEY_LIMIT     # the histogram keys fit the moves' words
    mx = np.int64(0)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        pr, dd, mm, fin = prev[b0:b1], d[b0:b1], M[b0:b1], final[b0:b1]
        jbb = jb[:b1 - b0]
        for i in range(rows):
            rec = rec0 + i
            md = mode[rec]
            row = lv[i, c0 + b0:c0 + b1]
            mx = _row_max(row, mx)
            _ema_block(md, m32[rec], k32[rec], reset, inv128, scale, row, dist[i, c0 + b0:c0 + b1], pr, dd)
            if md == 0 or not eligible[rec]:
                continue
            h_used[i] = True
            g, q_scale = gain[rec], qscale[rec]
            nc = 0
            if g > 0 and np.isfinite(q_scale):
                n_unsure = _quick_bins(dd, q_scale, top, jbb)
                if n_unsure > UNSURE_MAX:
                    _block_bins(dd, q_scale, top, g, sc, bf, J, jbb)
                elif keyed and n_unsure:     # the keys need every bin exact
                    for j in range(b1 - b0):
                        if jbb[j] < 0:
                            jbb[j] = _exact_bin(dd[j], q_scale, top, g, sc, bf, J)
                if keyed:                    # the moves from their keys (`drop_keys`)
                    nc = drop_keys(jbb, mm, row, fin, b1 - b0, cand)
                    hr = h[i]
                    for q in range(nc):
                        key = cand[q]
                        hr[np.uint64(key & 0xFFFF)] += 1
                        hr[np.uint64(key >> 16)] -= 1
                    continue
                for j in range(b1 - b0):     # branch-free compaction of the weights whose bin drops (or UNSURE)
                    cand[nc] = j
                    nc += jbb[j] < mm[j]
            else:
                e = ext[rec]
                for j in range(b1 - b0):
                    cand[nc] = j
                    nc += dd[j] <= e[mm[j]]
                _candidate_bins(dd, cand, nc, e, g, q_scale, top, jbb)
            hr = h[i]
            for q in range(nc):          # the histogram moves: +1 at the new bin, −1 at the old
                j = np.uint64(cand[q])
                jt = jbb[j]
                if jt < 0:               # UNSURE (rare): the exact bin, which may not drop after all
                    jt = _exact_bin(dd[j], q_scale, top, g, sc, bf, J)
                    if jt >= mm[j]:
                        continue
                ok = np.uint64(row[j] == fin[j])
                hr[np.uint64(2 * jt) + ok] += 1
                hr[np.uint64(2 * mm[j]) + ok] -= 1
                mm[j] = jt
    for i in range(rows):      # per bin (all, at the final level) → counts and tick
        if h_used[i]:
            for b in range(NB):
                counts[rec0 + i, b] += h[i, 2 * b] + h[i, 2 * b + 1]
                tick[b] += h[i, 2 * b + 1]
    return mx


@kernel
def freeze_kernel(lv, dist, c0, n, rec0, inv128, scale, reset, mode, m32, k32, active, thr, steps, prev, d,
                  freeze, free):
    """`FreezeStepsPass`: the EMA, then at each active record (ρ ≥ 0) a free weight with distance ≤ thr[rec]
    freezes at steps[rec]. Blocks of `BLOCK` weights, the group's records inside, branch-free; a block whose
    weights are all frozen is skipped (their EMA is not needed any more)."""
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        pr, dd, fz, fr = prev[b0:b1], d[b0:b1], freeze[b0:b1], free[b0:b1]
        if not fr.any():
            continue
        for i in range(lv.shape[0]):
            rec = rec0 + i
            md = mode[rec]
            _ema_block(md, m32[rec], k32[rec], reset, inv128, scale, lv[i, c0 + b0:c0 + b1],
                       dist[i, c0 + b0:c0 + b1], pr, dd)
            if md != 0 and active[rec]:
                t = thr[rec]
                st = steps[rec]
                for j in range(b1 - b0):
                    hit = fr[j] and dd[j] <= t
                    fz[j] = st if hit else fz[j]
                    fr[j] = fr[j] and not hit


@kernel
def osc_kernel(lv, c0, n, rec0, m, k, active, thr, steps, freq, level_ema, prev, last_dir, fs, flevel, free,
               new_by_record):
    """`OscPass`: per record the direction of the level change, an oscillation where it is opposite to the
    last change, freq = freq·(1−m) + osc·m and level_ema = level_ema·(1−m) + level·m (float32; record 0 sets
    level_ema = level); at an active record a free weight with freq > thr[rec] freezes at steps[rec] on
    rint(level_ema) (half to even). Blocks of `BLOCK` weights, the group's records inside. The updates are
    branch-free and in the weights' own widths (uint8 and int8 comparisons, bool logic: vectorised), and the
    same loop tells whether any free weight of the block crosses the threshold; only then are they frozen, in
    a second branch-free loop."""
    zero = np.float32(0)
    up1, down1 = np.int8(1), np.int8(-1)
    mx = np.int64(0)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        fq, le, pr, ld = freq[b0:b1], level_ema[b0:b1], prev[b0:b1], last_dir[b0:b1]
        fss, flv, fre = fs[b0:b1], flevel[b0:b1], free[b0:b1]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            row = lv[i, c0 + b0:c0 + b1]
            mx = _row_max(row, mx)
            t = thr[rec]
            hit = False
            if rec == 0:
                for j in range(b1 - b0):
                    le[j] = np.float32(row[j])
                    pr[j] = row[j]
                    hit |= fre[j] & (fq[j] > t)
            else:
                tt = t if active[rec] else np.float32(np.inf)     # (never crossed where freezing is off)
                for j in range(b1 - b0):
                    cur = row[j]
                    p = pr[j]
                    up = cur > p
                    down = cur < p
                    last = ld[j]
                    osc = (up & (last == down1)) | (down & (last == up1))     # opposite to the last change
                    ld[j] = up1 if up else (down1 if down else last)
                    f = fq[j] * k + (m if osc else zero)
                    fq[j] = f
                    hit |= fre[j] & (f > tt)
                    le[j] = le[j] * k + np.float32(cur) * m
                    pr[j] = cur
            if active[rec] and hit:      # (branch-free: vectorised; a few % of the block freeze at once)
                st = steps[rec]
                n_new = 0
                for j in range(b1 - b0):
                    c = fre[j] & (fq[j] > t)
                    fss[j] = st if c else fss[j]
                    flv[j] = np.int16(np.rint(le[j])) if c else flv[j]
                    fre[j] = fre[j] ^ c         # (c implies fre[j])
                    n_new += c
                new_by_record[rec] += n_new
    return mx


@kernel
def level_kernel(lv, c0, n, rec0, first, prev, last_change, flips, reversals, last_dir, occ):
    """`LevelStatsPass`: per weight and record, a level change counts a flip, sets the settle record, counts a
    reversal when opposite to the weight's previous change; occ[rec − first] gets +1 at the new level and −1 at
    the old (record 0: +1 at every level). Blocks of `BLOCK` weights (their state in L1), the group's records
    inside. A level changes at a few % of the weight-records, so the changed weights are listed first
    (`list_changed`: sixteen at a time with a compress-store, or eight at a time as 64-bit words), then
    updated one by one, branch-free."""
    cand = np.empty(BLOCK, np.int32)
    words = np.empty(BLOCK // 8, np.int32)
    mx = np.int64(0)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        nb = b1 - b0
        pr, lc, fl, rv, ld = prev[b0:b1], last_change[b0:b1], flips[b0:b1], reversals[b0:b1], last_dir[b0:b1]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            row = lv[i, c0 + b0:c0 + b1]
            mx = _row_max(row, mx)
            if rec == 0:
                for j in range(nb):
                    occ[0, row[j]] += 1
                    pr[j] = row[j]
                continue
            nc = list_changed(row, pr, words, cand)
            o = occ[rec - first]
            r32 = np.int32(rec)
            for q in range(nc):
                j = cand[q]
                cur = row[j]
                p = pr[j]
                direction = np.int8(cur > p) - np.int8(cur < p)
                fl[j] += 1
                lc[j] = r32
                rv[j] += ld[j] == -direction
                ld[j] = direction
                o[cur] += 1
                o[p] -= 1
                pr[j] = cur
    return mx


__all__ = ["BLOCK", "BEFORE", "START", "START_RESET", "UPDATE", "ema_modes", "index_kernel", "freeze_kernel", "osc_kernel",
           "level_kernel", "HAS_COMPRESS", "KEY_LIMIT", "drop_keys", "list_changed"]
