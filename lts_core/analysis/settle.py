"""When do weights reach their final quantization level? Pure numpy statistics on recorded level trajectories.

Inputs are level trajectories `levels` (uint8 `[R, N]`: record × weight, as the run store gives them). Every
function reads `levels` a block of records at a time (or one record at a time), so a memory-mapped array is
never materialised as a whole and no `[R, N]` temporary wider than a block is made.

Definitions (record indices `r = 0 … R-1`):
- final level: `levels[R-1]`;
- settle record: the first record `r` such that `levels[r:] == final` (0 for a weight that never moved);
- never moved: same level at every record (⟺ settle record 0);
- flips: number of level changes between consecutive records;
- oscillation frequency: number of direction reversals (a change whose sign is opposite to the weight's previous
  change) divided by `R-1`;
- fraction settled at record r: share of weights whose settle record is ≤ r.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

_BLOCK_ELEMS = 1 << 24  # elements per block of records read at once


# ---- run adapter ------------------------------------------------------------------------------------------

@dataclass
class RunArrays:
    """The arrays the analysis needs, taken from a stored run (or given directly)."""
    steps: np.ndarray                 # int64 [R]
    levels: Any                       # uint8 [R, N] (possibly memory-mapped)
    dist_codes: Any                   # uint8 [R, N] or None
    layer_sizes: list[int]
    layer_flops: list[int]
    layer_names: list[str]
    total_steps: int
    steps_per_epoch: int | None
    layer_n_levels: list[int] = field(default_factory=list)
    layer_bits: list[int] = field(default_factory=list)
    raw_dists: Any = None             # float32 [R, N] exact raw distances (normalised units), when recorded
    n_trainable: int | None = None    # all trainable parameters of the model (the reference's denominator)
    layer_channels: list[int] | None = None  # output channels per layer (weight shape[0]), when recorded


def is_run(obj) -> bool:
    """True for a stored-run object (has `steps` and a callable `levels`)."""
    return hasattr(obj, "steps") and callable(getattr(obj, "levels", None))


def arrays_from_run(run, with_dists: bool = True, with_levels: bool = True) -> RunArrays:
    """Adapter: `Run` (from `lts_core.store.open_run`) → `RunArrays`.

    Uses `run.steps`, `run.levels()`, `run.dist_codes()`, `run.layers` (dicts with `numel`, `flops`, `name`,
    optionally `n_levels`, `bits`) and `run.manifest["total_steps"]`, `run.manifest["steps_per_epoch"]`.
    `with_levels=False` reads no trajectory (levels and distances None): the run's description only, for the
    streamed analyses.
    """
    layers = list(run.layers)
    manifest = getattr(run, "manifest", {}) or {}
    steps = np.asarray(run.steps, dtype=np.int64)
    total = manifest.get("total_steps")
    if total is None:
        total = int(steps[-1]) + 1 if len(steps) else 0
    return RunArrays(
        steps=steps,
        levels=run.levels() if with_levels else None,
        dist_codes=run.dist_codes() if with_dists and with_levels else None,
        layer_sizes=[int(lay["numel"]) for lay in layers],
        layer_flops=[int(lay.get("flops") or 0) for lay in layers],
        layer_names=[str(lay.get("name", f"layer{i}")) for i, lay in enumerate(layers)],
        total_steps=int(total),
        steps_per_epoch=manifest.get("steps_per_epoch"),
        layer_n_levels=[int(lay.get("n_levels") or 0) for lay in layers],
        layer_bits=[int(lay.get("bits") or 0) for lay in layers],
        raw_dists=run.raw_dists() if (with_dists and with_levels and getattr(run, "has_raw_dists", False))
        else None,
        n_trainable=manifest.get("n_trainable_params"),
        layer_channels=([int(lay["shape"][0]) for lay in layers]
                        if layers and all(lay.get("shape") for lay in layers) else None),
    )


# ---- helpers ----------------------------------------------------------------------------------------------

def _shape(levels) -> tuple[int, int]:
    if getattr(levels, "ndim", None) != 2:
        raise ValueError(f"levels must be a 2-D [records, weights] array, got shape {getattr(levels, 'shape', None)}")
    R, N = levels.shape
    if R < 1:
        raise ValueError("levels has no record")
    return int(R), int(N)


def _blocks(R: int, N: int, start: int = 0):
    """Record blocks [a, b) covering [start, R), each about _BLOCK_ELEMS elements."""
    rows = max(1, _BLOCK_ELEMS // max(N, 1))
    a = start
    while a < R:
        b = min(R, a + rows)
        yield a, b
        a = b


def check_layer_sizes(layer_sizes: Sequence[int] | None, N: int) -> list[int]:
    """Validate layer sizes (default: one layer holding every weight)."""
    if layer_sizes is None:
        return [N]
    sizes = [int(s) for s in layer_sizes]
    if any(s < 0 for s in sizes) or sum(sizes) != N:
        raise ValueError(f"layer sizes {sizes[:8]}… must be ≥ 0 and sum to the number of weights {N} "
                         f"(they sum to {sum(sizes)})")
    return sizes


# ---- per-weight statistics --------------------------------------------------------------------------------

def final_levels(levels) -> np.ndarray:
    """Level of each weight at the last record (uint8 [N])."""
    _shape(levels)
    return np.array(levels[-1])


def settle_records(levels) -> np.ndarray:
    """int64 [N]: first record index r with levels[r:] == final level (0 = never moved)."""
    R, N = _shape(levels)
    final = np.asarray(levels[-1])
    last_diff = np.full(N, -1, dtype=np.int64)
    for a, b in _blocks(R - 1, N):  # the last record always equals the final level
        diff = np.asarray(levels[a:b]) != final
        rev_first = np.argmax(diff[::-1], axis=0)  # index, from the block's end, of its last differing record
        hit = diff.any(axis=0)
        last_diff = np.where(hit, np.maximum(last_diff, (b - 1) - rev_first), last_diff)
    return last_diff + 1


def never_moved(levels) -> np.ndarray:
    """bool [N]: same level at every record."""
    R, N = _shape(levels)
    first = np.asarray(levels[0])
    out = np.ones(N, dtype=bool)
    for a, b in _blocks(R, N, 1):
        out &= (np.asarray(levels[a:b]) == first).all(axis=0)
    return out


def flips(levels) -> np.ndarray:
    """int64 [N]: number of level changes between consecutive records."""
    R, N = _shape(levels)
    out = np.zeros(N, dtype=np.int64)
    for a, b in _blocks(R, N, 1):
        block = np.asarray(levels[a - 1:b])
        out += (block[1:] != block[:-1]).sum(axis=0)
    return out


def direction_reversals(levels) -> np.ndarray:
    """int64 [N]: number of level changes whose direction is opposite to the weight's previous change."""
    R, N = _shape(levels)
    last_dir = np.zeros(N, dtype=np.int8)
    out = np.zeros(N, dtype=np.int64)
    prev = np.asarray(levels[0]).astype(np.int16)
    for r in range(1, R):
        cur = np.asarray(levels[r]).astype(np.int16)
        direction = np.sign(cur - prev).astype(np.int8)
        out += (direction != 0) & (direction == -last_dir)
        last_dir = np.where(direction != 0, direction, last_dir)
        prev = cur
    return out


