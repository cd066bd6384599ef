"""Replay: what would LTS (or oscillation freezing) have done on a recorded run?

LTS replay at record resolution (records r = 0 … R-1 at global optimizer steps `steps[r]`, strictly
increasing), in the rule's own units (normalised: one step Δ = 1/(L−1) of each layer) and arithmetic:
- raw distance at a record: the run's exact float32 raw distances when it recorded them (`raw_dists`, e.g. every
  step), else the uint8 code decoded (`code/128` Δ) and scaled to normalised units (× fl32(1/(L−1)));
- EMA, as the reference code starts it: a record at step 0 is discarded (only its level is kept); the first
  record at a step s ≥ 1 sets `d = r` (the rule's d_1 = r_1 held up to s), reset to one step if s ≥ 2 and the
  level changed since the previous record (a change at step 1 never resets); every later record r applies
  `distance.ema_update_compounded(d, r_r, changed, m, k)` with `k = steps[r] - steps[r-1]` and
  `changed = levels[r] != levels[r-1]`: the decay compounds over the `k` steps between the records (the recorded
  distance held constant over them) and a level change seen between the two records resets the EMA to one step;
- freezing is checked at record steps only, strictly after the warm-up: an unfrozen weight of layer l freezes at
  record r when `steps[r] > W` and `d ≤ 1/(L_l−1)·ρ` with `ρ = schedules.ratio_at(steps[r], …)` — torch's
  `float32 tensor <= python float`, exactly the rule's comparison. Frozen weights never unfreeze; the freeze step
  reported is the record's step.
With a record at every step and exact raw distances this *is* the live rule (same float32 torch ops): a run
recorded at every step replays its own freeze steps bit for bit. Without layer information (`layer_n_levels`
None) the replay works in Δ units (as if L−1 = 1).

Whole-run accounting at record resolution: a weight frozen at record step f counts as frozen for every optimizer
step f … E-1, where E = max(total_steps, steps[-1] + 1); equivalently each record's frozen fraction is weighted
by the number of steps it stands for (`steps[r+1] - steps[r]`, the last one `E - steps[-1]`), steps before the
first record count as nothing frozen, and the mean is taken over all E steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..distance import decode_distance, ema_update_compounded
from ..schedules import canonical_schedule, eligible, osc_threshold_at, ratio_at, schedule_gain, threshold_norm
from ..channels import DEFAULT_CHANNEL_QUANTILE
from .channel_replay import StructuralCounter, channel_bins, channel_freeze, channel_spec, skippable_counts
from .settle import RunArrays, arrays_from_run, check_layer_sizes, is_run

__all__ = [
    "replay_freeze_steps", "replay_accounting", "ema_trace", "ema_records", "ReplayIndex", "ReplayResult",
    "freeze_accounting",
    "ticket_correct", "ticket_precision", "replay_oscillation", "OscReplay", "oscillation_summary", "osc_threshold_at",
    "osc_ema_update", "agreement", "resolve_device", "grid_bins",
]


# ---- input handling ---------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU → a clear error."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    return dev


def _check_steps(steps, R: int) -> np.ndarray:
    s = np.asarray(steps, dtype=np.int64).ravel()
    if s.size != R:
        raise ValueError(f"steps has {s.size} entries but the trajectories have {R} records")
    if R > 1 and not np.all(np.diff(s) > 0):
        raise ValueError("record steps must be strictly increasing")
    if R and s[0] < 0:
        raise ValueError("record steps must be ≥ 0")
    return s


def _check_traj(levels, dist_codes=None) -> tuple[int, int]:
    if getattr(levels, "ndim", None) != 2:
        raise ValueError(f"levels must be a 2-D [records, weights] array, got shape {getattr(levels, 'shape', None)}")
    R, N = (int(x) for x in levels.shape)
    if R < 1:
        raise ValueError("the trajectories have no record")
    if dist_codes is not None and tuple(dist_codes.shape) != (R, N):
        raise ValueError(f"dist_codes shape {tuple(dist_codes.shape)} differs from levels shape {(R, N)}")
    return R, N


def _check_lts_args(schedule: str, decay: float, warmup_steps, total_steps) -> None:
    canonical_schedule(schedule)
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if warmup_steps is None or total_steps is None:
        raise ValueError("warmup_steps and total_steps are required")
    if int(total_steps) < 1 or int(warmup_steps) < 0:
        raise ValueError(f"need total_steps ≥ 1 and warmup_steps ≥ 0, got {total_steps}, {warmup_steps}")


def _run_warmup(run) -> int | None:
    manifest = getattr(run, "manifest", {}) or {}
    rule = manifest.get("rule") or {}
    settings = (rule.get("settings") or rule) if isinstance(rule, dict) else {}
    if settings.get("warmup_steps") is not None:
        return int(settings["warmup_steps"])
    if manifest.get("warmup_steps") is not None:  # the trainer's planned warm-up, for any rule
        return int(manifest["warmup_steps"])
    return None


def _row(arr, r: int, dev: torch.device) -> torch.Tensor:
    """One record as a torch tensor on `dev` (copied: memory-mapped rows are read-only)."""
    return torch.from_numpy(np.array(arr[r], copy=True)).to(dev)


class _Units:
    """Per-layer unit of the replay: one step is 1/(L_l−1) in normalised units (L = 2, i.e. Δ units, without
    layer information). The per-weight tensors are built on first use (a streamed pass needs only
    `n_levels`; at 100M weights they would be 800 MB)."""

    def __init__(self, sizes: list[int], n_levels: list[int], dev: torch.device):
        self.sizes, self.n_levels, self._dev = sizes, n_levels, dev
        self._w: tuple | None = None

    def _per_weight(self) -> tuple:
        if self._w is None:
            if all(L == 2 for L in self.n_levels):
                self._w = (None, None)
            else:
                counts = torch.tensor(self.sizes, dtype=torch.int64)
                step = torch.repeat_interleave(
                    torch.tensor([1 / (L - 1) for L in self.n_levels], dtype=torch.float32), counts)
                span = torch.repeat_interleave(
                    torch.tensor([L - 1 for L in self.n_levels], dtype=torch.float32), counts)
                self._w = (step.to(self._dev), span.to(self._dev))
        return self._w

    @property
    def step_w(self) -> torch.Tensor | None:
        """float32 [N]: fl32(1/(L−1)) per weight (None when every layer has L = 2)."""
        return self._per_weight()[0]

    @property
    def span_w(self) -> torch.Tensor | None:
        """float32 [N]: L−1 per weight, to convert back to Δ units (None when every layer has L = 2)."""
        return self._per_weight()[1]

    def slices(self):
        """(column slice, L) per layer."""
        off = 0
        for n, L in zip(self.sizes, self.n_levels):
            yield slice(off, off + n), L
            off += n

    def to_steps(self, d: torch.Tensor) -> torch.Tensor:
        """Normalised units → Δ units (× (L−1), float32, as `LTSRule.ema_steps`)."""
        return d if self.span_w is None else d * self.span_w


def _units(layer_sizes, layer_n_levels, N: int, dev: torch.device) -> _Units:
    sizes = check_layer_sizes(layer_sizes, N)
    if layer_n_levels is None or len(layer_n_levels) == 0:
        n_levels = [2] * len(sizes)
    else:
        if len(layer_n_levels) != len(sizes):
            raise ValueError(f"{len(layer_n_levels)} layer level counts for {len(sizes)} layers")
        n_levels = [int(L) if int(L) >= 2 else 2 for L in layer_n_levels]
    return _Units(sizes, n_levels, dev)


def _ema_stream(steps: np.ndarray, levels, dist_codes, decay: float, dev: torch.device, units: _Units,
                raw_dists=None):
    """Yield (r, step, level row (numpy), level row (torch on dev), EMA distance after record r in normalised
    units, or None before the EMA starts) — the one EMA loop used by every LTS replay (module docstring)."""
    prev = None
    d = None
    reset = 1.0 if units.step_w is None else units.step_w
    for r in range(len(steps)):
        lv_np = np.array(levels[r], copy=True)
        lv = torch.from_numpy(lv_np).to(dev)
        t = int(steps[r])
        if raw_dists is not None:
            dist = _row(raw_dists, r, dev).float()
        else:
            dist = decode_distance(_row(dist_codes, r, dev))
            if units.step_w is not None:
                dist *= units.step_w
        if d is not None:
            d = ema_update_compounded(d, dist, lv != prev, decay, t - int(steps[r - 1]), reset)
        elif t >= 1:  # the reference discards step 0; the first later record starts the EMA: d = r …
            d = dist.clone()
            if prev is not None and t >= 2:  # … and a level change after step 1 (t ≥ 2) resets it, as per step
                d = torch.where(lv != prev, reset, d) if isinstance(reset, torch.Tensor) \
                    else d.masked_fill_(lv != prev, reset)
        prev = lv
        yield r, t, lv_np, lv, d


def grid_bins(d: np.ndarray, g: float, bins_per_unit: int, max_bin: int, thr32: np.ndarray | None = None,
              scale: float = 1.0, ext: np.ndarray | None = None):
    """Smallest grid bin j (0 … max_bin) with d ≤ fl32(scale·((j/B)·g)), max_bin+1 where none: int64 like d.

    `d` float32 (≥ 0); the threshold of bin j is computed as the rule does (`schedules.threshold_norm` of
    `ratio_at`: scale·((j/B)·g) in double, scale = 1/(L−1)) and rounded to float32 like the rule's
    `tensor <= float` comparison. Computed as ceil(d·B/(g·scale)) in float32 (relative error ~2⁻²³, i.e. under
    10⁻³ of a bin up to bin 4096) corrected by ±1 against the exact float32 thresholds — equal to
    `np.searchsorted(thr32, d)` but several times faster. `ext` (optional, float32 [J+3]: −inf, thr32, +inf)
    saves building it per call.
    """
    B, J = int(bins_per_unit), int(max_bin)
    if thr32 is None:
        thr32 = (scale * ((np.arange(J + 1, dtype=np.float64) / B) * g)).astype(np.float32)
    if g <= 0:   # all thresholds 0: only d == 0 freezes
        return np.where(d <= 0, 0, J + 1).astype(np.int64)
    if ext is None:
        ext = np.empty(J + 3, dtype=np.float32)      # ext[k+1] = thr32[k]; ext[0] = -inf; ext[J+2] = +inf
        ext[0], ext[1:J + 2], ext[J + 2] = -np.inf, thr32, np.inf
    q = np.multiply(d, np.float32(B / (g * scale)), dtype=np.float32)
    np.ceil(q, out=q)
    np.minimum(q, J + 1, out=q)
    np.maximum(q, 0, out=q)
    c = q.astype(np.int64)
    c -= ext[c] >= d          # thr32[c-1] ≥ d → one bin lower
    c += ext[1:][c] < d       # thr32[c] < d → one bin higher
    return c


# ---- direct replay ----------------------------------------------------------------------------------------

def _from_run(run, warmup_steps, total_steps, layer_sizes, layer_n_levels, raw_dists, layer_channels=None):
    arr = arrays_from_run(run)
    return (arr.steps, arr.levels, arr.dist_codes,
            _run_warmup(run) if warmup_steps is None else warmup_steps,
            arr.total_steps if total_steps is None else total_steps,
            arr.layer_sizes if layer_sizes is None else layer_sizes,
            arr.layer_n_levels if layer_n_levels is None else layer_n_levels,
            arr.raw_dists if raw_dists is None else raw_dists,
            arr.layer_channels if layer_channels is None else layer_channels)


def _streamable(run) -> bool:
    """A stored run (`lts_core.store.Run`) whose records a streamed pass can read column block by block."""
    return callable(getattr(run, "read_columns", None))


def _check_raw(raw_dists, R: int, N: int) -> None:
    if raw_dists is not None and tuple(raw_dists.shape) != (R, N):
        raise ValueError(f"raw_dists shape {tuple(raw_dists.shape)} differs from levels shape {(R, N)}")


def replay_freeze_steps(steps, levels=None, dist_codes=None, schedule: str = "linear", ratio: float = 1.0,
                        warmup_steps: int | None = None, total_steps: int | None = None, decay: float = 0.99,
                        device: str | torch.device = "cpu", *, layer_sizes=None, layer_n_levels=None,
                        raw_dists=None, granularity: str = "weight", channel_quantile: float = DEFAULT_CHANNEL_QUANTILE,
                        layer_channels=None, executor=None) -> np.ndarray:
    """Exact direct simulation of the LTS rule on the records: int64 [N] freeze step per weight (-1 = never).

    `steps` may also be a stored run (then levels, distances, layers and total_steps come from it; with
    `granularity="weight"` its records are streamed with `executor`, see `stream.Executor`). See the module
    docstring for the record-resolution semantics. Results are identical on cpu and cuda.
    `granularity="channel"` replays channel-LTS (`channel_replay`; needs `layer_channels`, which a run has).
    """
    if is_run(steps) and _streamable(steps) and raw_dists is None and granularity == "weight":
        return _stream_freeze_steps(steps, schedule, ratio, warmup_steps, total_steps, decay, layer_sizes,
                                    layer_n_levels, executor)
    if is_run(steps):
        (steps, levels, dist_codes, warmup_steps, total_steps, layer_sizes, layer_n_levels, raw_dists,
         layer_channels) = _from_run(steps, warmup_steps, total_steps, layer_sizes, layer_n_levels, raw_dists,
                                     layer_channels)
    _check_lts_args(schedule, decay, warmup_steps, total_steps)
    if not float(ratio) >= 0:
        raise ValueError(f"threshold ratio must be ≥ 0, got {ratio}")
    R, N = _check_traj(levels, None if raw_dists is not None else dist_codes)
    _check_raw(raw_dists, R, N)
    steps = _check_steps(steps, R)
    dev = resolve_device(device)
    units = _units(layer_sizes, layer_n_levels, N, dev)
    chans = channel_spec(granularity, channel_quantile, layer_channels, units.sizes)
    W, T = int(warmup_steps), int(total_steps)
    frozen = torch.zeros(N, dtype=torch.bool, device=dev)
    freeze = torch.full((N,), -1, dtype=torch.int64, device=dev)
    with torch.no_grad():
        for _, t, _, _, d in _ema_stream(steps, levels, dist_codes, float(decay), dev, units, raw_dists):
            rho = ratio_at(t, schedule, float(ratio), W, T)
            if d is None or rho < 0:
                continue
            for li, (sl, L) in enumerate(units.slices()):
                thr = threshold_norm(rho, L)
                hit = channel_freeze(d[sl], thr, chans.channels[li], chans.quantile) if chans.per_channel \
                    else d[sl] <= thr
                newly = hit & ~frozen[sl]
                frozen[sl] |= newly
                freeze[sl].masked_fill_(newly, t)
    return freeze.cpu().numpy()


def _stream_freeze_steps(run, schedule, ratio, warmup_steps, total_steps, decay, layer_sizes, layer_n_levels,
                         executor=None) -> np.ndarray:
    """`replay_freeze_steps` of a stored run, streamed (`replay_stream.FreezeStepsPass`)."""
    from .replay_stream import RAW, FreezeStepsPass
    from .stream import RunSource, run_passes
    arr = arrays_from_run(run, with_levels=False)
    W = _run_warmup(run) if warmup_steps is None else warmup_steps
    T = arr.total_steps if total_steps is None else total_steps
    _check_lts_args(schedule, decay, W, T)
    if not float(ratio) >= 0:
        raise ValueError(f"threshold ratio must be ≥ 0, got {ratio}")
    if not run.n_records:
        raise ValueError(f"run {run.run_id} has no record yet")
    steps = _check_steps(arr.steps, run.n_records)
    units = _units(arr.layer_sizes if layer_sizes is None else layer_sizes,
                   arr.layer_n_levels if layer_n_levels is None else layer_n_levels, run.n_weights,
                   torch.device("cpu"))
    src = RunSource(run)
    (fs,) = run_passes(src, [FreezeStepsPass(steps, units.n_levels, schedule, ratio, W, T, decay, src.has(RAW))],
                       executor)
    return fs


def ema_trace(steps, levels, dist_codes, decay: float, weights: Sequence[int] | None = None,
              device: str | torch.device = "cpu", *, layer_sizes=None, layer_n_levels=None,
              raw_dists=None) -> np.ndarray:
    """The replayed EMA distance, in Δ units, of selected weights at every record: float32 [R, len(weights)]
    (NaN before the EMA starts, i.e. at a record of step 0).

    Meant for a handful of weights (plots, tests); `weights=None` returns all of them (small inputs only).
    """
    R, N = _check_traj(levels, None if raw_dists is not None else dist_codes)
    _check_raw(raw_dists, R, N)
    steps = _check_steps(steps, R)
    dev = resolve_device(device)
    units = _units(layer_sizes, layer_n_levels, N, dev)
    idx = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.int64), device=dev)
    out = []
    with torch.no_grad():
        for _, _, _, _, d in _ema_stream(steps, levels, dist_codes, float(decay), dev, units, raw_dists):
            if d is None:
                out.append(np.full(N if idx is None else len(idx), np.nan, dtype=np.float32))
                continue
            e = units.to_steps(d)
            out.append((e if idx is None else e[idx]).cpu().numpy().copy())
    return np.stack(out).astype(np.float32)


def ema_records(run, decay: float, device: str | torch.device = "cpu"):
    """Yield, record by record, the replayed EMA distance of every weight of a stored run, in Δ units (float32
    numpy [N]; None before the EMA starts, i.e. at a record of step 0): the loop of `replay_freeze_steps`,
    one record at a time, for streamed consumers (`analysis.distributions`)."""
    steps, levels, dist_codes, _, _, sizes, n_levels, raw, _ = _from_run(run, 0, 1, None, None, None)
    dev = resolve_device(device)
    units = _units(sizes, n_levels, int(levels.shape[1]), dev)
    with torch.no_grad():
        for _, _, _, _, d in _ema_stream(steps, levels, dist_codes, float(decay), dev, units, raw):
            yield None if d is None else units.to_steps(d).cpu().numpy()


# ---- accounting -------------------------------------------------------------------------------------------

@dataclass
class ReplayResult:
    """Freezing on a run, at record resolution (see the module docstring for the accounting)."""
    ratio: float                      # the threshold ratio actually used (snapped to the grid); nan if n/a
    steps: np.ndarray                 # int64 [R]
    epochs: np.ndarray                # float64 [R] (nan when steps_per_epoch is unknown)
    frozen_fraction: np.ndarray       # float64 [R], overall
    layer_frozen_fraction: np.ndarray  # float64 [n_layers, R]
    updates_eliminated: float         # mean over all optimizer steps of the frozen fraction
    backward_flops_saved: float       # mean over steps of Σ_l frac_l·F_l / (2·Σ_l F_l)
    ticket_precision: float           # share of frozen weights whose level at freezing == final level (nan if none)
    n_frozen: int                     # weights frozen by the last record
    n_frozen_correct: int
    layer_ticket_precision: np.ndarray  # float64 [n_layers]
    n_weights: int = 0                # watched quantized weights (the denominator of updates_eliminated)
    n_trainable: int | None = None    # all trainable parameters of the model, when known
    # structural: share of backward FLOPs in fully frozen channels (`channel_replay`), mean over steps like
    # backward_flops_saved, and per record; nan / None when the layers' channel counts are unknown
    backward_flops_skippable: float = float("nan")
    skippable_flops: np.ndarray | None = None     # float64 [R]

    @property
    def updates_eliminated_all_params(self) -> float:
        """The paper's denominator: frozen weight-steps ÷ (all trainable parameters × steps); nan if unknown."""
        if not self.n_trainable:
            return float("nan")
        return self.updates_eliminated * self.n_weights / self.n_trainable


