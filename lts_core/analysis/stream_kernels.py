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


def _splat(builder, value, lanes=LANES):
    """Emit: a vector of `lanes` copies of the scalar `value`."""
    vec = ir.VectorType(value.type, lanes)
    first = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32),
                                                                                                   lanes), [0] * lanes))


def _load_ints(context, builder, arrty, arr, at, wide):
    """Emit: arr[at:at+16] (a 1-d integer array) as a vector of `wide` integers, sign- or zero-extended as its
    type is signed or not."""
    elem = context.get_data_type(arrty.dtype)
    v = builder.load(builder.bitcast(_element_ptr(context, builder, arrty, arr, at),
                                     ir.VectorType(elem, LANES).as_pointer()), align=1)
    if elem.width == wide.width:
        return v
    vw = ir.VectorType(wide, LANES)
    return builder.sext(v, vw) if arrty.dtype.signed else builder.zext(v, vw)


def _lane_width(*arrtys):
    """The integer width in which levels of these array types compare as numba compares them: 32 bits when all
    fit in 16, else 64."""
    return ir.IntType(32 if all(a.dtype.bitwidth <= 16 for a in arrtys) else 64)


def _emit_drop_keys(builder, jt, p_mm, ok, dst, nc):
    """Emit `drop_keys` for sixteen weights whose bins are the int32 vector `jt`, running minima at `p_mm`
    (<16 x i32>*) and at-final-level flags `ok` (<16 x i1>): the new minimum stored, the movers' keys appended
    at `dst` (&out[nc]); returns nc + their number."""
    v32 = jt.type
    old = builder.load(p_mm, align=4)
    ok32 = builder.zext(ok, v32)
    one = ir.Constant(v32, [1] * LANES)
    new_key = builder.add(builder.shl(jt, one), ok32)
    old_key = builder.add(builder.shl(old, one), ok32)
    key = builder.or_(new_key, builder.shl(old_key, ir.Constant(v32, [16] * LANES)))
    drop = builder.icmp_signed("<", jt, old)
    builder.store(builder.select(drop, jt, old), p_mm, align=4)
    return _compress_append(builder, key, drop, dst, nc)


def _int32_vector_ptr(context, builder, arrty, arr, at):
    return builder.bitcast(_element_ptr(context, builder, arrty, arr, at),
                           ir.VectorType(ir.IntType(32), LANES).as_pointer())


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
        wide = _lane_width(tys[2], tys[3])
        jt = builder.load(_int32_vector_ptr(context, builder, tys[0], jb_, j0_), align=4)
        ok = builder.icmp_unsigned("==", _load_ints(context, builder, tys[2], row_, j0_, wide),
                                   _load_ints(context, builder, tys[3], fin_, j0_, wide))
        return _emit_drop_keys(builder, jt, _int32_vector_ptr(context, builder, tys[1], mm_, j0_), ok,
                               _element_ptr(context, builder, tys[5], out_, nc_), nc_)

    return sig, codegen


