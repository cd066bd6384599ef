"""What the app's pages need on first view, computed in one streamed pass and kept beside the run.

    stats = cached_level_stats(run)          # per-weight final level, settle record, flips, reversals; occupancy
    s = cached_settle_summary(run)           # SettleSummary (curves, histogram, categories), from the above
    idx = cached_replay_index(run, "linear", warmup_steps=200, decay=0.99)   # ReplayIndex of these settings
    res = cached_oscillation_summary(run)       # oscillation freezing replayed (rule defaults): ReplayResult
    build_cache(run)                         # levels, the run's own replay index and oscillation freezing in
                                             # one scan (the recorder calls it at finish)

Each loader returns the cached result when it matches the run (`lts_core.analysis.cache`), streams only the new
chunks of a run that grew, and otherwise streams the whole run (`lts_core.analysis.stream`: memory O(weights),
both cores) and saves the result. Per-weight arrays come back memory-mapped, so a finished 10M-weight run opens
by reading a few small tables.
"""
from __future__ import annotations

import numpy as np

import hashlib
import json

from . import cache
from .level_stats import LevelStats, LevelStatsPass, result_specs
from .settle import SettleSummary
from .stream import GROUP_BYTES, Executor, RunSource, run_passes

LEVELS = "levels"
_LEVEL_ARRAYS = ("final_level", "settle_record", "flips", "reversals", "last_dir")


# ---- items: how each is computed, stored and loaded -----------------------------------------------------------

class Item:
    """One cached result: its cache name and settings, the pass that computes it (optionally resuming from an
    earlier result) and its conversion to and from the cache's arrays and tables."""

    name: str = ""

    def settings(self) -> dict:
        return {}

    resumable = False   # whether make_pass can continue from an earlier result (else: rebuilt from record 0)

    def make_pass(self, run, resume, files=None):  # pragma: no cover - interface
        raise NotImplementedError

    def files(self, run, stamp: dict):
        """A `cache.ArrayFiles` for its per-weight arrays when its pass can write them as it goes (`make_pass(…,
        files=…)`), else None (the default). Raises `cache.ArrayFilesError` when they cannot be created."""

    def finish(self, result):
        """The item's value from its pass's result (default: the result itself)."""
        return result

    def store(self, result) -> tuple[dict, dict, dict]:  # (arrays, tables, extra meta)  # pragma: no cover
        raise NotImplementedError

    def restore(self, c: cache.Cached, run):  # pragma: no cover - interface
        raise NotImplementedError


class LevelsItem(Item):
    name = LEVELS
    resumable = True

    def make_pass(self, run, resume, files=None):
        return LevelStatsPass(resume, files)

    def files(self, run, stamp: dict):
        return cache.ArrayFiles(run, self.name, self.settings(), stamp, result_specs(run.n_records, run.n_weights))

    def store(self, stats: LevelStats):
        return ({k: getattr(stats, k) for k in _LEVEL_ARRAYS},
                {"occupancy": stats.occupancy, "settle_hist": stats.settle_histogram()},
                {"n_records": stats.n_records})

    def restore(self, c: cache.Cached, run) -> LevelStats:
        a = c.arrays
        return LevelStats(int(c.meta["n_records"]), _layer_sizes(run), a["final_level"], a["settle_record"],
                          a["flips"], a["reversals"], a["last_dir"], c.tables["occupancy"],
                          c.tables.get("settle_hist"))


def _layer_sizes(run) -> list[int]:
    return [int(lay["numel"]) for lay in run.layers]


class IndexItem(Item):
    """The `ReplayIndex` of one (schedule, warm-up, decay) setting (name `replay-<hash of the settings>`)."""

    def __init__(self, schedule: str, warmup_steps: int, decay: float, bins_per_unit: int = 1024,
                 max_ratio: float = 2.0):
        from ..schedules import canonical_schedule
        self._settings = {"schedule": canonical_schedule(schedule), "warmup_steps": int(warmup_steps),
                          "decay": float(decay), "bins_per_unit": int(bins_per_unit), "max_ratio": float(max_ratio)}
        self.name = "replay-" + hashlib.sha1(json.dumps(self._settings, sort_keys=True).encode()).hexdigest()[:10]
        self._planned = None

    def settings(self) -> dict:
        return dict(self._settings)

    def make_pass(self, run, resume, files=None):
        from .replay import ReplayIndex
        self._planned, p = ReplayIndex.build(run, **self._settings, plan_only=True)
        return p

    def finish(self, tables):
        return self._planned.attach(tables)

    def store(self, index):
        meta, cum, tick = index.tables()
        return {}, {"cum": cum, "tick_cum": tick}, {"index": meta}

    def restore(self, c: cache.Cached, run):
        from .replay import ReplayIndex
        return ReplayIndex.from_tables(c.meta["index"], c.tables["cum"], c.tables["tick_cum"])