def _end_step(steps: np.ndarray, total_steps: int) -> int:
    return max(int(total_steps), int(steps[-1]) + 1)


def _record_weights(steps: np.ndarray, total_steps: int) -> np.ndarray:
    """Number of optimizer steps each record stands for (the last one up to the end of the run)."""
    return np.diff(steps, append=_end_step(steps, total_steps)).astype(np.float64)


def _effective_flops(layer_flops, sizes: list[int]) -> np.ndarray:
    """Per-layer FLOP weights; like the rules, fall back to weight counts when FLOPs were not measured."""
    if layer_flops is None:
        return np.asarray(sizes, dtype=np.float64)
    f = np.asarray(layer_flops, dtype=np.float64)
    if f.size != len(sizes):
        raise ValueError(f"{f.size} layer FLOP counts for {len(sizes)} layers")
    return f if np.all(f > 0) else np.asarray(sizes, dtype=np.float64)


def _epochs(steps: np.ndarray, steps_per_epoch) -> np.ndarray:
    if steps_per_epoch:
        return steps.astype(np.float64) / float(steps_per_epoch)
    return np.full(steps.shape, np.nan)


def _flops_share(layer_counts: np.ndarray, sizes, F: np.ndarray, w: np.ndarray, E: float):
    """(per record Σ_l (n_l,r / size_l)·F_l / (2·Σ F), its step-weighted mean): the FLOP share of per-layer
    weight counts `layer_counts` [n_layers, R] (frozen weights, or weights in fully frozen channels)."""
    frac = np.nan_to_num(_safe_div(layer_counts, np.asarray(sizes, dtype=np.float64)[:, None]))
    per_r = (frac * F[:, None]).sum(axis=0) / (2 * F.sum()) if F.sum() > 0 else np.zeros(frac.shape[1])
    return per_r, float(per_r @ w / E)