def oscillation_frequency(levels) -> np.ndarray:
    """float64 [N]: direction reversals / (R-1) (0 when there is a single record)."""
    R, _ = _shape(levels)
    rev = direction_reversals(levels)
    return rev / float(R - 1) if R > 1 else np.zeros(rev.shape, dtype=np.float64)


# ---- curves and histograms --------------------------------------------------------------------------------

def settle_histogram(settle_recs: np.ndarray, n_records: int) -> np.ndarray:
    """int64 [R]: number of weights whose settle record is r."""
    return np.bincount(np.asarray(settle_recs, dtype=np.int64), minlength=int(n_records))[:n_records]


def curve_from_settle_records(settle_recs: np.ndarray, n_records: int,
                              layer_sizes: Sequence[int] | None = None) -> np.ndarray:
    """Fraction settled at each record: float64 [R] (layer_sizes None) or [n_layers, R]."""
    sr = np.asarray(settle_recs, dtype=np.int64)
    if layer_sizes is None:
        n = max(sr.size, 1)
        return np.cumsum(settle_histogram(sr, n_records)) / n
    sizes = check_layer_sizes(layer_sizes, sr.size)
    out = np.zeros((len(sizes), n_records), dtype=np.float64)
    off = 0
    for i, n in enumerate(sizes):
        if n:
            out[i] = np.cumsum(settle_histogram(sr[off:off + n], n_records)) / n
        else:
            out[i] = np.nan
        off += n
    return out


def fraction_settled_curve(levels, layer_sizes: Sequence[int] | None = None) -> np.ndarray:
    """Cumulative share of weights at their final level and staying there, at each record: mean(settle ≤ r).

    Returns float64 [R]; with `layer_sizes`, the per-layer curves float64 [n_layers, R].
    """
    R, _ = _shape(levels)
    return curve_from_settle_records(settle_records(levels), R, layer_sizes)


