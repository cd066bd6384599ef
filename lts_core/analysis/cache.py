"""Analysis results kept beside the run, in `<run>/cache/`: computed once, versioned, rebuilt when the run changes.

Every item (level statistics, distributions, a replay index, …) is stored as

    cache/<item>.json                 meta: cache version, the run's stamp, the item's settings, file key
    cache/<item>.<key>.<array>.npy    per-weight arrays (read memory-mapped: a page reads only what it shows)
    cache/<item>.<key>.npz            small tables (per record / layer / bin), compressed

where `<key>` is derived from the stamp, so a reader never mixes files of two builds; the meta file is written
last (atomically) and the files of older keys are removed after it. The **stamp** is what identifies the
recorded data: run id, creation time, number of weights and the manifest's chunk list. A cached item is used
when its stamp equals the run's, *extended* when its chunk list is a prefix of the run's (a live run wrote
more records: only the new chunks are streamed), and rebuilt otherwise (or when `CACHE_VERSION` changed).
A run folder that cannot be written (read-only media) is analysed in memory each time, with no error.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1
CACHE_DIR = "cache"


def run_stamp(run) -> dict:
    """What a cached result was computed from: identity and chunk list of the run's recorded data."""
    m = run.manifest
    return {"run_id": str(m.get("run_id")), "created": m.get("created"), "n_weights": int(run.n_weights),
            "chunks": [[int(c["n_records"]), int(c.get("first_step", -1)), int(c.get("last_step", -1))]
                       for c in m.get("chunks", [])]}


def _key(stamp: dict, settings: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, "stamp": stamp, "settings": settings}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def cache_dir(run) -> Path:
    return Path(run.path) / CACHE_DIR


def _file(run, name: str) -> Path:
    """cache/<name>, as the store allows it (`Run.cache_file`: a name listed in `store.CACHE_FILES`, a regular
    file inside the run folder; KeyError or RunError otherwise)."""
    return run.cache_file(name) if hasattr(run, "cache_file") else cache_dir(run) / name


class Cached:
    """What `load` found for an item: its meta, memory-mapped per-weight arrays, tables, and how it relates to
    the run now (`status`: 'fresh', 'prefix' (the run has more chunks) or 'stale')."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray], status: str):
        self.meta, self.arrays, self.tables, self.status = meta, arrays, tables, status

    @property
    def n_chunks(self) -> int:
        return len(self.meta["stamp"]["chunks"])


def load(run, item: str, settings: dict | None = None) -> Cached | None:
    """The cached `item` of `run` for `settings`, or None when absent, unreadable or of another version,
    settings or run."""
    from ..store import NPY_HEADER_LOCK, RunError, load_npy
    settings = settings or {}
    try:
        meta = json.loads(_file(run, f"{item}.json").read_text())
    except (OSError, ValueError, KeyError, RunError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("settings") != \
            json.loads(json.dumps(settings)):
        return None
    now, then = run_stamp(run), meta.get("stamp") or {}
    if any(now[k] != then.get(k) for k in ("run_id", "created", "n_weights")):
        return None
    chunks = then.get("chunks") or []
    if chunks == now["chunks"]:
        status = "fresh"
    elif 0 < len(chunks) < len(now["chunks"]) and now["chunks"][:len(chunks)] == chunks:
        status = "prefix"
    else:
        return None
    key = meta.get("key")
    try:  # names from the meta file are checked by the store: nothing outside the run is read
        arrays = {name: load_npy(_file(run, f"{item}.{key}.{name}.npy"), mmap_mode="r")
                  for name in meta.get("arrays", [])}
        tables = {}
        if meta.get("tables"):   # (each member's header is parsed as it is read)
            with NPY_HEADER_LOCK, np.load(_file(run, f"{item}.{key}.npz"), allow_pickle=False) as z:
                tables = {name: z[name] for name in meta["tables"]}
    except (OSError, ValueError, KeyError, EOFError, TypeError, RunError):
        return None   # removed by a newer build, damaged or crafted: recompute
    return Cached(meta, arrays, tables, status)


def save(run, item: str, settings: dict | None, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray],
         extra: dict | None = None, stamp: dict | None = None) -> bool:
    """Write `item` (arrays as .npy, tables as one compressed .npz, then the meta); False when the run folder
    cannot be written. `stamp` defaults to the run's current stamp (pass the one the result was computed
    from when the run may have grown since)."""
    from ..store import _atomic_save_npy, _atomic_write
    settings = settings or {}
    stamp = run_stamp(run) if stamp is None else stamp
    key = _key(stamp, settings)
    d = cache_dir(run)
    try:   # a newer build (from a later look at a live run) is never replaced by an older one
        old = json.loads((d / f"{item}.json").read_text())
        old_chunks = old["stamp"]["chunks"]
        if (old.get("version") == CACHE_VERSION and old.get("settings") == json.loads(json.dumps(settings))
                and len(old_chunks) > len(stamp["chunks"]) and old_chunks[:len(stamp["chunks"])] == stamp["chunks"]
                and all(old["stamp"].get(k) == stamp[k] for k in ("run_id", "created", "n_weights"))):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    meta: dict[str, Any] = {"version": CACHE_VERSION, "stamp": stamp, "settings": settings, "key": key,
                            "arrays": sorted(arrays), "tables": sorted(tables), **(extra or {})}
    try:
        d.mkdir(exist_ok=True)
        for name, arr in arrays.items():
            _atomic_save_npy(d / f"{item}.{key}.{name}.npy", np.asarray(arr))
        if tables:
            _atomic_write(d / f"{item}.{key}.npz", lambda f: np.savez_compressed(f, **tables))
        data = json.dumps(meta, default=_json_default).encode()
        _atomic_write(d / f"{item}.json", lambda f: f.write(data))
    except OSError:
        return False
    written = {f"{item}.{key}.{name}.npy" for name in arrays} | ({f"{item}.{key}.npz"} if tables else set())
    for p in d.glob(f"{item}.*"):   # files of earlier builds of this item (also of an older layout of it)
        if p.name != f"{item}.json" and p.name not in written and ".tmp-" not in p.name:
            try:
                p.unlink()
            except OSError:
                pass
    return True


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def prune(run, prefix: str, keep: int) -> None:
    """Keep only the `keep` most recently written items whose name starts with `prefix`."""
    d = cache_dir(run)

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    metas = sorted(d.glob(f"{prefix}*.json"), key=mtime, reverse=True) if d.is_dir() else []
    for meta in metas[keep:]:
        item = meta.name[:-5]
        for p in d.glob(f"{item}.*"):
            try:
                p.unlink()
            except OSError:
                pass


def clear(run) -> None:
    """Remove every cached result of `run` (they are rebuilt on demand)."""
    d = cache_dir(run)
    if d.is_dir():
        for p in d.iterdir():
            try:
                p.unlink()
            except OSError:
                pass


__all__ = ["CACHE_VERSION", "CACHE_DIR", "Cached", "run_stamp", "load", "save", "prune", "clear", "cache_dir"]