def _safe_div(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def ticket_correct(freeze_steps, steps, levels) -> np.ndarray:
    """bool [N]: frozen and, at the last record at or before its freeze step, already at its final level.

    For replays the freeze step is a record step, so this is "level at the freeze record == final level".
    """
    R, N = _check_traj(levels)
    steps = _check_steps(steps, R)
    fs = np.asarray(freeze_steps, dtype=np.int64)
    rec = np.where(fs >= 0, np.searchsorted(steps, fs, side="right") - 1, -1)
    final = np.asarray(levels[-1])
    out = np.zeros(N, dtype=bool)
    for r in np.unique(rec[rec >= 0]):
        sel = rec == r
        out[sel] = np.asarray(levels[int(r)])[sel] == final[sel]
    return out


def ticket_precision(freeze_steps, steps, levels) -> float:
    """Share of frozen weights whose level when freezing equals their final level (nan if none frozen)."""
    fs = np.asarray(freeze_steps, dtype=np.int64)
    n = int((fs >= 0).sum())
    return float(ticket_correct(fs, steps, levels).sum() / n) if n else float("nan")


def freeze_accounting(freeze_steps, steps, layer_sizes=None, layer_flops=None, total_steps: int | None = None,
                      steps_per_epoch: int | None = None, correct=None, ratio: float = float("nan"),
                      n_trainable: int | None = None, layer_channels=None) -> ReplayResult:
    """Accounting of any per-weight freeze steps (a replay's or a live run's) against the record steps.

    Frozen fraction at record r: share with 0 ≤ freeze step ≤ steps[r]. Updates eliminated: Σ_w (E − f_w) /
    (N·E) (exact at step resolution, E = max(total_steps, steps[-1]+1)), which equals the record-weighted mean
    when the freeze steps are record steps. `correct` (bool [N], e.g. from `ticket_correct`) gives precision.
    """
    fs = np.asarray(freeze_steps, dtype=np.int64).ravel()
    N = fs.size
    steps = np.asarray(steps, dtype=np.int64).ravel()
    R = steps.size
    sizes = check_layer_sizes(layer_sizes, N)
    E = _end_step(steps, steps[-1] + 1 if total_steps is None else total_steps)
    nl = len(sizes)
    counts = np.zeros((nl, R), dtype=np.int64)
    frozen_steps_sum = np.zeros(nl, dtype=np.float64)
    n_corr = np.zeros(nl, dtype=np.int64)
    n_froz = np.zeros(nl, dtype=np.int64)
    corr = None if correct is None else np.asarray(correct, dtype=bool).ravel()
    off = 0
    for i, n in enumerate(sizes):
        f = fs[off:off + n]
        fz = f >= 0
        rf = np.searchsorted(steps, f[fz], side="left")
        counts[i] = np.cumsum(np.bincount(rf, minlength=R + 1)[:R])
        frozen_steps_sum[i] = np.clip(E - f[fz], 0, None).sum()
        n_froz[i] = int(fz.sum())
        if corr is not None:
            n_corr[i] = int((corr[off:off + n] & fz).sum())
        off += n
    res = accounting_from_counts(counts, frozen_steps_sum, n_froz, n_corr if corr is not None else None, sizes,
                                 layer_flops, steps, E, steps_per_epoch, ratio, n_trainable)
    if layer_channels:   # structural share, at record resolution (a channel counts from its record on)
        res.skippable_flops, res.backward_flops_skippable = _flops_share(
            skippable_counts(fs, steps, sizes, list(layer_channels)), sizes, _effective_flops(layer_flops, sizes),
            _record_weights(steps, E), float(E))
    return res


def replay_accounting(run, schedule: str = "linear", ratio: float = 1.0, warmup_steps: int | None = None,
                      decay: float = 0.99, *, granularity: str = "weight",
                      channel_quantile: float = DEFAULT_CHANNEL_QUANTILE) -> ReplayResult:
    """LTS replayed on a stored run for one threshold, with its accounting: frozen fraction per record, updates
    eliminated, backward FLOPs saved as the paper counts them (accounted) and `backward_flops_skippable`, the
    share of backward FLOPs in output channels all of whose weights are frozen (structural: what a planned
    backward can skip). `replay_freeze_steps` then `freeze_accounting` with the run's layers, channels and
    parameter count; per weight the records are streamed, `granularity="channel"` reads them
    (`channel_replay`). No ticket precision (nan): `ReplayIndex` gives it."""
    fs = replay_freeze_steps(run, schedule=schedule, ratio=ratio, warmup_steps=warmup_steps, decay=decay,
                             granularity=granularity, channel_quantile=channel_quantile)
    arr = arrays_from_run(run, with_levels=False)
    return freeze_accounting(fs, arr.steps, arr.layer_sizes, arr.layer_flops, arr.total_steps, arr.steps_per_epoch,
                             ratio=float(ratio), n_trainable=arr.n_trainable, layer_channels=arr.layer_channels)


def accounting_from_counts(counts, frozen_steps_sum, n_froz, n_corr, sizes, layer_flops, steps, E: int,
                           steps_per_epoch=None, ratio: float = float("nan"), n_trainable: int | None = None
                           ) -> ReplayResult:
    """`ReplayResult` from per-layer tallies: counts int64 [n_layers, R] (weights frozen by each record),
    frozen_steps_sum [n_layers] (Σ of E − freeze step), n_froz [n_layers], n_corr [n_layers] or None (no
    precision); E = the run's end step. What `freeze_accounting` and the streamed replays both report."""
    sizes = [int(x) for x in sizes]
    N, nl = sum(sizes), len(sizes)
    steps = np.asarray(steps, dtype=np.int64)
    F = _effective_flops(layer_flops, sizes)
    frozen_steps_sum = np.asarray(frozen_steps_sum, dtype=np.float64)
    n_froz = np.asarray(n_froz, dtype=np.int64)
    sz = np.asarray(sizes, dtype=np.float64)
    layer_frac = _safe_div(counts, sz[:, None])
    layer_upd = np.nan_to_num(_safe_div(frozen_steps_sum, sz * E))
    n_frozen = int(n_froz.sum())
    n_correct = int(np.sum(n_corr)) if n_corr is not None else 0
    return ReplayResult(
        ratio=float(ratio), steps=steps, epochs=_epochs(steps, steps_per_epoch),
        frozen_fraction=np.asarray(counts).sum(0) / max(N, 1), layer_frozen_fraction=layer_frac,
        updates_eliminated=float(frozen_steps_sum.sum() / (max(N, 1) * E)),
        backward_flops_saved=float((layer_upd * F).sum() / (2 * F.sum())) if F.sum() > 0 else 0.0,
        ticket_precision=(n_correct / n_frozen if (n_frozen and n_corr is not None) else float("nan")),
        n_frozen=n_frozen, n_frozen_correct=n_correct,
        layer_ticket_precision=(_safe_div(n_corr, n_froz) if n_corr is not None else np.full(nl, np.nan)),
        n_weights=N, n_trainable=n_trainable,
    )


# ---- fast path: precompute once, answer any ratio ---------------------------------------------------------

def _index_tables(steps, levels, dist_codes, raw_dists, units: _Units, schedule: str, W: int, T: int,
                  decay: float, B: int, J: int, dev: torch.device, chans=None):
    """The in-memory build of `ReplayIndex` (records [R, N] in memory): (cum int32 [NB, n_layers, R],
    tick_cum int64 [n_layers, NB], cum_struct). `replay_stream.IndexPass` computes the first two streamed.
    With `chans` (a `channel_replay.ChannelSpec`): channel-LTS when it says so (cum_struct = cum), else
    cum_struct counts the weights of fully frozen channels (same layout; None without channel counts)."""
    R = len(steps)
    N = int(levels.shape[1])
    sizes = units.sizes
    nl = len(sizes)
    NB, OV = J + 2, J + 1     # bins 0 … J, plus J+1 = "not frozen for any ratio ≤ max_ratio"
    # The EMA runs on `dev` (torch float32, the rule's ops); the bookkeeping on the host in numpy, so the
    # index is identical whatever the device.
    layer_base = np.repeat(np.arange(nl, dtype=np.int64) * NB, sizes)
    M = np.full(N, OV, dtype=np.int64)                       # running-minimum bin per weight
    hist = np.zeros(nl * NB, dtype=np.int64)                 # histogram of M over (layer, bin)
    hist[np.arange(nl) * NB + OV] = sizes
    tick = np.zeros(nl * NB, dtype=np.int64)                 # telescoped ticket-correct weights
    final = np.array(levels[R - 1], copy=True)
    counts = np.empty((R, nl * NB), dtype=np.int32)
    per_channel = chans is not None and chans.per_channel
    # weights in fully frozen channels (per-weight freezing; for channels they are the frozen weights)
    struct = StructuralCounter(sizes, chans.channels, NB) if (chans is not None and chans.known
                                                               and not per_channel) else None
    s_counts = np.empty((R, nl * NB), dtype=np.int32) if struct is not None else None
    with torch.no_grad():
        for r, t, lv_np, _, d in _ema_stream(steps, levels, dist_codes, decay, dev, units, raw_dists):
            if d is not None and eligible(t, W):
                g = schedule_gain(t, schedule, W, T)
                d_np = d.cpu().numpy()
                jt = np.empty(N, dtype=np.int64)
                for li, (sl, L) in enumerate(units.slices()):
                    if per_channel:
                        jt[sl] = channel_bins(d_np[sl], chans.channels[li], chans.quantile,
                                              lambda x, sc=1 / (L - 1): grid_bins(x, g, B, J, scale=sc))
                    else:
                        jt[sl] = grid_bins(d_np[sl], g, B, J, scale=1 / (L - 1))
                idx = np.flatnonzero(jt < M)
                if idx.size:
                    lb = layer_base[idx]
                    new = lb + jt[idx]
                    old = lb + M[idx]
                    hist += np.bincount(new, minlength=nl * NB)
                    hist -= np.bincount(old, minlength=nl * NB)
                    ok = lv_np[idx] == final[idx]
                    tick += np.bincount(new[ok], minlength=nl * NB)
                    tick -= np.bincount(old[ok], minlength=nl * NB)
                    M[idx] = jt[idx]
                    if struct is not None:
                        struct.update(M, np.unique(lb // NB))
            counts[r] = hist
            if struct is not None:
                s_counts[r] = struct.hist
    cum = np.ascontiguousarray(np.cumsum(counts.reshape(R, nl, NB), axis=2, dtype=np.int32).transpose(2, 1, 0))
    cum_struct = cum if per_channel else None
    if struct is not None:
        s_cum = np.cumsum(s_counts.reshape(R, nl, NB), axis=2, dtype=np.int32)
        cum_struct = np.ascontiguousarray(s_cum.transpose(2, 1, 0))
    return cum, np.cumsum(tick.reshape(nl, NB), axis=1), cum_struct


class ReplayIndex:
    """Precomputed LTS replay for one (schedule, warm-up, decay): frozen fractions for any threshold ratio.

    Idea: with g_t = `schedule_gain(t, …)`, the rule freezes a weight of layer l at step t > W iff
    d_t ≤ fl32(s_l·(ratio·g_t)), s_l = 1/(L_l−1). For every record the index computes, per weight, the smallest
    ratio-grid bin j with d_t ≤ fl32(s_l·((j/B)·g_t)) (B = `bins_per_unit`; the same double products and float32
    rounding as `ratio_at` + `threshold_norm` + the rule's comparison, so the result is exact, not an
    approximation of d/g), and its running minimum M_r over records. For the grid
    ratio J/B a weight is frozen at record r iff M_r ≤ J. The index keeps, per layer and record, the histogram of
    M_r accumulated over bins: `cum[J, layer, r]` = weights frozen at record r for ratio J/B.

    Ticket precision: a weight's running minimum drops at breakpoint records with values v_1 > v_2 > …; for
    J ∈ [v_j, v_{j-1}) it freezes at breakpoint j, so correct(J) = c_{j(J)} = Σ_j [v_j ≤ J]·(c_j − c_{j+1})
    (c_j = level at breakpoint j equals the final level, c_{n+1} = 0). Streaming: at a new breakpoint with
    correctness c, add c at bin v_new and subtract c at the previous value's bin.

    Memory: O(N) state vectors while building (never [R, N] floats) plus the int32 table
    `(max_ratio·B + 2) × n_layers × R`. Ratio resolution 1/B (default 1/1024 Δ) over [0, max_ratio]; queries
    are snapped to the nearest grid ratio (round half up) and are exact for that grid ratio: identical to
    `replay_freeze_steps(ratio=J/B)`.
    """

    def __init__(self):  # use ReplayIndex.build
        self.cum: np.ndarray | None = None
        self.cum_struct: np.ndarray | None = None

    @classmethod
    def build(cls, steps, levels=None, dist_codes=None, layer_sizes=None, layer_flops=None,
              schedule: str = "linear", warmup_steps: int | None = None, total_steps: int | None = None,
              decay: float = 0.99, device: str | torch.device = "auto", bins_per_unit: int = 1024,
              max_ratio: float = 2.0, *, steps_per_epoch: int | None = None,
              layer_names: Sequence[str] | None = None, layer_n_levels=None, raw_dists=None,
              n_trainable: int | None = None, executor=None, plan_only: bool = False,
              granularity: str = "weight", channel_quantile: float = DEFAULT_CHANNEL_QUANTILE, layer_channels=None,
              structural: bool | None = None) -> "ReplayIndex":
        """Build from arrays, or from a stored run passed as the first argument (`ReplayIndex.build(run,
        schedule="linear", warmup_steps=…, decay=…)`). With a run, its exact raw distances are used when it
        recorded them, `n_trainable` (all trainable parameters) comes from its manifest, and the records are
        streamed (`replay_stream.IndexPass`: one pass over the chunks on the CPU's cores, with `executor`, memory
        O(weights) plus one chunk; the same numbers as the in-memory build, bit for bit). `plan_only` (a stored
        run) returns (index without its tables, the `IndexPass` that computes them; `attach` them after).

        `granularity="channel"` indexes channel-LTS (`channel_replay`). `structural` (default: True for arrays,
        False for a stored run) adds a table of the weights in fully frozen channels, so every query also gives
        the structurally skippable FLOP share (needs `layer_channels`, which a run has; for channel-LTS it is
        the frozen table itself). Channel granularity and the structural table read the records in memory (not
        streamed yet); for one threshold, `freeze_accounting(replay_freeze_steps(run, …), …, layer_channels=…)`
        gives the structural share of a stored run streamed."""
        run = None
        if is_run(steps) or isinstance(steps, RunArrays):
            if levels is not None or dist_codes is not None:
                raise ValueError("when building from a run, pass schedule=, warmup_steps=, decay= … as keywords")
            if isinstance(steps, RunArrays):
                arr = steps
            else:
                if warmup_steps is None:
                    warmup_steps = _run_warmup(steps)
                run = steps if _streamable(steps) else None
                arr = arrays_from_run(steps, with_levels=run is None)
            steps, levels, dist_codes = arr.steps, arr.levels, arr.dist_codes
            layer_sizes = arr.layer_sizes if layer_sizes is None else layer_sizes
            layer_flops = arr.layer_flops if layer_flops is None else layer_flops
            layer_names = arr.layer_names if layer_names is None else layer_names
            total_steps = arr.total_steps if total_steps is None else total_steps
            steps_per_epoch = arr.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
            layer_n_levels = arr.layer_n_levels if layer_n_levels is None else layer_n_levels
            raw_dists = arr.raw_dists if raw_dists is None else raw_dists
            n_trainable = arr.n_trainable if n_trainable is None else n_trainable
            layer_channels = arr.layer_channels if layer_channels is None else layer_channels
        _check_lts_args(schedule, decay, warmup_steps, total_steps)
        schedule = canonical_schedule(schedule)
        if run is not None:
            if not run.n_records:
                raise ValueError(f"run {run.run_id} has no record yet")
            R, N = run.n_records, run.n_weights
        else:
            R, N = _check_traj(levels, None if raw_dists is not None else dist_codes)
            _check_raw(raw_dists, R, N)
        steps = _check_steps(steps, R)
        sizes = check_layer_sizes(layer_sizes, N)
        B = int(bins_per_unit)
        if B < 1 or not max_ratio > 0:
            raise ValueError("bins_per_unit must be ≥ 1 and max_ratio > 0")
        J = int(math.floor(float(max_ratio) * B + 0.5))
        dev = resolve_device(device)
        units = _units(sizes, layer_n_levels, N, dev)
        chans = channel_spec(granularity, channel_quantile, layer_channels, sizes)
        W, T = int(warmup_steps), int(total_steps)

        self = cls()
        self.granularity, self.channel_quantile = chans.granularity, chans.quantile
        self.layer_channels = chans.channels
        self.schedule, self.warmup_steps, self.total_steps, self.decay = schedule, W, T, float(decay)
        self.bins_per_unit, self.max_bin, self.max_ratio = B, J, J / B
        self.steps = steps
        self.epochs = _epochs(steps, steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.layer_sizes = np.asarray(sizes, dtype=np.int64)
        self.layer_names = list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(len(sizes))]
        self.layer_flops = _effective_flops(layer_flops, sizes)
        self.layer_n_levels = list(units.n_levels)
        self.n_weights = N
        self.n_trainable = None if n_trainable is None else int(n_trainable)
        self.record_weights = _record_weights(steps, T)
        self.end_step = _end_step(steps, T)
        self.device = str(dev)
        if structural is None:
            structural = run is None
        structural = bool(structural) and chans.known
        if run is not None and (chans.per_channel or structural):   # not streamed yet: read the records
            arr = arrays_from_run(run)
            levels, dist_codes = arr.levels, arr.dist_codes
            raw_dists = arr.raw_dists if raw_dists is None else raw_dists
            run = None
        if run is not None:
            from .replay_stream import IndexPass, RAW
            from .stream import RunSource, run_passes
            src = RunSource(run)
            self.exact_distances = src.has(RAW)
            self.device = "cpu"
            p = IndexPass(steps, units.n_levels, schedule, W, T, decay, B, J, self.exact_distances)
            if plan_only:
                return self, p
            (tables,) = run_passes(src, [p], executor)
            self.cum, self.tick_cum = tables
        else:
            self.exact_distances = raw_dists is not None
            self.cum, self.tick_cum, self.cum_struct = _index_tables(
                steps, levels, dist_codes, raw_dists, units, schedule, W, T, float(decay), B, J, dev,
                chans if (structural or chans.per_channel) else None)
        self._total_cum = None
        return self

    def attach(self, tables: tuple[np.ndarray, np.ndarray]) -> "ReplayIndex":
        """Set the tables an `IndexPass` computed for this (planned) index; returns the index."""
        self.cum, self.tick_cum = tables
        self._total_cum = None
        return self

    @classmethod
    def from_tables(cls, meta: dict, cum: np.ndarray, tick_cum: np.ndarray) -> "ReplayIndex":
        """An index from `meta` (the attributes `tables()` returned) and its two tables (e.g. from a cache)."""
        self = cls()
        for k, v in meta.items():
            setattr(self, k, v)
        for k in ("steps", "epochs", "layer_sizes", "layer_flops", "record_weights"):
            setattr(self, k, np.asarray(getattr(self, k)))
        self.cum, self.tick_cum, self._total_cum = cum, tick_cum, None
        return self

    def tables(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """(meta, cum, tick_cum): everything `from_tables` needs to rebuild this index."""
        keys = ("schedule", "warmup_steps", "total_steps", "decay", "bins_per_unit", "max_bin", "max_ratio",
                "steps", "epochs", "steps_per_epoch", "layer_sizes", "layer_names", "layer_flops",
                "layer_n_levels", "n_weights", "n_trainable", "record_weights", "end_step", "exact_distances",
                "device")
        return {k: getattr(self, k) for k in keys}, self.cum, self.tick_cum

    # ---- grid ---------------------------------------------------------------------------------------------
    @property
    def ratio_grid(self) -> np.ndarray:
        """All queryable ratios: j / bins_per_unit for j = 0 … max_bin."""
        return np.arange(self.max_bin + 1, dtype=np.float64) / self.bins_per_unit

    def ratio_bin(self, ratio: float) -> int:
        """Grid bin of a ratio (nearest grid point, round half up); ValueError outside [0, max_ratio]."""
        x = float(ratio) * self.bins_per_unit
        if not (x > -0.5 and x < self.max_bin + 0.5):
            raise ValueError(f"ratio {ratio} outside the index's range [0, {self.max_ratio}]")
        return min(max(int(math.floor(x + 0.5)), 0), self.max_bin)

    def snap(self, ratio: float) -> float:
        """The grid ratio a query for `ratio` answers."""
        return self.ratio_bin(ratio) / self.bins_per_unit

    # ---- queries ------------------------------------------------------------------------------------------
    def query(self, ratio: float) -> ReplayResult:
        """Replay outcome for threshold ratio `ratio` (snapped to the grid; exact for the snapped ratio)."""
        j = self.ratio_bin(ratio)
        counts = self.cum[j]                                     # [n_layers, R]
        sz = self.layer_sizes.astype(np.float64)
        n_r = counts.sum(axis=0, dtype=np.int64)
        frac = n_r / max(self.n_weights, 1)
        layer_frac = _safe_div(counts, sz[:, None])
        w = self.record_weights
        E = float(self.end_step)
        F = self.layer_flops
        flops_r = (np.nan_to_num(layer_frac) * F[:, None]).sum(axis=0) / (2 * F.sum()) if F.sum() > 0 \
            else np.zeros_like(frac)
        n_frozen_l = counts[:, -1].astype(np.int64)
        correct_l = self.tick_cum[:, j]
        n_frozen = int(n_frozen_l.sum())
        n_correct = int(correct_l.sum())
        skip_r, skip = None, float("nan")
        if self.cum_struct is not None:
            skip_r, skip = _flops_share(self.cum_struct[j], self.layer_sizes, F, w, E)
        return ReplayResult(
            backward_flops_skippable=skip, skippable_flops=skip_r,
            ratio=j / self.bins_per_unit, steps=self.steps, epochs=self.epochs,
            frozen_fraction=frac, layer_frozen_fraction=layer_frac,
            updates_eliminated=float(frac @ w / E), backward_flops_saved=float(flops_r @ w / E),
            ticket_precision=(n_correct / n_frozen) if n_frozen else float("nan"),
            n_frozen=n_frozen, n_frozen_correct=n_correct,
            layer_ticket_precision=_safe_div(correct_l, n_frozen_l),
            n_weights=self.n_weights, n_trainable=self.n_trainable,
        )

    def _totals(self) -> np.ndarray:
        if self._total_cum is None:
            self._total_cum = self.cum.sum(axis=1, dtype=np.int64)      # [NB, R]
        return self._total_cum

    def heatmap(self, ratios) -> np.ndarray:
        """Overall frozen fraction, float64 [len(ratios), R] (threshold × record), ratios snapped to the grid."""
        js = np.array([self.ratio_bin(x) for x in np.atleast_1d(np.asarray(ratios, dtype=np.float64))],
                      dtype=np.int64)
        return self._totals()[js] / max(self.n_weights, 1)

    def layer_heatmap(self, ratios, layer: int) -> np.ndarray:
        """Frozen fraction of one layer, float64 [len(ratios), R]."""
        js = [self.ratio_bin(x) for x in np.atleast_1d(np.asarray(ratios, dtype=np.float64))]
        return _safe_div(self.cum[js, layer, :], float(self.layer_sizes[layer]))

    def sweep(self) -> dict[str, np.ndarray]:
        """Whole-run figures for every grid ratio (arrays of length max_bin+1): ratio, updates_eliminated (over
        the watched quantized weights), updates_eliminated_all_params (over all trainable parameters; nan when
        unknown),
        backward_flops_saved, ticket_precision, final_frozen_fraction."""
        J = self.max_bin + 1
        tot = self._totals()[:J]
        w = self.record_weights
        E = float(self.end_step)
        F = self.layer_flops
        sz = self.layer_sizes.astype(np.float64)
        per_w = np.where(sz > 0, F / np.where(sz > 0, sz, 1.0), 0.0) / (2 * F.sum())   # [n_layers]
        flops = np.einsum("jlr,l,r->j", self.cum[:J].astype(np.float64), per_w, w) / E
        n_frozen = tot[:, -1]
        correct = self.tick_cum[:, :J].sum(axis=0)
        upd = tot @ w / (max(self.n_weights, 1) * E)
        upd_all = upd * self.n_weights / self.n_trainable if self.n_trainable else np.full_like(upd, np.nan)
        skip = np.full(J, np.nan) if self.cum_struct is None else \
            np.einsum("jlr,l,r->j", self.cum_struct[:J].astype(np.float64), per_w, w) / E
        return {"ratio": self.ratio_grid, "updates_eliminated": upd, "updates_eliminated_all_params": upd_all,
                "backward_flops_saved": flops, "ticket_precision": _safe_div(correct, n_frozen),
                "final_frozen_fraction": n_frozen / max(self.n_weights, 1), "backward_flops_skippable": skip}

    @property
    def nbytes(self) -> int:
        extra = self.cum_struct.nbytes if (self.cum_struct is not None and self.cum_struct is not self.cum) else 0
        return int(self.cum.nbytes + self.tick_cum.nbytes + extra)


# ---- oscillation freezing (Nagel et al. 2022) -------------------------------------------------------------

def osc_ema_update(f: torch.Tensor, x: torch.Tensor, m: float) -> torch.Tensor:
    """The oscillation rule's EMA (float32): x·m + f·(1−m) — the same ops as `OscillationRule`."""
    return x * m + f * (1 - m)


class OscReplay(NamedTuple):
    freeze_steps: np.ndarray   # int64 [N], -1 = never
    frozen_level: np.ndarray   # int64 [N] (int16 when streamed), round(level EMA) at freezing, -1 = never frozen
    freq: np.ndarray           # float32 [N], oscillation-frequency EMA after the last record


def replay_oscillation(steps, levels=None, total_steps: int | None = None, decay: float = 0.01,
                       start_frac: float = 0.25, thr_start: float = 0.1, thr_end: float = 0.01,
                       device: str | torch.device = "cpu", watch=None) -> OscReplay:
    """Replay oscillation freezing (Nagel et al. 2022) on recorded levels, one update per record.

    Per record r ≥ 1: o = 1 when the level changed and the change's direction is opposite to the weight's
    previous change; f ← o·m + f·(1−m); level EMA ← k·m + ema·(1−m) (initialised to the first level); then,
    at every record (record 0 included), with thr = `osc_threshold_at(steps[r], total_steps, …)` (0 = no
    freezing before start_frac·total_steps, then cosine-annealed thr_start → thr_end), an unfrozen weight with
    f > thr (thr > 0) freezes at steps[r] onto round(level EMA) (half to even, torch.round). The frequency is a
    per-record frequency: the EMA is not compounded over the steps between records (oscillations between
    records are invisible), so with a record every step it equals `OscillationRule`, and with coarse records it
    measures reversals per record. `watch` (bool [N]) restricts freezing to watched weights (e.g. ≤ 4 bits).
    """
    if is_run(steps) and _streamable(steps) and watch is None:
        return _stream_oscillation(steps, total_steps, decay, start_frac, thr_start, thr_end)[1]
    if is_run(steps):
        arr = arrays_from_run(steps, with_dists=False)
        steps, levels = arr.steps, arr.levels
        total_steps = arr.total_steps if total_steps is None else total_steps
    if total_steps is None or int(total_steps) < 1:
        raise ValueError("total_steps (≥ 1) is required")
    if not 0.0 < float(decay) < 1.0:
        raise ValueError(f"oscillation EMA factor must be in (0, 1), got {decay}")
    R, N = _check_traj(levels)
    steps = _check_steps(steps, R)
    dev = resolve_device(device)
    m = float(decay)
    T = int(total_steps)
    watched = None if watch is None else torch.as_tensor(np.asarray(watch, dtype=bool), device=dev)
    frozen = torch.zeros(N, dtype=torch.bool, device=dev)
    fs = torch.full((N,), -1, dtype=torch.int64, device=dev)
    flevel = torch.full((N,), -1, dtype=torch.int64, device=dev)
    freq = torch.zeros(N, dtype=torch.float32, device=dev)
    last_dir = np.zeros(N, dtype=np.int8)        # direction of the last level change (integer logic on host)
    with torch.no_grad():
        prev = level_ema = None
        for r in range(R):
            lv = np.asarray(levels[r]).astype(np.int16)
            if r == 0:
                level_ema = torch.from_numpy(lv).to(dev).float()
            else:
                direction = np.sign(lv - prev).astype(np.int8)
                changed = direction != 0
                osc = changed & (last_dir == -direction)     # a change opposite to the previous change
                last_dir = np.where(changed, direction, last_dir)
                freq = osc_ema_update(freq, torch.from_numpy(osc).to(dev).float(), m)
                level_ema = osc_ema_update(level_ema, torch.from_numpy(lv).to(dev).float(), m)
            prev = lv
            t = int(steps[r])
            thr = osc_threshold_at(t, T, start_frac, thr_start, thr_end)
            if thr <= 0:
                continue
            newly = (freq > thr) & ~frozen
            if watched is not None:
                newly &= watched
            if bool(newly.any()):
                frozen |= newly
                fs.masked_fill_(newly, t)
                flevel = torch.where(newly, torch.round(level_ema).to(torch.int64), flevel)
    return OscReplay(fs.cpu().numpy(), flevel.cpu().numpy(), freq.cpu().numpy())


def oscillation_summary(steps, levels=None, layer_sizes=None, layer_flops=None, total_steps: int | None = None,
                        decay: float = 0.01, start_frac: float = 0.25, thr_start: float = 0.1,
                        thr_end: float = 0.01, steps_per_epoch: int | None = None,
                        device: str | torch.device = "cpu", max_bits: int | None = 4,
                        layer_bits: Sequence[int] | None = None, *, executor=None, per_weight: bool = True
                        ) -> tuple[ReplayResult, OscReplay | None]:
    """Oscillation-freezing replay plus its accounting (frozen fraction per record, updates eliminated,
    backward FLOPs saved). `ticket_precision` here = share of frozen weights whose frozen level (rounded level
    EMA) equals the final recorded level. With `max_bits` and per-layer `layer_bits`, only layers of ≤ max_bits
    bits are watched (default 4, as `OscillationRule`; layers of unknown width (0) are watched); unwatched
    weights count as never frozen. Returns (accounting, per-weight replay), or with `per_weight=False`
    (accounting, None). A stored run is streamed (`replay_stream.OscPass`, with `executor`; the frozen level
    then comes as int16; without `per_weight`, no 14 bytes per weight are kept)."""
    if is_run(steps) and _streamable(steps) and levels is None and layer_sizes is None:
        run = steps
        arr = arrays_from_run(run, with_levels=False)
        bits = (arr.layer_bits or None) if layer_bits is None else layer_bits
        watch = None if max_bits is None or bits is None else [int(b) <= max_bits for b in bits]
        return _stream_oscillation(run, total_steps, decay, start_frac, thr_start, thr_end, watch,
                                   arr.layer_flops if layer_flops is None else layer_flops,
                                   arr.steps_per_epoch if steps_per_epoch is None else steps_per_epoch, executor,
                                   per_weight)
    if is_run(steps):
        arr = arrays_from_run(steps, with_dists=False)
        steps, levels = arr.steps, arr.levels
        layer_sizes = arr.layer_sizes if layer_sizes is None else layer_sizes
        layer_flops = arr.layer_flops if layer_flops is None else layer_flops
        total_steps = arr.total_steps if total_steps is None else total_steps
        steps_per_epoch = arr.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
        layer_bits = (arr.layer_bits or None) if layer_bits is None else layer_bits
    R, N = _check_traj(levels)
    sizes = check_layer_sizes(layer_sizes, N)
    watch = None
    if max_bits is not None and layer_bits is not None:
        if len(layer_bits) != len(sizes):
            raise ValueError(f"{len(layer_bits)} layer bit widths for {len(sizes)} layers")
        watch = np.repeat([int(b) <= max_bits for b in layer_bits], sizes)
    rep = replay_oscillation(steps, levels, total_steps, decay, start_frac, thr_start, thr_end, device, watch)
    correct = (rep.frozen_level >= 0) & (rep.frozen_level == np.asarray(levels[-1]).astype(np.int64))
    res = freeze_accounting(rep.freeze_steps, steps, sizes, layer_flops, total_steps, steps_per_epoch, correct)
    return res, (rep if per_weight else None)


def _stream_oscillation(run, total_steps, decay, start_frac, thr_start, thr_end, watch_layers=None,
                        layer_flops=None, steps_per_epoch=None, executor=None, per_weight: bool = True
                        ) -> tuple[ReplayResult, OscReplay | None]:
    """`oscillation_summary` of a stored run, streamed (`replay_stream.OscPass`)."""
    from .stream import RunSource, run_passes
    p, finish = oscillation_plan(run, total_steps, decay, start_frac, thr_start, thr_end, watch_layers,
                                 layer_flops, steps_per_epoch, per_weight)
    (o,) = run_passes(RunSource(run), [p], executor)
    return finish(o)


def oscillation_plan(run, total_steps=None, decay: float = 0.01, start_frac: float = 0.25, thr_start: float = 0.1,
                     thr_end: float = 0.01, watch_layers=None, layer_flops=None, steps_per_epoch=None,
                     per_weight: bool = True):
    """(the `OscPass` of a stored run, finish(pass result) -> (ReplayResult, OscReplay, or None without
    `per_weight`))."""
    from .replay_stream import OscPass
    if not run.n_records:
        raise ValueError(f"run {run.run_id} has no record yet")
    arr = arrays_from_run(run, with_levels=False)
    T = arr.total_steps if total_steps is None else total_steps
    if T is None or int(T) < 1:
        raise ValueError("total_steps (≥ 1) is required")
    if not 0.0 < float(decay) < 1.0:
        raise ValueError(f"oscillation EMA factor must be in (0, 1), got {decay}")
    steps = _check_steps(arr.steps, run.n_records)
    sizes = arr.layer_sizes
    if watch_layers is not None and len(watch_layers) != len(sizes):
        raise ValueError(f"{len(watch_layers)} layer bit widths for {len(sizes)} layers")
    flops = arr.layer_flops if layer_flops is None else layer_flops
    spe = arr.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
    E = _end_step(steps, T)

    def finish(o: dict) -> tuple[ReplayResult, OscReplay]:
        res = accounting_from_counts(o["frozen_by_record"], o["n_frozen"] * E - o["sum_freeze_steps"],
                                     o["n_frozen"], o["n_correct"], sizes, flops, steps, E, spe)
        return res, (OscReplay(o["freeze_steps"], o["frozen_level"], o["freq"]) if per_weight else None)
    return OscPass(steps, T, decay, start_frac, thr_start, thr_end, watch_layers, per_weight), finish


# ---- comparing two sets of freeze steps ------------------------------------------------------------------

def agreement(pred_freeze_steps, actual_freeze_steps) -> dict[str, float]:
    """Compare predicted freeze steps (e.g. a replay) with actual ones (-1 = never frozen).

    Returns n_pred, n_actual, n_both; jaccard = |P∩A| / |P∪A| (1.0 when both sets are empty); precision =
    |P∩A| / |P|, recall = |P∩A| / |A| (nan on empty denominators); mean_abs_step_diff = mean |Δ freeze step|
    over weights frozen in both (steps; nan if none); exact_match = share of all weights with the identical
    freeze step (both never frozen counts as a match); exact_match_frozen = share of P∩A frozen at the same step.
    """
    p = np.asarray(pred_freeze_steps, dtype=np.int64).ravel()
    a = np.asarray(actual_freeze_steps, dtype=np.int64).ravel()
    if p.shape != a.shape:
        raise ValueError(f"freeze-step arrays differ in length: {p.size} vs {a.size}")
    P, A = p >= 0, a >= 0
    both = P & A
    nb, npred, nact, nun = int(both.sum()), int(P.sum()), int(A.sum()), int((P | A).sum())
    nan = float("nan")
    diff = np.abs(p[both] - a[both])
    return {
        "n_weights": int(p.size), "n_pred": npred, "n_actual": nact, "n_both": nb,
        "jaccard": nb / nun if nun else 1.0,
        "precision": nb / npred if npred else nan,
        "recall": nb / nact if nact else nan,
        "mean_abs_step_diff": float(diff.mean()) if nb else nan,
        "exact_match": float(((p == a) | (~P & ~A)).mean()) if p.size else nan,
        "exact_match_frozen": float((diff == 0).mean()) if nb else nan,
    }