def layer_fraction_settled_curves(levels, layer_sizes: Sequence[int]) -> np.ndarray:
    """Per-layer fraction-settled curves, float64 [n_layers, R]."""
    return fraction_settled_curve(levels, layer_sizes)


def level_occupancy(levels, n_levels: int) -> np.ndarray:
    """int64 [R, n_levels]: number of weights at each level index at each record."""
    R, _ = _shape(levels)
    L = int(n_levels)
    out = np.zeros((R, L), dtype=np.int64)
    for r in range(R):
        counts = np.bincount(np.asarray(levels[r]).ravel(), minlength=L)
        if counts.size > L:
            raise ValueError(f"record {r} has level {counts.size - 1} ≥ n_levels={L}")
        out[r] = counts
    return out


# ---- summary ----------------------------------------------------------------------------------------------

@dataclass
class SettleSummary:
    """How a run's weights reached their final level.

    Categories (they partition the weights; R = number of records):
    - `never_moved`: the same level at every record (settle record 0);
    - `converged_later`: moved, then reached its final level at a record 1 … R-2 and kept it to the end
      (at least the last two records agree);
    - `not_settled`: its level still changed between the last two records (settle record R-1), so the record
      gives no evidence that it settled — weights oscillating to the end and weights that moved only at the
      last record both fall here. With a single record every weight counts as never moved.
    """
    n_records: int
    n_weights: int
    steps: np.ndarray | None               # int64 [R] when known
    epochs: np.ndarray | None              # float64 [R] when known
    settle_records: np.ndarray             # int64 [N]
    curve: np.ndarray                      # float64 [R]
    layer_curves: np.ndarray               # float64 [n_layers, R]
    layer_names: list[str]
    histogram: np.ndarray                  # int64 [R]
    n_never_moved: int
    n_converged_later: int
    n_not_settled: int
    final_levels: np.ndarray | None = None  # uint8 [N] level at the last record, when known

    @property
    def fractions(self) -> dict[str, float]:
        n = max(self.n_weights, 1)
        return {"never_moved": self.n_never_moved / n, "converged_later": self.n_converged_later / n,
                "not_settled": self.n_not_settled / n}


def settle_summary(levels_or_run, layer_sizes: Sequence[int] | None = None,
                   layer_names: Sequence[str] | None = None, steps=None,
                   steps_per_epoch: int | None = None) -> SettleSummary:
    """Settle statistics of a run (a stored `Run` or a levels array `[R, N]`).

    A stored run is streamed chunk by chunk on all cores (`lts_core.analysis.stream`; memory O(weights));
    `summaries.cached_settle_summary` also keeps the result beside the run."""
    if is_run(levels_or_run) and layer_sizes is None and layer_names is None and steps is None:
        from .summaries import LevelsItem, build_cache, settle_summary_from_stats
        run = levels_or_run
        stats = build_cache(run, [LevelsItem()], save=False)["levels"]
        names = [str(lay.get("name", f"layer{i}")) for i, lay in enumerate(run.layers)]
        spe = run.manifest.get("steps_per_epoch") if steps_per_epoch is None else steps_per_epoch
        return settle_summary_from_stats(stats, names, run.steps, spe)
    if is_run(levels_or_run):
        arr = arrays_from_run(levels_or_run, with_dists=False)
        levels = arr.levels
        layer_sizes = arr.layer_sizes if layer_sizes is None else layer_sizes
        layer_names = arr.layer_names if layer_names is None else layer_names
        steps = arr.steps if steps is None else steps
        steps_per_epoch = arr.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
    else:
        levels = levels_or_run
    R, N = _shape(levels)
    sizes = check_layer_sizes(layer_sizes, N)
    names = list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(len(sizes))]
    sr = settle_records(levels)
    hist = settle_histogram(sr, R)
    steps_arr = None if steps is None else np.asarray(steps, dtype=np.int64)
    epochs = None
    if steps_arr is not None and steps_per_epoch:
        epochs = steps_arr.astype(np.float64) / float(steps_per_epoch)
    n_never = int(hist[0])
    n_not = int(hist[R - 1]) if R > 1 else 0
    return SettleSummary(
        n_records=R, n_weights=N, steps=steps_arr, epochs=epochs, settle_records=sr,
        curve=np.cumsum(hist) / max(N, 1), layer_curves=curve_from_settle_records(sr, R, sizes),
        layer_names=names, histogram=hist, n_never_moved=n_never,
        n_converged_later=N - n_never - n_not, n_not_settled=n_not, final_levels=final_levels(levels),
    )
