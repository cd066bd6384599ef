"""Distributions over training, streamed chunk by chunk: per-record histograms of the distance to the level,
the LTS EMA distance, the full-precision weights on their quantization grid, level occupancy and freeze steps.

Units: distances and positions are in quantization steps Δ. Counts are exact on the recorder's grid of
1/128 Δ (the distance code): nothing is down-sampled. Memory is O(records × bins + weights): one pass over the
chunks (`Run.iter_chunks`), never a [records, weights] array; only binned counts leave this module.

Per-record weight classes (index into the class axis of the counts):
  0 `active`: not frozen at that record;
  1 `frozen`: frozen, and at the level it froze on;
  2 `moved`:  frozen, but on another level than the one it froze on — a frozen weight keeps its value, yet its
              level moves when the learned bounds move.
"Frozen at record r" means 0 ≤ freeze step ≤ step_r; "the level it froze on" is its level at the last record at
or before its freeze step (the convention of `replay.ticket_correct`, so these figures agree with ticket
precision).

Weight values. A record stores, per weight, its level k and the distance code c = round(|p − k|·128) of its
position p (in Δ, level 0 at 0), and per layer the quantizer bounds. The sign of p − k is not among the stored
arrays: when the run also recorded the optional `side` array (uint8, 1 where p ≥ k; `Recorder(record_side=True)`),
positions are exact: p = k ± c/128. Without it the weight histogram is *folded*: each weight whose side is
ambiguous counts half at k − c/128 and half at k + c/128 (`Distributions.signed` is False). A weight more than
½ Δ from its level is outside the quantization range, so its side is known either way (below level 0, above
level L−1). A position p maps to the weight value `w0 + p·dw` (`weight_axis`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..schedules import ratio_at

__all__ = ["CLASSES", "CODE_BINS", "INSIDE_CODES", "RecordDistributions", "record_distributions", "weight_axis",
           "weight_histogram", "common_weight_edges", "rebin_codes", "freeze_record_counts"]

CLASSES = ("active", "frozen", "moved")
CODE_BINS = 256          # distance codes 0 … 255 (1/128 Δ each, 255 saturates at ≈ 1.99 Δ)
INSIDE_CODES = 65        # codes 0 … 64: distance 0 … ½ Δ (inside the quantization range)
SCALE = 128              # codes per Δ
_MAX_POS_BINS = 2048     # position bins per record for the weight histogram (resolution coarsened above this)


@dataclass
class RecordDistributions:
    """Per-record histograms of one run (one layer or all layers). Arrays are indexed by record first."""
    steps: np.ndarray            # int64 [R]
    n_weights: int
    dist: np.ndarray             # int64 [R, 3, 256]: weights per distance code, per class
    ema: np.ndarray | None       # int64 [R, 3, 256]: weights per EMA-distance code (LTS runs and replays)
    ema_source: str | None       # "recorded" | "replayed" | None
    thresholds: np.ndarray | None  # float64 [R]: ρ_t in Δ at each record (-1 during warm-up), LTS only
    occupancy: np.ndarray | None   # int64 [R, L]: weights per level (single layer)
    positions: np.ndarray | None   # float64 [R, 3, P]: weights per position bin, per class (single layer)
    pos_first: int = 0           # code (1/128 Δ) of the first position bin's start
    pos_res: int = 1             # codes per position bin
    signed: bool = True          # positions exact (side recorded) or folded
    n_levels: int | None = None
    bounds: np.ndarray | None = None   # float32 [R, 2] (single layer)
    kind: str | None = None
    bits: int | None = None
    frozen_by: np.ndarray | None = None   # int64 [R]: frozen weights at each record
    newly_frozen: np.ndarray | None = None  # int64 [R]: weights that count as frozen first at record r

    @property
    def n_records(self) -> int:
        return int(self.steps.size)

    def class_totals(self) -> np.ndarray:
        """int64 [R, 3]: weights per class (active, frozen at their level, frozen but moved) per record."""
        return self.dist.sum(axis=2)

    def position_edges(self) -> np.ndarray:
        """float64 [P+1]: edges of the position bins, in Δ (each code spread over ±½ code)."""
        P = self.positions.shape[-1] if self.positions is not None else 0
        return (self.pos_first + self.pos_res * np.arange(P + 1) - 0.5) / SCALE


def _freeze_records(fs: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight: the first record at which it counts as frozen (R = never) and the record whose level is
    its level at freezing (last record at or before the freeze step; 0 when before the first record)."""
    R = steps.size
    frozen = fs >= 0
    first = np.where(frozen, np.searchsorted(steps, fs, side="left"), R)
    at = np.where(frozen, np.maximum(np.searchsorted(steps, fs, side="right") - 1, 0), R)
    return first.astype(np.int64), at.astype(np.int64)