_OSC_TABLES = ("frozen_by_record", "sum_freeze_steps", "n_frozen", "n_correct")   # what OscItem keeps


class OscItem(Item):
    """Oscillation freezing replayed with the rule's defaults: the accounting of `oscillation_summary(run)`,
    streamed without per-weight results (no page shows them; at 100M weights they would be 1.4 GB to fill and
    to write). The cache keeps the per-layer tables; an older cache that also kept the per-weight arrays
    restores the same way."""

    name = "osc"

    def __init__(self, max_bits: int | None = 4):
        self.max_bits = max_bits
        self._finish = None

    def settings(self) -> dict:
        return {"max_bits": self.max_bits}

    def make_pass(self, run, resume, files=None):
        from .replay import oscillation_plan
        bits = [int(lay.get("bits") or 0) for lay in run.layers]
        watch = None if self.max_bits is None else [b <= self.max_bits for b in bits]
        p, self._finish = oscillation_plan(run, watch_layers=watch, per_weight=False)
        return p

    def finish(self, o):
        res, _ = self._finish(o)
        return res, o

    def store(self, value):
        _, o = value
        return {}, {k: o[k] for k in _OSC_TABLES}, {}

    def restore(self, c: cache.Cached, run):
        from .replay import oscillation_plan
        bits = [int(lay.get("bits") or 0) for lay in run.layers]
        watch = None if self.max_bits is None else [b <= self.max_bits for b in bits]
        _, finish = oscillation_plan(run, watch_layers=watch, per_weight=False)
        o = {k: c.tables[k] for k in _OSC_TABLES}
        res, _ = finish(o)
        return res, o


def run_settings(run) -> dict:
    """The replay settings a page opens a run with: its own LTS settings (schedule, warm-up, decay) or, for
    other rules, linear growth, the trainer's planned warm-up and m = 0.99."""
    manifest = run.manifest or {}
    rule = manifest.get("rule") or {}
    settings = (rule.get("settings") or {}) if isinstance(rule, dict) else {}
    warm = settings.get("warmup_steps", manifest.get("warmup_steps"))
    if warm is None:
        warm = int(round(0.2 * int(manifest.get("total_steps") or 0)))
    if (rule.get("name") if isinstance(rule, dict) else None) == "lts" and settings.get("schedule"):
        return {"schedule": settings["schedule"], "warmup_steps": int(warm), "decay": float(settings.get("decay", 0.99))}
    return {"schedule": "linear", "warmup_steps": int(warm), "decay": 0.99}


CACHE_GROUP_BYTES = 2 * GROUP_BYTES   # the cache build's groups: its three analyses' state visited half as often
                                     # (1.01-1.08x faster at 100M weights in 9 alternated rounds, for 60-170 MB
                                     # more; BENCHMARKS.md "Session 12")
AUTO_INDEX_BYTES = 256 << 20   # default_items skips the replay index when its table would be larger


def default_items(run) -> list[Item]:
    """The items `build_cache` keeps up to date by default: level statistics, the replay index of the run's
    own settings (`run_settings`; unless its table would exceed AUTO_INDEX_BYTES, e.g. a long run recorded at
    every step: it is then built when asked for) and oscillation freezing."""
    from .replay_stream import index_nbytes
    items: list[Item] = [LevelsItem()]
    if index_nbytes(run.n_records, len(run.layers)) <= AUTO_INDEX_BYTES:
        items.append(IndexItem(**run_settings(run)))
    return items + [OscItem()]


# ---- loaders ----------------------------------------------------------------------------------------------------

