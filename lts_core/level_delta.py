"""Level trajectories stored as changes: a chunk's first row plus every (record, weight, new level).

Levels move rarely: recording every step, about 0.5% of the weights change level from one record to the
next on our synthetic benchmark, and fewer on real runs late in training. Storing only the changes cuts a
recorded chunk by almost half (levels were 1 of its 2 bytes per weight per record). A chunk is encoded
this way only when that is at least twice smaller than the dense uint8 rows; otherwise the store keeps
the dense ``level`` array. Pure numpy; the store decides and calls these.

Encoded form of a dense uint8 ``[r, n]`` chunk:

    base  uint8 [n]   levels at the chunk's first record
    at    int64 [k]   record · n + weight of each change, strictly increasing (record ≥ 1)
    to    uint8 [k]   the level the weight changes to at that record
"""
from __future__ import annotations

import numpy as np

BYTES_PER_CHANGE = 9  # one int64 position and one uint8 level


def encode(levels: np.ndarray, max_ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(base, at, to) for `levels` (uint8 [r, n], r ≥ 2), or None when the changes would take more than
    `max_ratio` of the dense rows after the first."""
    r, n = levels.shape
    if r < 2:
        return None
    budget = max_ratio * (r - 1) * n
    at_parts, to_parts, k = [], [], 0
    for i in range(1, r):
        j = np.flatnonzero(levels[i] != levels[i - 1])
        k += j.size
        if k * BYTES_PER_CHANGE > budget:
            return None
        if j.size:
            at_parts.append(j.astype(np.int64) + i * n)
            to_parts.append(levels[i, j])
    at = np.concatenate(at_parts) if at_parts else np.empty(0, np.int64)
    to = np.concatenate(to_parts) if to_parts else np.empty(0, np.uint8)
    return np.array(levels[0], dtype=np.uint8), at, to


def check(base: np.ndarray, at: np.ndarray, to: np.ndarray, r: int) -> str | None:
    """What is wrong with an encoded chunk of `r` records (None if nothing)."""
    n = base.shape[0]
    if at.shape != to.shape:
        return f"{at.shape[0]} change positions but {to.shape[0]} change values"
    if at.size:
        if at[0] < n or at[-1] >= r * n:
            return f"change positions outside records 1..{r - 1}"
        if np.any(np.diff(at) <= 0):
            return "change positions are not strictly increasing"
    return None


def decode(base: np.ndarray, at: np.ndarray, to: np.ndarray, r: int, cols=None) -> np.ndarray:
    """Dense uint8 [r, m] levels of the columns `cols` (a slice, an index array, or None for all n)."""
    n = base.shape[0]
    at = np.asarray(at, dtype=np.int64)
    weight, rec = at % n, at // n
    to = np.asarray(to)
    if cols is None:
        cols = slice(0, n)
    if isinstance(cols, slice):
        start, stop, step = cols.indices(n)
        if step != 1:
            return decode(base, at, to, r, np.arange(start, stop, step))
        keep = (weight >= start) & (weight < stop)
        col, row = weight[keep] - start, np.array(base[start:stop], dtype=np.uint8)
    else:
        idx = np.asarray(cols, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size != idx.size:  # repeated columns: decode each once, then repeat
            return decode(base, at, to, r, uniq)[:, inverse]
        pos = np.searchsorted(uniq, weight)
        keep = pos < uniq.size
        keep[keep] = uniq[pos[keep]] == weight[keep]
        order = np.argsort(idx, kind="stable")  # uniq[p] is idx[order[p]]
        col, row = order[pos[keep]], np.array(base[idx], dtype=np.uint8)
    rec, val = rec[keep], to[keep]
    bounds = np.searchsorted(rec, np.arange(r + 1))  # changes of record i: bounds[i]:bounds[i + 1]
    out = np.empty((r, row.size), dtype=np.uint8)
    for i in range(r):
        s, e = bounds[i], bounds[i + 1]
        if e > s:
            row[col[s:e]] = val[s:e]
        out[i] = row
    return out


def decode_range(base: np.ndarray, at: np.ndarray, to: np.ndarray, r: int, start: int, stop: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Dense uint8 [r, stop-start] levels of the contiguous columns [start, stop), into `out` if given.

    The changes are sorted by (record, weight), so a record's changes inside the range are one slice of
    `at`, found by binary search: the cost is O(r log k + changes in the range), not O(k) per call.
    """
    n = base.shape[0]
    b = stop - start
    out = np.empty((r, b), dtype=np.uint8) if out is None else out
    out[0] = base[start:stop]
    if r > 1:
        rows = np.arange(1, r, dtype=np.int64) * n
        lo = np.searchsorted(at, rows + start)
        hi = np.searchsorted(at, rows + stop)
    for i in range(1, r):
        out[i] = out[i - 1]
        s, e = lo[i - 1], hi[i - 1]
        if e > s:
            out[i, np.asarray(at[s:e]) - (i * n + start)] = to[s:e]
    return out
