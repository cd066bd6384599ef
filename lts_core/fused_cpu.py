"""The fused path's per-weight loops on the CPU, compiled with numba: one pass where the eager ops make many.

- `lts_step`: the LTS rule's whole per-step work on one layer — the raw distance measured from the weight and
  the quantizer's current bounds (x = (w − l)/b, k = round(clamp(x, 0, 1)·(L−1)), r = |x − k/(L−1)|, the
  fused forward's ops), the EMA update and its reset where the level changed, the decision (EMA ≤ threshold,
  unfrozen weights only), the freeze (mask, value, step, per-channel count) and optionally the gradient mask.
- `mask_grad`: the gradient of frozen weights times 0 (what `grad.mul_(live)` writes there).
- `restore`: frozen weights back to their frozen values after the optimizer (what `torch.lerp(value, w, live)`
  writes there).
- `encode`: the recorder's uint8 level and distance code (and the exact raw distance) of a layer, written straight
  into the record row.

**Same bits.** Every value is the same float32 operation on the same operands as the eager fused path
(`torch.round` and `np.rint` both round half to even; Python float constants come in as `np.float32`, so no
float64 promotes the arithmetic; no `fastmath`, so no contraction into FMA): the EMA is m·d, then (1−m)·r, each
rounded to float32, then their sum; the reset and the restore follow `torch.lerp`'s formula with weight 0 or 1
(exact for finite values, NaN where torch gives NaN); comparisons against the threshold rounded to float32 as torch
rounds a Python scalar. The live mask is the rule's bool `_unfrozen` (1 byte per weight, not a float32 mask).
One exception, as in torch itself: `torch.lerp` can turn an unfrozen weight of exactly −0.0 into +0.0 (its
vectorised and scalar loops differ there); `restore` leaves unfrozen weights untouched.

House rules: `@numba.njit(cache=True, nogil=True)`, never `parallel=True` or `fastmath`. Parallelism comes from
`run_split`: a layer of at least `SPLIT_MIN_NUMEL` weights is cut into two halves at a channel boundary, one
half runs on a worker thread while the caller runs the other (the kernels release the GIL), when torch itself
runs with 2 threads or more. numba is imported here only, and this module only when a CPU rule or recorder
first needs a kernel (`kernels()`), never at `import lts_core`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numba
import numpy as np
import torch

_Z = np.float32(0.0)
_ONE = np.float32(1.0)
_SCALE = np.float32(128.0)    # distance.DIST_SCALE: codes of 1/128 Δ
_MAX_CODE = np.float32(255.0)  # distance.DIST_MAX_CODE
_HALF = np.float32(0.5)
_TWO = np.float32(2.0)

# A layer this large (weights) runs as two halves on two threads; below, one call is faster than handing off.
SPLIT_MIN_NUMEL = 1 << 16


# Weights per block: a branch-free loop over a block (vectorised by LLVM; numba vectorises loops over array slices
# indexed from 0, not loops over a range of a larger array) does the common work, a scalar loop over the same
# block (in cache) only the rare work (freezes, frozen weights' gradients and values).
_BLOCK = 512


@numba.njit(cache=True, nogil=True, inline="always")
def _position(w, lo, b, n1):
    """(x, k) of one weight, the fused forward's ops in float32: x = (w − l)/b, k = round(clamp(x, 0, 1)·(L−1))
    (`torch.clamp` keeps NaN, `np.rint` and `torch.round` both round half to even)."""
    x = (w - lo) / b
    c = _Z if x < _Z else x
    c = _ONE if c > _ONE else c
    return x, np.rint(c * n1)


@numba.njit(cache=True, nogil=True)
def _measure_ema(w, ema, prev, lo, b, n1, decay, one_minus_decay, reset):
    """The hot loop of `lts_step` (t ≥ 2, no raw distances kept) over one block: the EMA and level only (the
    decision's counts in a second loop over the same block, `_hits`, cost less than in this one)."""
    for j in range(w.size):
        x, k = _position(w[j], lo, b, n1)
        r = abs(x - k / n1)
        m = ema[j] * decay
        e = m + r * one_minus_decay
        e = reset - (reset - e) * _Z if k != prev[j] else e + _Z * (reset - e)   # torch.lerp, weight 1 / 0
        ema[j] = e
        prev[j] = k


@numba.njit(cache=True, nogil=True)
def _hits(ema, live, thr):
    """(unfrozen weights whose EMA is ≤ thr, unfrozen weights) of one block."""
    hits = 0
    n_live = 0
    lv = live.view(np.uint8)
    for j in range(ema.size):
        hits += np.uint8(ema[j] <= thr) & lv[j]
        n_live += lv[j]
    return hits, n_live


@numba.njit(cache=True, nogil=True)
def _measure_any(w, ema, prev, live, lo, b, n1, phase, decay, one_minus_decay, reset, thr, raw, write_raw):
    """`_measure_ema` for any phase (0: level only, 1: EMA = r, 2: update), keeping r in `raw` on request."""
    hits = 0
    n_live = 0
    for j in range(w.size):
        x, k = _position(w[j], lo, b, n1)
        r = abs(x - k / n1)
        if write_raw:
            raw[j] = r
        if phase == 2:
            m = ema[j] * decay
            e = m + r * one_minus_decay
            e = reset - (reset - e) * _Z if k != prev[j] else e + _Z * (reset - e)
            ema[j] = e
        elif phase == 1:
            e = r
            ema[j] = e
        else:
            e = ema[j]
        prev[j] = k
        if e <= thr and live[j]:
            hits += 1
        if live[j]:
            n_live += 1
    return hits, n_live


@numba.njit(cache=True, nogil=True)
def lts_step(start, stop, w, lo, b, n1, phase, ema, prev, decay, one_minus_decay, reset, thr, decide,
             live, frozen, live_f, frozen_values, fstep_f, fstep, t, t_f, chan_frozen, k_per_chan,
             grad, mask_grads, raw, write_raw, new_idx, new_cnt):
    """One LTS step over weights [start, stop) of a layer (flat, contiguous arrays). Returns how many froze.

    `phase` 0: keep the level only (t = 0); 1: EMA = r (t = 1); 2: EMA update with its reset. `decide`: freeze
    unfrozen weights whose EMA is ≤ `thr` (else pass thr < 0) at step `t` (`t_f`: t as float32), keeping the
    bool masks `live` / `frozen`, the float32 `live_f`, the frozen values, the freeze steps (float32 and int64)
    and the per-channel frozen counts. `mask_grads`: the gradient × 0 where frozen (after this step's freezes).
    `write_raw`: keep r in `raw`. With a non-empty `new_idx` (int32, the layer's size) the indices of the
    weights that froze go to new_idx[start:], their number to new_cnt[0] (start = 0) or new_cnt[1] (a second
    half): what `FrozenList.extend` appends."""
    n_new = 0
    for s in range(start, stop, _BLOCK):
        e_ = min(s + _BLOCK, stop)
        if phase == 2 and not write_raw:
            _measure_ema(w[s:e_], ema[s:e_], prev[s:e_], lo, b, n1, decay, one_minus_decay, reset)
            hits, n_live = _hits(ema[s:e_], live[s:e_], thr)
        else:
            hits, n_live = _measure_any(w[s:e_], ema[s:e_], prev[s:e_], live[s:e_], lo, b, n1, phase, decay,
                                        one_minus_decay, reset, thr, raw[s:e_] if write_raw else raw, write_raw)
        if decide and hits:
            for j in range(s, e_):
                if live[j] and ema[j] <= thr:
                    live[j] = False
                    frozen[j] = True
                    live_f[j] = _Z
                    frozen_values[j] = w[j]      # torch.lerp(value, w, 1) for a finite w
                    fstep_f[j] = t_f
                    fstep[j] = t
                    chan_frozen[j // k_per_chan] += _ONE
                    if new_idx.size:
                        new_idx[start + n_new] = j
                    n_new += 1
            n_live -= hits
        if mask_grads and n_live < e_ - s:
            _mul_live(grad[s:e_], live[s:e_])
    if new_cnt.size:
        new_cnt[0 if start == 0 else 1] = n_new
    return n_new


@numba.njit(cache=True, nogil=True)
def _mul_live(grad, live):
    """grad × 1.0 where live, × 0.0 where frozen: `grad.mul_(live_f)`, value for value (branch-free)."""
    lv = live.view(np.uint8)
    for j in range(grad.size):
        grad[j] = grad[j] * (_ONE if lv[j] else _Z)


@numba.njit(cache=True, nogil=True)
def _restore_block(w, frozen_values, live):
    """w where live, 0·(w − v) + v where frozen (`torch.lerp(v, w, live)` for finite values; branch-free)."""
    lv = live.view(np.uint8)
    for j in range(w.size):
        wj = w[j]
        v = frozen_values[j]
        w[j] = wj if lv[j] else _Z * (wj - v) + v


@numba.njit(cache=True, nogil=True)
def _count(live):
    n = 0
    lv = live.view(np.uint8)
    for j in range(lv.size):
        n += lv[j]
    return n


@numba.njit(cache=True, nogil=True)
def mask_grad(start, stop, grad, live):
    """grad × 0 where the weight is frozen (what `grad.mul_(live)` with a 1.0 / 0.0 mask writes there)."""
    for s in range(start, stop, _BLOCK):
        e_ = min(s + _BLOCK, stop)
        if _count(live[s:e_]) < e_ - s:
            _mul_live(grad[s:e_], live[s:e_])
    return 0


@numba.njit(cache=True, nogil=True)
def restore(start, stop, w, frozen_values, live):
    """Frozen weights back to their values (what `torch.lerp(value, w, live)` writes there: 0·(w − v) + v)."""
    for s in range(start, stop, _BLOCK):
        e_ = min(s + _BLOCK, stop)
        if _count(live[s:e_]) < e_ - s:
            _restore_block(w[s:e_], frozen_values[s:e_], live[s:e_])
    return 0


@numba.njit(cache=True, nogil=True)
def restore_listed(start, stop, w, idx, values):
    """`restore` for the frozen weights listed in idx[start:stop] (int32 weight indices, `values` their frozen
    values in the same order): w[i] = 0·(w[i] − v) + v, the same value `restore` writes, touching nothing
    else. Cheaper than `restore` while few weights are frozen (it reads no mask and no value of a live weight)."""
    for r in range(start, stop):
        i = idx[r]
        v = values[r]
        w[i] = _Z * (w[i] - v) + v
    return 0


@numba.njit(cache=True, nogil=True)
def _encode_block(w, lo, b, n1, level_out, code_out):
    for j in range(w.size):
        x, k = _position(w[j], lo, b, n1)
        d = np.rint(abs(x * n1 - k) * _SCALE)
        d = _MAX_CODE if d > _MAX_CODE else d
        code_out[j] = np.uint8(d) if d == d else np.uint8(0)
        level_out[j] = np.uint8(k) if k == k else np.uint8(0)


@numba.njit(cache=True, nogil=True)
def _raw_block(w, lo, b, n1, raw):
    for j in range(w.size):
        x, k = _position(w[j], lo, b, n1)
        raw[j] = abs(x - k / n1)


@numba.njit(cache=True, nogil=True)
def encode(start, stop, w, lo, b, n1, level_out, code_out, raw, write_raw):
    """The recorder's uint8 level index and distance code clamp(round(|x·(L−1) − k|·128), 0, 255) (NaN → 0, as
    torch's float → int16 → uint8 casts give), and with `write_raw` the exact raw distance |x − k/(L−1)|."""
    _encode_block(w[start:stop], lo, b, n1, level_out[start:stop], code_out[start:stop])
    if write_raw:
        _raw_block(w[start:stop], lo, b, n1, raw[start:stop])
    return 0


@numba.njit(cache=True, nogil=True)
def _quant_fwd_block(w, lo, b, n1, unit, out, x_out, q_out):
    for j in range(w.size):
        x, k = _position(w[j], lo, b, n1)
        q = k / n1
        x_out[j] = x
        q_out[j] = q
        out[j] = (q - _HALF) * _TWO if unit else q * b + lo


@numba.njit(cache=True, nogil=True)
def quant_fwd(start, stop, w, lo, b, n1, unit, out, x_out, q_out):
    """The learned-interval quantizer's forward (`fused.IntervalQuantize`): x = (w − l)/b, q = round(clamp(x, 0, 1)
    ·(L−1))/(L−1), ŵ = q·b + l ("denorm") or (q − ½)·2 ("unit"); writes ŵ, x and q."""
    for s in range(start, stop, _BLOCK):
        e_ = min(s + _BLOCK, stop)
        _quant_fwd_block(w[s:e_], lo, b, n1, unit, out[s:e_], x_out[s:e_], q_out[s:e_])
    return 0


@numba.njit(cache=True, nogil=True)
def _quant_bwd_block(g, x, q, b, gscale, denorm, gw, gxb, gq):
    for j in range(g.size):
        xj = x[j]
        gj = g[j]
        gx = (gj * gscale) * (_ONE if (xj >= _Z) & (xj <= _ONE) else _Z) + _Z
        gxb[j] = (xj / b) * gx
        gw[j] = gx / b
        if denorm:
            gq[j] = gj * q[j]


@numba.njit(cache=True, nogil=True)
def quant_bwd(start, stop, g, x, q, b, gscale, denorm, gw, gxb, gq):
    """The quantizer's backward elementwise work, one pass: g_x = (g·s)·[0 ≤ x ≤ 1] + 0 (s = b, or 2 for "unit"),
    the weight's gradient g_x/b, the terms (x/b)·g_x of b's gradient and (denorm) g·q; torch sums them."""
    for s in range(start, stop, _BLOCK):
        e_ = min(s + _BLOCK, stop)
        _quant_bwd_block(g[s:e_], x[s:e_], q[s:e_], b, gscale, denorm, gw[s:e_], gxb[s:e_], gq[s:e_] if denorm else gq)
    return 0


# A layer keeps its frozen weights listed (`FrozenList`) while they are at most this share of it: listed, the restore
# costs 0.66× the full pass at 12 % frozen, 0.77× at 25 %, 0.86× at 35 %, 1.0× at 50 % (BENCHMARKS.md).
LIST_MAX = 0.3


class FrozenList:
    """A layer's frozen weights as a list — int32 index and float32 frozen value, in the order they froze —
    kept while they are few (≤ `LIST_MAX` of the layer), so that `restore_listed` writes them back without
    `restore`'s pass over every weight. `scratch` and `new_cnt` receive `lts_step`'s new freezes, which
    `extend` appends. `version` is the owner's mask version the list matches."""

    def __init__(self, numel: int, idx: np.ndarray, values: np.ndarray, version: int):
        self.cap = max(1024, int(numel * LIST_MAX))
        self.idx = np.empty(self.cap, np.int32)
        self.values = np.empty(self.cap, np.float32)
        self.n = len(idx)
        self.idx[:self.n] = idx
        self.values[:self.n] = values
        self.version = version
        self.scratch = np.empty(numel, np.int32)   # pages are touched only where new freezes land
        self.new_cnt = np.zeros(2, np.int64)

    def extend(self, mid: int, frozen_values: np.ndarray, version: int) -> bool:
        """Append `lts_step`'s new freezes (scratch[:new_cnt[0]] and, with a second half from `mid`,
        scratch[mid:mid + new_cnt[1]]); False when they no longer fit (the list is then dropped)."""
        c0, c1 = int(self.new_cnt[0]), int(self.new_cnt[1])
        n = self.n
        if n + c0 + c1 > self.cap:
            return False
        self.idx[n:n + c0] = self.scratch[:c0]
        self.idx[n + c0:n + c0 + c1] = self.scratch[mid:mid + c1]
        self.n = n + c0 + c1
        self.values[n:self.n] = frozen_values[self.idx[n:self.n]]
        self.version = version
        return True


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lts-fused-cpu")
    return _POOL


def split_point(n: int, per_chan: int) -> int:
    """Where to cut n weights in two halves on a channel boundary (0: do not split)."""
    if n < SPLIT_MIN_NUMEL or torch.get_num_threads() < 2:
        return 0
    mid = (n // per_chan // 2) * per_chan
    return mid if 0 < mid < n else 0


def run_split(fn, n: int, per_chan: int, *args) -> int:
    """fn(start, stop, *args) over [0, n): in two halves on two threads for a large layer (the halves are
    disjoint and cut at a channel boundary, so no two threads write the same element or channel count).
    Returns the sum of the halves' results."""
    mid = split_point(n, per_chan)
    if not mid:
        return fn(0, n, *args)
    other = _pool().submit(fn, mid, n, *args)
    return fn(0, mid, *args) + other.result()


def f32(value) -> np.float32:
    """A Python number or a 0-dim tensor as float32 (a float32 tensor's value exactly)."""
    return np.float32(value.item() if isinstance(value, torch.Tensor) else value)


def flat(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor as a flat numpy view (writes go to the tensor)."""
    return t.detach().view(-1).numpy()


@lru_cache(maxsize=1)
def empty_i32() -> np.ndarray:
    return np.empty(0, dtype=np.int32)


@lru_cache(maxsize=1)
def empty_i64() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@lru_cache(maxsize=1)
def empty_f32() -> np.ndarray:
    return np.empty(0, dtype=np.float32)