def build_cache(run, items: list[Item] | None = None, executor: Executor | None = None,
                workers: int | None = None, save: bool = True) -> dict:
    """Bring the cached `items` of `run` (default `default_items(run)`) up to date in one streamed scan: a
    fresh item is loaded, an item of a run that grew is extended from its cached result, any other is
    computed from the first record. Returns {item name: result}. `save=False` computes without writing."""
    items = default_items(run) if items is None else list(items)
    stamp = cache.run_stamp(run)
    out, todo = {}, []
    for it in items:
        c = cache.load(run, it.name, it.settings())
        if c is not None and c.status == "fresh":
            out[it.name] = it.restore(c, run)
        else:
            todo.append((it, c if c is not None and c.status == "prefix" and it.resumable else None))
    if todo:
        _require_records(run)
        # one scan from the earliest record any item needs; an item that could resume later restarts there
        first = min(c.n_chunks if c is not None else 0 for _, c in todo)
        files = [_files(it, run, stamp) if save else None for it, _ in todo]
        try:
            results = _scan(run, todo, first, files, executor, workers)
        except BaseException as e:       # no file of this build left behind
            for f in files:
                if f is not None:
                    f.abort()
            if not isinstance(e, cache.ArrayFilesError):
                raise
            files = [None] * len(todo)   # (disk full…) the per-weight arrays in memory, as for a read-only run
            results = _scan(run, todo, first, files, executor, workers)
        try:
            for (it, _), result, f in zip(todo, results, files):
                result = it.finish(result)
                if save:
                    arrays, tables, extra = it.store(result)
                    cache.save(run, it.name, it.settings(), arrays, tables, extra, stamp, files=f)
                out[it.name] = result
        finally:     # (files renamed into place stay; any other is removed)
            for f in files:
                if f is not None:
                    f.abort()
    return out


def _files(item: Item, run, stamp: dict):
    """`item.files(run, stamp)`, or None where they cannot be created (a read-only run folder…)."""
    try:
        return item.files(run, stamp)
    except cache.ArrayFilesError:
        return None


def _scan(run, todo: list, first: int, files: list, executor, workers) -> list:
    """The todo items' passes in one scan from chunk `first` (each item resumed from its cached result where
    that ends there); their results in order."""
    passes = [it.make_pass(run, it.restore(c, run) if c is not None and c.n_chunks == first else None, f)
              for (it, c), f in zip(todo, files)]
    if first == 0:   # the level statistics and the oscillation replay in one kernel where they can
        from .level_osc import fuse_level_osc
        passes, unpack = fuse_level_osc(passes)
    else:
        unpack = list
    return unpack(run_passes(RunSource(run), passes, executor, first, workers=workers,
                             group_bytes=CACHE_GROUP_BYTES))


def cached_replay_index(run, schedule: str, warmup_steps: int, decay: float, executor: Executor | None = None):
    """`ReplayIndex.build(run, schedule=…, warmup_steps=…, decay=…)`, kept beside the run (the 8 most recently
    built settings are kept)."""
    item = IndexItem(schedule, warmup_steps, decay)
    out = build_cache(run, [item], executor)[item.name]
    cache.prune(run, "replay-", keep=8)
    return out


def cached_oscillation_summary(run, executor: Executor | None = None):
    """The `ReplayResult` of `oscillation_summary(run)` (rule defaults, layers ≤ 4 bits), kept beside the run
    (its per-layer tables: kilobytes). The per-weight replay (freeze steps, frozen levels, frequencies) is
    `oscillation_summary(run)[1]`, computed when asked."""
    res, _ = build_cache(run, [OscItem()], executor)["osc"]
    return res


def cached_level_stats(run, executor: Executor | None = None) -> LevelStats:
    """`LevelStats` of the run (cached beside it; streamed and saved when missing or out of date)."""
    return build_cache(run, [LevelsItem()], executor)[LEVELS]


_DIST_ARRAYS = ("steps", "dist", "ema", "thresholds", "occupancy", "positions", "bounds", "frozen_by",
                "newly_frozen")
_DIST_SCALARS = ("n_weights", "ema_source", "pos_first", "pos_res", "signed", "n_levels", "kind", "bits")


