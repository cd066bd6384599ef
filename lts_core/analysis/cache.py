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

import errno
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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


class ArrayFiles:
    """An item's per-weight arrays written straight into their cache files while a pass computes them, task by
    task (`write`), instead of filling arrays in memory that `save` writes afterwards: no fresh memory to
    fault in and zero for them (at 100M weights the level statistics' 800 MB took 0.7 s of a 4.3 s scan,
    BENCHMARKS.md "Session 12"), and the writing overlaps the scan. Each file is `<name>.tmp-<pid>-<n>` (a
    4096-byte ``.npy`` header, then the array) until `save(…, files=self)` renames it into place; `arrays()`
    gives them memory-mapped. Raises `ArrayFilesError` (an OSError) when a file cannot be created or written:
    the caller then computes in memory."""

    def __init__(self, run, item: str, settings: dict | None, stamp: dict, specs: dict[str, tuple]):
        from ..npy_direct import ALIGN, npy_header_for
        from ..store import RunError, _tmp_name
        key = _key(stamp, settings or {})
        self.key, self.header = key, ALIGN
        self.dtypes = {name: np.dtype(dt) for name, (dt, _) in specs.items()}
        self.final, self.paths, self.fds, self.direct = {}, {}, {}, {}
        self._writer, self._pending = None, []     # (`write_later`)
        self._lock = threading.Lock()
        try:
            self.final = {name: _file(run, f"{item}.{key}.{name}.npy") for name in specs}
            self.paths = {name: _tmp_name(p) for name, p in self.final.items()}
            cache_dir(run).mkdir(exist_ok=True)
            for name, (dt, n) in specs.items():
                fd = self.fds[name] = os.open(self.paths[name], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, npy_header_for((int(n),), dt, ALIGN), 0)
                os.ftruncate(fd, ALIGN + int(n) * self.dtypes[name].itemsize)
                try:    # the aligned part of each write straight from the buffer to the disk, where allowed
                    self.direct[name] = os.open(self.paths[name], os.O_WRONLY | getattr(os, "O_DIRECT", 0))
                except OSError:
                    pass
        except (OSError, KeyError, RunError) as e:    # (RunError: a `cache` that is not a folder, unsafe…)
            self.abort()
            raise ArrayFilesError(getattr(e, "errno", None), f"cannot write the cache of {item}: {e}") from None

    def write(self, name: str, start: int, part: np.ndarray) -> None:
        """part → elements start … start+len(part) of array `name`: the whole 4096-byte blocks of an aligned
        buffer at an aligned place with O_DIRECT (no copy), the rest through the page cache."""
        from ..npy_direct import ALIGN, _pwrite_all
        data = np.ascontiguousarray(part, dtype=self.dtypes[name]).reshape(-1).view(np.uint8)
        offset = self.header + int(start) * self.dtypes[name].itemsize
        n_direct = 0
        if name in self.direct and offset % ALIGN == 0 and data.ctypes.data % ALIGN == 0:
            n_direct = data.size - data.size % ALIGN     # (buffers from `aligned_empty`, tasks on 4096 columns)
        try:
            if n_direct:
                try:
                    _pwrite_all(self.direct[name], data[:n_direct], offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    n_direct = 0      # (a filesystem that takes O_DIRECT opens but not these writes)
            _pwrite_all(self.fds[name], data[n_direct:], offset + n_direct)
        except OSError as e:
            raise ArrayFilesError(e.errno, f"cannot write {self.paths[name].name}: {e}") from None

    def write_later(self, start: int, parts: dict[str, np.ndarray], then=None) -> None:
        """`write(name, start, part)` for each of `parts` on a thread of its own, then `then()` (e.g. the
        buffers go back to their pool): a task's results are written while the scan goes on (at 100M weights
        the writes made the scan's threads wait 0.7–0.8 s in all). The parts must not change until then;
        `arrays` waits for every write and raises the first error."""
        def job():
            for name, part in parts.items():
                self.write(name, start, part)
            if then is not None:
                then()
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lts-cache-write")
            self._pending.append(self._writer.submit(job))

    def _wait(self) -> None:
        """Wait for every write of `write_later`; the first error is raised (after all have ended)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.exception()
        for f in pending:
            f.result()

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, synced to the disk, memory-mapped read-only (they stay valid when renamed)."""
        from ..store import load_npy
        try:
            self._wait()
            for fd in self.fds.values():
                os.fsync(fd)
            return {name: load_npy(p, mmap_mode="r") for name, p in self.paths.items()}
        except OSError as e:
            raise ArrayFilesError(e.errno, f"cannot sync the cache files: {e}") from None
        finally:
            self._close()

    def _close(self) -> None:
        try:               # no write may still use a descriptor when it is closed (its number is reused)
            self._wait()
        except OSError:
            pass
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        for fd in [*self.fds.values(), *self.direct.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds, self.direct = {}, {}

    def abort(self) -> None:
        """Close and remove the files (a failed or abandoned build)."""
        self._close()
        for p in self.paths.values():
            try:
                p.unlink()
            except OSError:
                pass


class ArrayFilesError(OSError):
    """An `ArrayFiles` file could not be created, written or synced."""


def save(run, item: str, settings: dict | None, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray],
         extra: dict | None = None, stamp: dict | None = None, files: ArrayFiles | None = None) -> bool:
    """Write `item` (arrays as .npy, tables as one compressed .npz, then the meta); False when the run folder
    cannot be written. `stamp` defaults to the run's current stamp (pass the one the result was computed
    from when the run may have grown since). Arrays already in `files` (written during the pass, for this
    stamp) are renamed into place instead of written; its files are removed when the save fails."""
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
            if files is not None:
                files.abort()
            return False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if files is not None and files.key != key:
        raise ValueError("the cache files were written for another stamp or other settings")
    meta: dict[str, Any] = {"version": CACHE_VERSION, "stamp": stamp, "settings": settings, "key": key,
                            "arrays": sorted(arrays), "tables": sorted(tables), **(extra or {})}
    try:
        d.mkdir(exist_ok=True)
        for name, arr in arrays.items():
            if files is not None and name in files.paths:
                os.replace(files.paths[name], files.final[name])
            else:
                _atomic_save_npy(d / f"{item}.{key}.{name}.npy", np.asarray(arr))
        if tables:
            _atomic_write(d / f"{item}.{key}.npz", lambda f: np.savez_compressed(f, **tables))
        data = json.dumps(meta, default=_json_default).encode()
        _atomic_write(d / f"{item}.json", lambda f: f.write(data))
    except OSError:
        if files is not None:
            files.abort()
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


__all__ = ["CACHE_VERSION", "CACHE_DIR", "Cached", "ArrayFiles", "ArrayFilesError", "run_stamp", "load", "save",
           "prune", "clear", "cache_dir"]