@intrinsic
def _index_step16(typingctx, row, dist, pr, dd, mm, fin, jb, j0, out, nc, m, k, inv128, scale, reset, q_scale,
                  top):
    """One UPDATE record of the index for weights j0 … j0+15, in registers: the EMA (`_ema_block`, mode 3:
    dd = dd·m + ((dist·inv128)·scale)·k, `reset` where row ≠ pr; pr = row), the grid bins where float32
    decides them (`_quick_bins`), then `drop_keys` (`_emit_drop_keys`): returns nc + the movers. Where a bin
    is UNSURE the sixteen bins are stored in jb[j0:j0+16] (UNSURE marked), mm is left as it was and −1 is
    returned: the caller makes those bins exact and calls `_drop_keys16`. The same float32 operations in the
    same order as those kernels, no fast-math flags: bit for bit their results. row, pr, fin: 1-d integer
    arrays (levels); dist: 1-d integer (codes) or float array; dd float32; mm, jb, out int32; the scalars
    float32."""
    arrays = (row, dist, pr, dd, mm, fin, jb, out)
    if not all(isinstance(a, types.Array) and a.ndim == 1 for a in arrays):
        return None
    if not all(isinstance(a.dtype, types.Integer) for a in (row, pr, fin)):
        return None
    if not (isinstance(dist.dtype, (types.Integer, types.Float)) and dd.dtype == types.float32
            and all(a.dtype == types.int32 for a in (mm, jb, out))):
        return None
    if not all(a == types.float32 for a in (m, k, inv128, scale, reset, q_scale, top)):
        return None
    sig = types.int64(row, dist, pr, dd, mm, fin, jb, types.int64, out, types.int64, *(types.float32,) * 7)

    def codegen(context, builder, signature, args):
        row_, dist_, pr_, dd_, mm_, fin_, jb_, j0_, out_, nc_, m_, k_, inv128_, scale_, reset_, q_, top_ = args
        tys = signature.args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vf = ir.VectorType(f32, LANES)
        v32 = ir.VectorType(i32, LANES)

        def ptr(n, arr, to):
            return builder.bitcast(_element_ptr(context, builder, tys[n], arr, j0_), to.as_pointer())

        def splat(x):
            return _splat(builder, x)
        wide = _lane_width(tys[0], tys[2], tys[5])
        cur = _load_ints(context, builder, tys[0], row_, j0_, wide)
        prev = _load_ints(context, builder, tys[2], pr_, j0_, wide)
        # the EMA: x = (dist·inv128)·scale, v = d·m + x·k, reset where the level changed; pr = row
        dty = tys[1].dtype
        raw = builder.load(ptr(1, dist_, ir.VectorType(context.get_data_type(dty), LANES)), align=1)
        if isinstance(dty, types.Integer):
            x = builder.sitofp(raw, vf) if dty.signed else builder.uitofp(raw, vf)
        else:
            x = raw if dty == types.float32 else (builder.fptrunc(raw, vf) if dty.bitwidth > 32
                                                 else builder.fpext(raw, vf))
        x = builder.fmul(builder.fmul(x, splat(inv128_)), splat(scale_))
        p_dd = ptr(3, dd_, vf)
        v = builder.fadd(builder.fmul(builder.load(p_dd, align=4), splat(m_)), builder.fmul(x, splat(k_)))
        d = builder.select(builder.icmp_unsigned("!=", cur, prev), splat(reset_), v)
        builder.store(d, p_dd, align=4)
        pr_elem = ir.VectorType(context.get_data_type(tys[2].dtype), LANES)
        builder.store(cur if pr_elem == cur.type else builder.trunc(cur, pr_elem), ptr(2, pr_, pr_elem), align=1)
        # the bins where float32 decides them (`_quick_bins`), UNSURE elsewhere
        one, zero = splat(ir.Constant(f32, 1.0)), splat(ir.Constant(f32, 0.0))
        top = splat(top_)
        u = builder.fmul(d, splat(q_))
        ceil = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf]), f"llvm.ceil.v{LANES}f32")
        kf = builder.call(ceil, [u])
        f = builder.fsub(kf, u)
        eta = builder.fmul(builder.fadd(u, one), splat(ir.Constant(f32, float(SURE_MARGIN))))
        sure = builder.and_(builder.and_(builder.fcmp_ordered(">=", f, eta),
                                         builder.fcmp_ordered("<=", f, builder.fsub(one, eta))),
                            builder.and_(builder.fcmp_ordered(">=", kf, one), builder.fcmp_ordered("<=", kf, top)))
        kc = builder.select(builder.fcmp_ordered("<", kf, top), kf, top)
        kc = builder.select(builder.fcmp_ordered(">", kc, zero), kc, zero)
        over = builder.select(builder.fcmp_ordered(">=", u, top), splat(builder.fptosi(top_, i32)),
                              ir.Constant(v32, [UNSURE] * LANES))
        jt = builder.select(sure, builder.fptosi(kc, v32), over)
        unsure = builder.icmp_signed("<", jt, ir.Constant(v32, [0] * LANES))
        any_unsure = builder.icmp_unsigned("!=", builder.bitcast(unsure, ir.IntType(LANES)),
                                           ir.Constant(ir.IntType(LANES), 0))
        with builder.if_else(any_unsure, likely=False) as (then, otherwise):
            with then:
                builder.store(jt, ptr(6, jb_, v32), align=4)
                from_then = builder.block
            with otherwise:
                ok = builder.icmp_unsigned("==", cur, _load_ints(context, builder, tys[5], fin_, j0_, wide))
                moved = _emit_drop_keys(builder, jt, ptr(4, mm_, v32), ok,
                                        _element_ptr(context, builder, tys[8], out_, nc_), nc_)
                from_otherwise = builder.block
        res = builder.phi(ir.IntType(64))
        res.add_incoming(ir.Constant(ir.IntType(64), -1), from_then)
        res.add_incoming(moved, from_otherwise)
        return res

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, at):
    """Ask the CPU to bring the cache line of arr[at] (a 1-d array) into its L1 cache (`prefetcht0`), without
    waiting for it."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(at, types.Integer)):
        return None
    sig = types.void(arr, types.int64)

    def codegen(context, builder, signature, args):
        arr_, at_ = args
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        addr = builder.bitcast(_element_ptr(context, builder, signature.args[0], arr_, at_), i8p)
        builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _prefetch_next(a, i, c0, b1, n):
    """Prefetch the next block of row i (a[i, c0+b1 : c0+b1+BLOCK], within the sub-block's n columns) while
    this one is computed on. A kernel visits a group's rows one block at a time, a row after another (16
    streams at a stride of the task's width), which the CPU's own prefetchers follow poorly: the first touch of
    each block's rows waited on memory (0.1-0.13 ns per weight-record and array, BENCHMARKS.md "Session 12")."""
    if b1 >= n:
        return
    nxt = a[i, c0 + b1:c0 + min(b1 + BLOCK, n)]
    step = max(1, 64 // nxt.itemsize)
    for q in range(0, nxt.size, step):
        _prefetch(nxt, q)


def _osc_types_ok(row, pr, ld, fq, le, fre, outs, scalars):
    """Whether `_osc_step16`'s arguments have the types its code is written for."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 for a in (row, pr, ld, fq, le, fre, *outs)):
        return False
    return (isinstance(row.dtype, types.Integer) and isinstance(pr.dtype, types.Integer) and ld.dtype == types.int8
            and fq.dtype == le.dtype == types.float32 and fre.dtype == types.boolean
            and all(o.dtype == types.int32 for o in outs) and all(x == types.float32 for x in scalars))


def _emit_osc_step(context, builder, tys, args):
    """Emit `_osc_step16`'s update (arguments row, pr, ld, fq, le, fre, j0, …, m, k, tt as the intrinsics take
    them, the last three the scalars); returns (the weights' levels and previous levels widened, whether each
    changed, whether each oscillated, the hit mask, their positions j0 … j0+15 as int32)."""
    row_, pr_, ld_, fq_, le_, fre_, j0_ = args[:7]
    m_, k_, tt_ = args[-3:]
    f32, i8, i32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
    vf, v8 = ir.VectorType(f32, LANES), ir.VectorType(i8, LANES)

    def ptr(n, arr, to):
        return builder.bitcast(_element_ptr(context, builder, tys[n], arr, j0_), to.as_pointer())
    wide = _lane_width(tys[0], tys[1])
    cur = _load_ints(context, builder, tys[0], row_, j0_, wide)
    prev = _load_ints(context, builder, tys[1], pr_, j0_, wide)
    up, down = builder.icmp_signed(">", cur, prev), builder.icmp_signed("<", cur, prev)
    p_ld = ptr(2, ld_, v8)
    last = builder.load(p_ld, align=1)
    plus, minus = ir.Constant(v8, [1] * LANES), ir.Constant(v8, [-1] * LANES)
    osc = builder.or_(builder.and_(up, builder.icmp_signed("==", last, minus)),
                      builder.and_(down, builder.icmp_signed("==", last, plus)))
    builder.store(builder.select(up, plus, builder.select(down, minus, last)), p_ld, align=1)
    m, k = _splat(builder, m_), _splat(builder, k_)
    p_fq, p_le = ptr(3, fq_, vf), ptr(4, le_, vf)
    f = builder.fadd(builder.fmul(builder.load(p_fq, align=4), k),
                     builder.select(osc, m, ir.Constant(vf, [0.0] * LANES)))
    builder.store(f, p_fq, align=4)
    level = builder.sitofp(cur, vf)      # (widened levels are exact: as numba's float32(level))
    builder.store(builder.fadd(builder.fmul(builder.load(p_le, align=4), k), builder.fmul(level, m)), p_le,
                  align=4)
    pr_elem = ir.VectorType(context.get_data_type(tys[1].dtype), LANES)
    builder.store(cur if pr_elem == cur.type else builder.trunc(cur, pr_elem), ptr(1, pr_, pr_elem), align=1)
    free = builder.icmp_unsigned("!=", builder.load(ptr(5, fre_, v8), align=1), ir.Constant(v8, [0] * LANES))
    hit = builder.and_(free, builder.fcmp_ordered(">", f, _splat(builder, tt_)))
    positions = builder.add(_splat(builder, builder.trunc(j0_, i32)),
                            ir.Constant(ir.VectorType(i32, LANES), list(range(LANES))))
    return cur, prev, builder.or_(up, down), osc, hit, positions


@intrinsic
def _osc_step16(typingctx, row, pr, ld, fq, le, fre, j0, out, nc, m, k, tt):
    """One record (after the first) of the oscillation replay for weights j0 … j0+15, in registers (`osc_kernel`'s
    loop): up/down from row against pr, an oscillation where opposite to the last direction ld (int8 ±1, 0
    none), ld updated, fq = fq·k + (m where it oscillated, else 0), le = le·k + level·m, pr = row; the
    positions j of the free weights (fre) with fq > tt appended at out[nc] (compress-store); returns nc + their
    number. The same float32 operations in the same order as the loop (bit for bit). row, pr: 1-d integer
    arrays; ld int8; fq, le float32; fre bool; out int32; m, k, tt float32."""
    if not _osc_types_ok(row, pr, ld, fq, le, fre, (out,), (m, k, tt)):
        return None
    sig = types.int64(row, pr, ld, fq, le, fre, types.int64, out, types.int64, types.float32, types.float32,
                      types.float32)

    def codegen(context, builder, signature, args):
        tys = signature.args
        _, _, _, _, hit, positions = _emit_osc_step(context, builder, tys, args)
        out_, nc_ = args[7], args[8]
        return _compress_append(builder, positions, hit, _element_ptr(context, builder, tys[7], out_, nc_), nc_)

    return sig, codegen


CHANGE_POS_BITS, LEVEL_BITS = 10, 8    # a level change's key: j | level << 10 | previous << 18 | reversal << 26


@intrinsic
def _level_osc_step16(typingctx, row, pr, ld, fq, le, fre, j0, hits, changes, counts, m, k, tt):
    """`_osc_step16` that also lists the weights whose level changed, for the level statistics: with counts =
    nh + (ncg << 32), the hits' positions are appended at hits[nh], and the changed weights' keys
    j | level << 10 | previous level << 18 | reversal << 26 (a change opposite to the last one, as
    `level_kernel` counts it) at changes[ncg]; returns the new counts. row, pr: uint8 (j0 + 15 < 1024)."""
    if not (_osc_types_ok(row, pr, ld, fq, le, fre, (hits, changes), (m, k, tt))
            and row.dtype == pr.dtype == types.uint8):
        return None
    sig = types.int64(row, pr, ld, fq, le, fre, types.int64, hits, changes, types.int64, types.float32,
                      types.float32, types.float32)

    def codegen(context, builder, signature, args):
        tys = signature.args
        cur, prev, changed, osc, hit, positions = _emit_osc_step(context, builder, tys, args)
        hits_, changes_, counts_ = args[7], args[8], args[9]
        i64 = ir.IntType(64)
        low = ir.Constant(i64, 0xFFFFFFFF)
        nh = builder.and_(counts_, low)
        ncg = builder.lshr(counts_, ir.Constant(i64, 32))
        v32 = positions.type

        def shl(v, n):
            return builder.shl(v, ir.Constant(v32, [n] * LANES))
        key = builder.or_(builder.or_(positions, shl(cur, CHANGE_POS_BITS)),
                          builder.or_(shl(prev, CHANGE_POS_BITS + LEVEL_BITS),
                                      shl(builder.zext(osc, v32), CHANGE_POS_BITS + 2 * LEVEL_BITS)))
        nh = _compress_append(builder, positions, hit, _element_ptr(context, builder, tys[7], hits_, nh), nh)
        ncg = _compress_append(builder, key, changed, _element_ptr(context, builder, tys[8], changes_, ncg), ncg)
        return builder.or_(nh, builder.shl(ncg, ir.Constant(i64, 32)))

    return sig, codegen


@kernel
def _prefetch_state(a, b1, n):
    """Prefetch the next block of a per-weight state array (a[b1 : b1+BLOCK], within n), which a kernel then
    updates only at the few weights whose level changed: those scattered accesses would each wait on
    memory."""
    if b1 >= n:
        return
    nxt = a[b1:min(b1 + BLOCK, n)]
    step = max(1, 64 // nxt.itemsize)
    for q in range(0, nxt.size, step):
        _prefetch(nxt, q)


@kernel
def _prefetch_level_state(last_change, flips, reversals, b1, n):
    """`_prefetch_state` of the level statistics' counters that only changed weights update."""
    _prefetch_state(last_change, b1, n)
    _prefetch_state(flips, b1, n)
    _prefetch_state(reversals, b1, n)


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
    (`_candidate_bins`). At AVX-512 the EMA, bins and keys of an UPDATE record are computed
    sixteen weights at a time in registers (`_index_step16`)."""
    NB = counts.shape[1]
    J = np.int32(NB - 2)
    rows = lv.shape[0]
    h = np.zeros((rows, 2 * NB), np.int32)    # per record: +1/−1 at 2·bin + (at its final level)
    h_used = np.zeros(rows, np.bool_)
    keyed = 2 * NB <= KEY_LIMIT     # the histogram keys fit the moves' words
    fused = keyed and HAS_COMPRESS  # (`_index_step16`)
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
            _prefetch_next(lv, i, c0, b1, n)
            _prefetch_next(dist, i, c0, b1, n)
            drow = dist[i, c0 + b0:c0 + b1]
            g, q_scale = gain[rec], qscale[rec]
            if fused and md == 3 and eligible[rec] and g > 0 and np.isfinite(q_scale):
                # the EMA, the bins and the movers' keys sixteen weights at a time, in registers
                h_used[i] = True
                nb = b1 - b0
                m, k = m32[rec], k32[rec]
                nc = 0
                j = 0
                while j + LANES <= nb:
                    got = _index_step16(row, drow, pr, dd, mm, fin, jbb, j, cand, nc, m, k, inv128, scale, reset,
                                        q_scale, top)
                    if got < 0:      # a bin float32 could not decide: made exact, then the moves
                        for q in range(j, j + LANES):
                            if jbb[q] < 0:
                                jbb[q] = _exact_bin(dd[q], q_scale, top, g, sc, bf, J)
                        got = _drop_keys16(jbb, mm, row, fin, j, cand, nc)
                    nc = got
                    j += LANES
                if j < nb:           # the last nb mod 16 weights as below
                    _ema_block(md, m, k, reset, inv128, scale, row[j:], drow[j:], pr[j:], dd[j:])
                    _quick_bins(dd[j:], q_scale, top, jbb[j:nb])
                    for q in range(j, nb):
                        if jbb[q] < 0:
                            jbb[q] = _exact_bin(dd[q], q_scale, top, g, sc, bf, J)
                    nc = _drop_keys_tail(jbb, mm, row, fin, j, nb, cand, nc)
                hr = h[i]
                for q in range(nc):
                    key = cand[q]
                    hr[np.uint64(key & 0xFFFF)] += 1
                    hr[np.uint64(key >> 16)] -= 1
                continue
            _ema_block(md, m32[rec], k32[rec], reset, inv128, scale, row, drow, pr, dd)
            if md == 0 or not eligible[rec]:
                continue
            h_used[i] = True
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
            _prefetch_next(lv, i, c0, b1, n)
            _prefetch_next(dist, i, c0, b1, n)
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
def _osc_first(row, pr, fq, le, fre, t):
    """`osc_kernel`'s first record for a block: le = pr = the level; returns whether a free weight has
    fq > t."""
    hit = False
    for j in range(row.size):
        le[j] = np.float32(row[j])
        pr[j] = row[j]
        hit |= fre[j] & (fq[j] > t)
    return hit


@kernel
def _osc_update(row, pr, ld, fq, le, fre, j0, j1, m, k, tt):
    """`osc_kernel`'s update of one record (after the first) for weights j0 … j1−1: the direction of the level
    change, an oscillation where it is opposite to the last change, ld, fq = fq·k + (m where it oscillated),
    le = le·k + level·m, pr = level; returns whether a free weight has fq > tt. Branch-free and in the weights'
    own widths (uint8 and int8 comparisons, bool logic): vectorised."""
    zero = np.float32(0)
    up1, down1 = np.int8(1), np.int8(-1)
    hit = False
    for j in range(j0, j1):
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
    return hit


@kernel
def osc_kernel(lv, c0, n, rec0, m, k, active, thr, steps, freq, level_ema, prev, last_dir, fs, flevel, free,
               new_by_record):
    """`OscPass`: per record the direction of the level change, an oscillation where it is opposite to the
    last change, freq = freq·(1−m) + osc·m and level_ema = level_ema·(1−m) + level·m (float32; record 0 sets
    level_ema = level); at an active record a free weight with freq > thr[rec] freezes at steps[rec] on
    rint(level_ema) (half to even). Blocks of `BLOCK` weights, the group's records inside. With a
    compress-store (`HAS_COMPRESS`) the update lists the weights that freeze as it goes, sixteen at a time
    (`_osc_step16`), and only those are frozen; otherwise the update (`_osc_update`) tells whether any free
    weight of the block crosses the threshold, and only then are they frozen, in a second branch-free loop."""
    cand = np.empty(BLOCK, np.int32)
    mx = np.int64(0)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        nb = b1 - b0
        fq, le, pr, ld = freq[b0:b1], level_ema[b0:b1], prev[b0:b1], last_dir[b0:b1]
        fss, flv, fre = fs[b0:b1], flevel[b0:b1], free[b0:b1]
        for i in range(lv.shape[0]):
            rec = rec0 + i
            row = lv[i, c0 + b0:c0 + b1]
            mx = _row_max(row, mx)
            _prefetch_next(lv, i, c0, b1, n)
            t = thr[rec]
            st = steps[rec]
            if rec == 0:
                hit = _osc_first(row, pr, fq, le, fre, t)
            elif HAS_COMPRESS:
                tt = t if active[rec] else np.float32(np.inf)     # (never crossed where freezing is off)
                nc = 0
                j = 0
                while j + LANES <= nb:
                    nc = _osc_step16(row, pr, ld, fq, le, fre, j, cand, nc, m, k, tt)
                    j += LANES
                if j < nb:
                    _osc_update(row, pr, ld, fq, le, fre, j, nb, m, k, tt)
                    for q in range(j, nb):
                        cand[nc] = q
                        nc += fre[q] & (fq[q] > tt)
                _freeze_listed(cand, nc, le, fre, fss, flv, st)
                new_by_record[rec] += nc
                continue
            else:
                hit = _osc_update(row, pr, ld, fq, le, fre, 0, nb, m, k, t if active[rec] else np.float32(np.inf))
            if active[rec] and hit:
                new_by_record[rec] += _osc_freeze(fq, le, fre, fss, flv, t, st)
    return mx


@kernel
def _osc_freeze(fq, le, fre, fss, flv, t, st):
    """Freeze the free weights of a block with fq > t at step st on rint(le) (half to even); returns their
    number. Branch-free: vectorised (a few % of the block freeze at once)."""
    n_new = 0
    for j in range(fq.size):
        c = fre[j] & (fq[j] > t)
        fss[j] = st if c else fss[j]
        flv[j] = np.int16(np.rint(le[j])) if c else flv[j]
        fre[j] = fre[j] ^ c         # (c implies fre[j])
        n_new += c
    return n_new


@kernel
def _freeze_listed(cand, nc, le, fre, fss, flv, st):
    """Freeze the weights cand[:nc] of a block at step st on rint(le) (half to even)."""
    for q in range(nc):
        j = cand[q]
        fss[j] = st
        flv[j] = np.int16(np.rint(le[j]))
        fre[j] = False


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
        _prefetch_level_state(last_change, flips, reversals, b1, n)
        for i in range(lv.shape[0]):
            rec = rec0 + i
            row = lv[i, c0 + b0:c0 + b1]
            mx = _row_max(row, mx)
            _prefetch_next(lv, i, c0, b1, n)
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



@kernel
def level_osc_kernel(lv, c0, n, rec0, prev, last_change, flips, reversals, last_dir, occ, m, k, active, thr, steps,
                     freq, level_ema, fs, flevel, free, new_by_record):
    """`level_kernel` and `osc_kernel` in one visit of each block and record (the cache build runs both from
    record 0): one load of the levels and one `prev` and `last_dir` (the two follow them the same way), the
    oscillation update listing both its freezes and the level changes sixteen weights at a time
    (`_level_osc_step16`: each change keyed with its position, level, previous level and whether it reversed),
    then the level statistics' updates of the changed weights only (a few %: flips, settle record, reversals,
    occupancy). Arguments as the two kernels take them (first record 0); uint8 levels; AVX-512 only
    (`HAS_COMPRESS`: the caller runs the two kernels elsewhere)."""
    hits = np.empty(BLOCK, np.int32)
    changes = np.empty(BLOCK, np.int32)
    pos_mask = np.int32((1 << CHANGE_POS_BITS) - 1)
    lvl_mask = np.int32((1 << LEVEL_BITS) - 1)
    mx = np.int64(0)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        nb = b1 - b0
        pr, lc, fl, rv, ld = prev[b0:b1], last_change[b0:b1], flips[b0:b1], reversals[b0:b1], last_dir[b0:b1]
        fq, le, fss, flv, fre = freq[b0:b1], level_ema[b0:b1], fs[b0:b1], flevel[b0:b1], free[b0:b1]
        _prefetch_level_state(last_change, flips, reversals, b1, n)
        for i in range(lv.shape[0]):
            rec = rec0 + i
            row = lv[i, c0 + b0:c0 + b1]
            mx = _row_max(row, mx)
            _prefetch_next(lv, i, c0, b1, n)
            t = thr[rec]
            st = steps[rec]
            if rec == 0:
                for j in range(nb):
                    occ[0, row[j]] += 1
                hit = _osc_first(row, pr, fq, le, fre, t)     # (whether or not freezing is on)
                if active[rec] and hit:
                    new_by_record[rec] += _osc_freeze(fq, le, fre, fss, flv, t, st)
                continue
            tt = t if active[rec] else np.float32(np.inf)     # (never crossed where freezing is off)
            counts = np.int64(0)
            j = 0
            while j + LANES <= nb:
                counts = _level_osc_step16(row, pr, ld, fq, le, fre, j, hits, changes, counts, m, k, tt)
                j += LANES
            nh, ncg = counts & 0xFFFFFFFF, counts >> 32
            if j < nb:       # the last nb mod 16 weights one by one, their changes listed before the update
                for q in range(j, nb):
                    cur, p = np.int32(row[q]), np.int32(pr[q])
                    direction = np.int8(cur > p) - np.int8(cur < p)
                    changes[ncg] = q | (cur << CHANGE_POS_BITS) | (p << (CHANGE_POS_BITS + LEVEL_BITS)) | \
                        (np.int32(ld[q] == -direction) << (CHANGE_POS_BITS + 2 * LEVEL_BITS))
                    ncg += cur != p
                _osc_update(row, pr, ld, fq, le, fre, j, nb, m, k, tt)
                for q in range(j, nb):
                    hits[nh] = q
                    nh += fre[q] & (fq[q] > tt)
            o = occ[rec]
            r32 = np.int32(rec)
            for q in range(ncg):     # the level statistics of the changed weights
                key = changes[q]
                j = key & pos_mask
                fl[j] += 1
                lc[j] = r32
                rv[j] += key >> (CHANGE_POS_BITS + 2 * LEVEL_BITS)
                o[(key >> CHANGE_POS_BITS) & lvl_mask] += 1
                o[(key >> (CHANGE_POS_BITS + LEVEL_BITS)) & lvl_mask] -= 1
            _freeze_listed(hits, nh, le, fre, fss, flv, st)
            new_by_record[rec] += nh
    return mx



@kernel
def add_counts(values, out):
    """out[v] += the number of times v occurs in `values` (integers in 0 … out.size−1; a task's settle records,
    most of them equal: four partial counts, so that equal values in a row do not wait on each other)."""
    n_bins = out.size
    part = np.zeros((4, n_bins), np.int64)
    n4 = values.size - values.size % 4
    for j in range(0, n4, 4):
        part[0, values[j]] += 1
        part[1, values[j + 1]] += 1
        part[2, values[j + 2]] += 1
        part[3, values[j + 3]] += 1
    for j in range(n4, values.size):
        part[0, values[j]] += 1
    for b in range(n_bins):
        out[b] += part[0, b] + part[1, b] + part[2, b] + part[3, b]

__all__ = ["BLOCK", "BEFORE", "START", "START_RESET", "UPDATE", "ema_modes", "index_kernel", "freeze_kernel", "osc_kernel",
           "level_kernel", "level_osc_kernel", "add_counts", "HAS_COMPRESS", "KEY_LIMIT", "drop_keys", "list_changed"]