def cached_record_distributions(run, layer: int | None = None, freeze_steps=None, replay: dict | None = None):
    """`record_distributions(run, layer, freeze_steps=…, replay=…)` kept beside the run (item
    `dist-<hash of the settings>`, the 8 most recent kept): binned counts only, a few MB at most. The settings
    are the layer, the replay's settings and a hash of the freeze steps given, so other freezing is another
    item; a run that grew is counted again."""
    from .distributions import RecordDistributions, record_distributions
    fs_hash = None if freeze_steps is None else hashlib.sha1(
        np.ascontiguousarray(freeze_steps, dtype=np.int64).tobytes()).hexdigest()[:16]
    settings = {"layer": None if layer is None else int(layer), "freeze_steps": fs_hash,
                "replay": None if replay is None else {k: (str(v) if k == "schedule" else float(v))
                                                       for k, v in sorted(replay.items())}}
    name = "dist-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    c = cache.load(run, name, settings)
    if c is not None and c.status == "fresh":
        return RecordDistributions(**{k: c.tables.get(k) for k in _DIST_ARRAYS}, **c.meta["scalars"])
    _require_records(run)
    stamp = cache.run_stamp(run)
    d = record_distributions(run, layer=layer, freeze_steps=freeze_steps, replay=replay)
    tables = {k: getattr(d, k) for k in _DIST_ARRAYS if getattr(d, k) is not None}
    if cache.save(run, name, settings, {}, tables, {"scalars": {k: getattr(d, k) for k in _DIST_SCALARS}}, stamp):
        cache.prune(run, "dist-", keep=8)
    return d


def first_view_distributions(run):
    """The distributions the app's Distributions page opens a run with, kept beside the run: its first layer,
    with the run's own freezing (recorded freeze steps) or, for a run that froze nothing, LTS replayed with the
    run's settings (`run_settings`, ρ = 1). The recorder computes it when a run finishes."""
    manifest = run.manifest or {}
    rule, config = manifest.get("rule"), manifest.get("config")
    name = (config.get("rule") if isinstance(config, dict) else None) or (
        rule.get("name") if isinstance(rule, dict) else None) or "none"
    if name != "none":   # as the app: a run's own freezing, whatever its rule
        return cached_record_distributions(run, 0, freeze_steps=run.freeze_steps(0))
    return cached_record_distributions(run, 0, replay={**run_settings(run), "ratio": 1.0})


def _require_records(run) -> None:
    if not run.n_records:
        raise ValueError(f"run {run.run_id} has no record yet")


def settle_summary_from_stats(stats: LevelStats, layer_names, steps=None, steps_per_epoch=None) -> SettleSummary:
    """The `SettleSummary` of a run from its `LevelStats` (settle records stay memory-mapped)."""
    R, N = stats.n_records, stats.n_weights
    per_layer = stats.settle_histogram()
    hist = per_layer.sum(axis=0)
    sizes = np.asarray(stats.layer_sizes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        layer_curves = np.where(sizes[:, None] > 0, np.cumsum(per_layer, axis=1) / np.maximum(sizes, 1)[:, None],
                                np.nan)
    steps_arr = None if steps is None else np.asarray(steps, dtype=np.int64)
    epochs = steps_arr.astype(np.float64) / float(steps_per_epoch) if steps_arr is not None and steps_per_epoch \
        else None
    n_never = int(hist[0])
    n_not = int(hist[R - 1]) if R > 1 else 0
    return SettleSummary(
        n_records=R, n_weights=N, steps=steps_arr, epochs=epochs, settle_records=stats.settle_record,
        curve=np.cumsum(hist) / max(N, 1), layer_curves=layer_curves, layer_names=list(layer_names),
        histogram=hist, n_never_moved=n_never, n_converged_later=N - n_never - n_not, n_not_settled=n_not,
        final_levels=stats.final_level)


def cached_settle_summary(run, executor: Executor | None = None) -> SettleSummary:
    """`settle_summary(run)` from the cached level statistics (same numbers; settle records memory-mapped)."""
    stats = cached_level_stats(run, executor)
    names = [str(lay.get("name", f"layer{i}")) for i, lay in enumerate(run.layers)]
    return settle_summary_from_stats(stats, names, run.steps, run.steps_per_epoch)


__all__ = ["Item", "LevelsItem", "IndexItem", "OscItem", "run_settings", "default_items", "cached_replay_index",
           "cached_oscillation_summary", "build_cache", "cached_level_stats", "cached_settle_summary",
           "settle_summary_from_stats", "cached_record_distributions", "first_view_distributions"]