def _position_layout(n_levels: int) -> tuple[int, int, int]:
    """(first code, codes per bin, bins) of the position histogram of a layer with `n_levels` levels."""
    lo, hi = -(CODE_BINS - 1), SCALE * (n_levels - 1) + CODE_BINS - 1
    res = max(1, math.ceil((hi - lo + 1) / _MAX_POS_BINS))
    return lo, res, (hi - lo) // res + 1


def _fold_tables(n_levels: int, first: int, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For unsigned (level, code) pairs: position bins below/above the level and the share that goes above."""
    k = np.arange(n_levels)[:, None]
    c = np.arange(CODE_BINS)[None, :]
    below = (SCALE * k - c - first) // res
    above = (SCALE * k + c - first) // res
    share = np.full((n_levels, CODE_BINS), 0.5)
    share[:, 0] = 1.0                                     # on the level: one position
    outside = c > INSIDE_CODES - 1
    share[(k == 0) & outside] = 0.0                       # beyond ½ Δ from level 0: below the range
    share[(k == n_levels - 1) & outside] = 1.0            # beyond ½ Δ from the top level: above the range
    if n_levels == 1:
        share[:] = 0.5
    return below.ravel(), above.ravel(), share.ravel()


def record_distributions(run, layer: int | str | None = None, freeze_steps=None,
                         replay: dict | None = None) -> "RecordDistributions":
    """One streamed pass over a stored run: every per-record histogram of `layer` (None = all layers).

    freeze_steps: int64 [n] per weight of the layer (-1 never), e.g. `run.freeze_steps(layer)` of an LTS run.
    replay: LTS replay settings `{"schedule", "ratio", "warmup_steps", "decay"}` (total steps from the run):
      freezing and EMA are the engine's replay (`replay.replay_freeze_steps`, `replay.ema_records`);
      `freeze_steps` is then ignored (the replay reads the run's levels whole, as every LTS replay does).
      Without either, nothing is frozen.
    The EMA histogram uses the run's recorded `ema` array when there is one and no replay is asked for.
    """
    from .replay import ema_records, replay_freeze_steps

    steps = np.asarray(run.steps, dtype=np.int64)
    R = steps.size
    sl = run.layer_slice(layer)
    n = sl.stop - sl.start
    li = None if layer is None else run.layer_index(layer)
    lay = run.layers[li] if li is not None else None
    total = int((run.manifest or {}).get("total_steps") or (steps[-1] + 1 if R else 1))

    has_ema = "ema" in run.state_arrays and replay is None
    has_side = "side" in run.state_arrays
    thresholds = None
    ema_stream = None
    if replay is not None:   # the engine's replay: its freeze steps and its EMA, record by record
        sched, ratio = replay["schedule"], float(replay["ratio"])
        W, decay = int(replay["warmup_steps"]), float(replay["decay"])
        thresholds = np.array([ratio_at(int(t), sched, ratio, W, total) for t in steps])
        fs = replay_freeze_steps(run, schedule=sched, ratio=ratio, warmup_steps=W, decay=decay)[sl]
        ema_stream = ema_records(run, decay)
    else:
        fs = np.full(n, -1, dtype=np.int64) if freeze_steps is None else np.asarray(freeze_steps, np.int64)
        if fs.shape != (n,):
            raise ValueError(f"freeze_steps has shape {fs.shape}, the selection has {n} weights")
        settings = ((run.manifest or {}).get("rule") or {}).get("settings") or {}
        if has_ema and settings.get("schedule") in ("fixed", "linear", "sine"):
            thresholds = np.array([ratio_at(int(t), settings["schedule"], float(settings.get("ratio", 1.0)),
                                            int(settings.get("warmup_steps", 0)), total) for t in steps])
    first_frozen, at_record = _freeze_records(fs, steps)
    # per record, how many weights freeze / take their freezing level there: records without any skip the
    # per-weight comparisons (a run without freezing compares nothing)
    n_first = np.bincount(first_frozen[first_frozen < R], minlength=R)
    n_at = np.bincount(at_record[at_record < R], minlength=R)

    L = int(lay.get("n_levels") or 0) if lay is not None else 1   # all layers: one pseudo-level
    L = max(L, 1)
    with_pos = lay is not None
    S = 2 if (has_side and with_pos) else 1            # side of the level: recorded (2) or unknown (1)
    dist = np.zeros((R, 3, CODE_BINS), np.int64)
    ema = np.zeros((R, 3, CODE_BINS), np.int64) if (has_ema or replay is not None) else None
    occ = np.zeros((R, L), np.int64) if with_pos else None
    positions = None
    if with_pos:
        p_first, p_res, P = _position_layout(L)
        positions = np.zeros((R, 3, P), np.float64)
        if S == 2:   # exact: bin of p = 128·k ± c for every (k, side, c)
            k = np.arange(L)[:, None, None]
            sgn = np.array([-1, 1])[None, :, None]
            c = np.arange(CODE_BINS)[None, None, :]
            pos_bin = ((SCALE * k + sgn * c - p_first) // p_res).ravel()
        else:
            below, above, share = _fold_tables(L, p_first, p_res)
    frozen_by = np.zeros(R, np.int64)
    newly = np.zeros(R, np.int64)

    cls = np.zeros(n, np.uint32)             # 0 active, 1 frozen at its level, 2 frozen but moved
    freeze_level = np.zeros(n, np.uint8)
    is_frozen = np.zeros(n, bool)
    key = np.empty(n, np.intp)               # bincount's own index type: no conversion per record
    arrays = ["level", "dist"] + (["ema"] if has_ema else []) + (["side"] if S == 2 else [])
    r = 0
    for ch in run.iter_chunks(arrays=tuple(arrays), layer=layer):
        for j in range(len(ch["step"])):
            level = np.asarray(ch["level"][j])
            code = np.asarray(ch["dist"][j])
            ema_code = None
            if ema_stream is not None:
                e = next(ema_stream)
                if e is not None:   # the replayed EMA (Δ units) on the recorder's code grid
                    ema_code = np.clip(np.rint(e[sl] * SCALE), 0, CODE_BINS - 1).astype(np.uint8)
            elif has_ema:
                ema_code = np.asarray(ch["ema"][j])
            if n_at[r]:                          # the level each weight froze on, at its freeze record
                cap = at_record == r
                freeze_level[cap] = level[cap]
            newly[r] = n_first[r]
            if n_first[r]:
                is_frozen |= first_frozen == r
            frozen_by[r] = frozen_by[r - 1] + newly[r] if r else newly[r]
            if frozen_by[r]:
                np.not_equal(level, freeze_level, out=cls, casting="unsafe")
                cls += 1
                cls *= is_frozen
            # one joint count per record: (class, level, side, code) → dist, occupancy and positions
            if with_pos:
                np.multiply(cls, L, out=key)
                key += level
                key *= S
                if S == 2:
                    key += ch["side"][j]
            else:
                key[:] = cls
            key <<= 8
            key += code
            joint = np.bincount(key, minlength=3 * L * S * CODE_BINS).reshape(3, L, S, CODE_BINS)
            dist[r] = joint.sum(axis=(1, 2))
            if ema_code is not None:
                np.left_shift(cls, 8, out=key)
                key += ema_code
                ema[r] = np.bincount(key, minlength=3 * CODE_BINS).reshape(3, CODE_BINS)
            if with_pos:
                occ[r] = joint.sum(axis=(0, 2, 3))
                flat = joint.reshape(3, -1)
                for c in range(3):
                    if not flat[c].any():
                        continue
                    if S == 2:
                        positions[r, c] = np.bincount(pos_bin, flat[c], minlength=P)
                    else:
                        positions[r, c] = (np.bincount(below, flat[c] * (1 - share), minlength=P)
                                           + np.bincount(above, flat[c] * share, minlength=P))
            r += 1
    return RecordDistributions(
        steps=steps, n_weights=n, dist=dist, ema=ema,
        ema_source=("replayed" if replay is not None else "recorded" if has_ema else None),
        thresholds=thresholds, occupancy=occ, positions=positions,
        pos_first=p_first if with_pos else 0, pos_res=p_res if with_pos else 1, signed=has_side,
        n_levels=L if with_pos else None, bounds=(np.asarray(run.bounds(li)) if li is not None else None),
        kind=(lay.get("kind") if lay is not None else None), bits=(lay.get("bits") if lay is not None else None),
        frozen_by=frozen_by, newly_frozen=newly)


def weight_axis(kind: str | None, bits: int | None, n_levels: int, bounds_row) -> tuple[float, float]:
    """(w0, dw): the weight value of position 0 (level 0) and of one step Δ, from one record's bounds.

    Learned-interval quantizers (liq, binary, ternary) record (lower, upper): w0 = lower, dw = (upper−lower)/(L−1).
    LSQ records (step, nan): level 0 is the most negative value, w0 = −2^(bits−1)·step, dw = step.
    """
    a, b = float(bounds_row[0]), float(bounds_row[1])
    if kind == "lsq":
        return -(2 ** (int(bits) - 1)) * a, a
    return a, (b - a) / max(int(n_levels) - 1, 1)


def weight_histogram(counts, pos_edges, w0: float, dw: float, edges) -> np.ndarray:
    """Counts per weight-value bin `edges` of one record's position counts (`counts` over `pos_edges`, Δ).

    Each position bin's count is spread evenly over its width (the code is a rounding to 1/128 Δ), so bins in
    weight units that do not line up with the grid get their exact share, without a comb pattern.
    """
    cdf = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64))])
    w_edges = w0 + np.asarray(pos_edges, dtype=np.float64) * dw
    if dw < 0:
        w_edges, cdf = w_edges[::-1], cdf[-1] - cdf[::-1]
    return np.diff(np.interp(np.asarray(edges, dtype=np.float64), w_edges, cdf))


def common_weight_edges(ranges, n_bins: int = 120) -> np.ndarray:
    """Shared bin edges (weight units) covering every (low, high) in `ranges`: identical bins for overlays."""
    lo = min(float(a) for a, _ in ranges)
    hi = max(float(b) for _, b in ranges)
    if not hi > lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, int(n_bins) + 1)


def rebin_codes(counts, codes_per_bin: int, last: int = INSIDE_CODES - 1) -> tuple[np.ndarray, np.ndarray]:
    """Sum code counts [..., 256] into bins of `codes_per_bin` codes over codes 0 … `last`, plus one overflow
    bin (codes above `last`). Returns (counts [..., B+1], edges in Δ [B+1] of the regular bins: a code c
    stands for c/128 ± 1/256 Δ)."""
    counts = np.asarray(counts)
    k = int(codes_per_bin)
    n_regular = (last + 1 + k - 1) // k
    idx = np.minimum(np.arange(CODE_BINS) // k, n_regular)
    idx[last + 1:] = n_regular
    onehot = np.zeros((CODE_BINS, n_regular + 1), dtype=counts.dtype)
    onehot[np.arange(CODE_BINS), idx] = 1
    out = counts @ onehot
    edges = (np.minimum(np.arange(n_regular + 1) * k, last + 1) - 0.5) / SCALE
    edges[0] = 0.0
    return out, edges


def freeze_record_counts(freeze_steps, steps) -> np.ndarray:
    """int64 [R]: weights that count as frozen first at record r (freeze step in (steps[r-1], steps[r]])."""
    fs = np.asarray(freeze_steps, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    rec = np.searchsorted(steps, fs[fs >= 0], side="left")
    return np.bincount(rec[rec < steps.size], minlength=steps.size).astype(np.int64)
