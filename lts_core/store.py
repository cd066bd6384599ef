"""Run store: one folder per run, written crash-safely while training and read lazily afterwards.

Layout of ``runs_dir/<run-id>/``::

    manifest.json                      what the run is, which trajectory chunks are complete, which is open
    metrics.parquet                    one row per finished epoch
    traj/<chunk:06d>.<array>.npy       step int64 [r]; level, dist, <state> uint8 [r, N]; bounds float32 [r, L, 2]
                                       (level may be stored as changes instead: level_base, level_change_at,
                                       level_change_to, see lts_core.level_delta; readers decode it;
                                       the 0/1 state `side` is stored as bits, side_bits uint8 [r, ⌈N/8⌉])
    summary/<name>.npy                 per-weight summaries (freeze_step int64, -1 = never; final_level, …)

Which names may appear is listed once, in `TRAJ_ARRAYS`, `SUMMARY_ARRAYS` and `CACHE_FILES` below; a reader
refuses any other name, any file that is not a regular file, and any path that resolves (through symlinks)
outside the run folder. Nothing is pickled: arrays are saved and loaded with ``allow_pickle=False``.

Writing. A recorder appends records as it takes them to the run's *open chunk* (`RunWriter.open_chunk`):
one file per array, each growing by whole rows after a 4096-byte ``.npy`` header (`NpyAppender`; big
arrays with ``O_DIRECT``), the ``step`` file last, so a record exists once its step is there. The manifest
names the open chunk; readers take its records from the size of its ``step`` file (every other file of the
chunk is at least that long). A full open chunk is *sealed*: final headers, exact sizes, fsync, then listed
in ``chunks``. Other files (manifest, metrics, summaries, whole chunks from `append_chunk`) are written to
``<name>.tmp-<pid>-<n>``, fsynced and renamed over their final name (``os.replace``). So a crash at any point
leaves a run that reads every record whose step reached the file; temp files are ignored. A write that
fails (disk full…) raises `StoreWriteError` naming the file and leaves what was written readable.

Reading (`open_run`, `list_runs`, `Run`) validates the manifest (`lts_core.manifest`, pydantic) and every
chunk file's ``.npy`` header and size on open (cheap: no data is read) and then memory-maps the chunks on
demand, copying only the requested columns (one layer of a big run reads only that layer's bytes).
"""
from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
import socket
import stat
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import level_delta
from .manifest import (ARRAY_NAME_PATTERN, RUN_ID_PATTERN, SCHEMA_VERSION, STATUSES, describe_errors, one_line,
                       validate_manifest)
from .npy_direct import ALIGN, MIN_BYTES, NpyAppender, PositionalReader, aligned_empty, read_buffer, write_npy_direct

METRIC_COLUMNS = ("epoch", "train_loss", "test_acc", "frozen_fraction", "updates_eliminated",
                  "backward_flops_saved", "seconds", "lr")
RAW_DIST = "raw_dist"  # optional float32 [r, N]: the LTS rule's exact raw distance, normalised units (Δ = 1/(L−1))
SIDE, SIDE_BITS = "side", "side_bits"  # the optional 0/1 `side` state array is stored as packed bits (1/8 B)
DIST_SCALE = 128  # same grid as lts_core.distance (kept here so the store needs no torch)
INTERRUPTED_REASON = "process ended without closing the run"
MANIFEST = "manifest.json"
METRICS = "metrics.parquet"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few kB (about 150 bytes per chunk); anything bigger is not one


# ---- the names a run folder may hold: the ONE list (extend it here, and in docs/ARCHITECTURE.md) ----------
@dataclass(frozen=True)
class ArraySpec:
    """How a stored array must look. `dtype`: "uint8", "float32", "int32", "int64" or "int" (any integer);
    `shape` in symbols: "r" the chunk's records, "N" weights, "N/8" bytes of N bits (⌈N/8⌉), "L" layers,
    None any length, or an int."""
    dtype: str
    shape: tuple
    doc: str = ""

    def dtype_ok(self, dt: np.dtype) -> bool:
        return dt.kind in "iu" if self.dtype == "int" else dt == np.dtype(self.dtype)

    def expected_shape(self, r: int | None, n: int, n_layers: int) -> tuple:
        sym = {"r": r, "N": n, "N/8": (n + 7) // 8, "L": n_layers}
        return tuple(sym[s] if isinstance(s, str) else s for s in self.shape)


TRAJ_ARRAYS: dict[str, ArraySpec] = {  # traj/<chunk:06d>.<name>.npy
    "step": ArraySpec("int", ("r",), "optimizer step of each record"),
    "level": ArraySpec("uint8", ("r", "N"), "level index of every weight"),
    "dist": ArraySpec("uint8", ("r", "N"), "distance to the level, code = round(Δ·128) saturating at 255"),
    "bounds": ArraySpec("float32", ("r", "L", 2), "quantizer bounds per layer (liq: lower, upper; lsq: step, nan)"),
    RAW_DIST: ArraySpec("float32", ("r", "N"), "optional: the LTS rule's exact raw distance (normalised units)"),
    SIDE_BITS: ArraySpec("uint8", ("r", "N/8"), "optional state 'side' (1 where the weight's position is at or "
                                                "above its level) as bits, np.packbits along the weights"),
    "level_base": ArraySpec("uint8", ("N",), "level stored as changes: the chunk's first record"),
    "level_change_at": ArraySpec("int", (None,), "level stored as changes: record·N + weight of each change"),
    "level_change_to": ArraySpec("uint8", (None,), "level stored as changes: the new level"),
}
STATE_ARRAY = ArraySpec("uint8", ("r", "N"), "a rule's state (LTS 'ema', osc 'freq'), named in "
                                               "manifest['state_arrays']")
SUMMARY_ARRAYS: dict[str, ArraySpec] = {  # summary/<name>.npy
    "freeze_step": ArraySpec("int", ("N",), "step at which each weight froze, -1 never"),
    "final_level": ArraySpec("uint8", ("N",), "level at the last record"),
    "settle_record": ArraySpec("int", ("N",), "first record from which the level stays final"),
    "flips": ArraySpec("int", ("N",), "level changes between consecutive records"),
}
CACHE_FILES: dict[str, str] = {  # cache/<name> (regular expressions): derived files, rebuilt when missing
    r"[A-Za-z0-9_-]{1,64}\.json": "an analysis item's meta, written last (lts_core.analysis.cache)",
    r"[A-Za-z0-9_-]{1,64}\.[0-9a-f]{12}\.[A-Za-z0-9_]{1,64}\.npy": "an analysis item's per-weight array",
    r"[A-Za-z0-9_-]{1,64}\.[0-9a-f]{12}\.npz": "an analysis item's small tables",
}
LEVEL_DELTA_ARRAYS = ("level_base", "level_change_at", "level_change_to")  # "level" as changes (level_delta)
CORE_ARRAYS = ("step", "level", "dist", "bounds")  # what a schema-1 chunk without an "arrays" list holds
REQUIRED_ARRAYS = ("step", "dist", "bounds")  # in every chunk, with "level" or all of LEVEL_DELTA_ARRAYS

_NAME_RE = re.compile(ARRAY_NAME_PATTERN)
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)


# ---- errors ---------------------------------------------------------------------------------------------
class RunError(Exception):
    """Base of every run-store error; the message names the offending file."""


class MissingManifestError(RunError):
    pass


class CorruptManifestError(RunError):
    pass


class SchemaVersionError(RunError):
    pass


class CorruptChunkError(RunError):
    pass


class UnsafePathError(RunError):
    """A file of the run is a symlink leading outside the run folder, or not a regular file."""


class CorruptMetricsError(RunError):
    pass


class RunExistsError(RunError, FileExistsError):
    pass


class StoreWriteError(RunError, OSError):
    """Writing a run's file failed (disk full, quota, read-only…). `path` is the file; `records_kept` (set
    by the recorder) how many records the run keeps on disk."""

    def __init__(self, err: int | None, strerror: str, path: str | os.PathLike, records_kept: int | None = None):
        super().__init__(err, strerror)
        self.path = str(path)
        self.records_kept = records_kept

    @classmethod
    def from_oserror(cls, e: OSError, path=None) -> "StoreWriteError":
        if isinstance(e, StoreWriteError):
            return e
        return cls(e.errno, e.strerror or str(e), e.filename or path or "?")

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)

    def __str__(self) -> str:
        head = f"disk full at {self.path}" if self.disk_full else f"cannot write {self.path} ({self.strerror})"
        return head if self.records_kept is None else f"{head}, {self.records_kept} records kept"

    def __reduce__(self):
        return type(self), (self.errno, self.strerror, self.path, self.records_kept)


# ---- small helpers --------------------------------------------------------------------------------------
def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _parse_time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch tensors and the like, without importing torch
        try:
            return obj.tolist()
        except Exception:  # pragma: no cover - defensive
            pass
    return str(obj)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


_tmp_serial = itertools.count()


def _tmp_name(path: Path) -> Path:
    """A temporary name beside `path`, of this process and unique in it: two threads writing the same file
    (two app sessions building one run's cache) never share a temporary file."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{next(_tmp_serial)}")


def _atomic_write(path: Path, write_fn) -> None:
    """Write via ``write_fn(fileobj)`` to a temp name, fsync, rename over ``path``. On failure the temp file
    is removed and an OSError is raised as `StoreWriteError` naming `path`."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise StoreWriteError.from_oserror(e, path) from None
        raise


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """`data` to `path` via a fsynced temp file and a rename; StoreWriteError (no temp file left) if the
    write fails."""
    _atomic_write(Path(path), lambda f: f.write(data))


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    arr = np.ascontiguousarray(array)
    if arr.dtype.hasobject:
        raise ValueError(f"{path}: object arrays cannot be stored (no pickle)")
    tmp = _tmp_name(path)
    try:
        direct = write_npy_direct(tmp, arr)  # big aligned arrays: fsynced, bypassing the page cache
        if direct:
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreWriteError.from_oserror(e, path) from None
    if not direct:
        _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


NPY_HEADER_LOCK = threading.Lock()
"""Held while a .npy header is parsed (here, `np.load`, and `analysis.cache`): numpy parses it with
`ast.literal_eval`, which CPython 3.11 does not run safely on several threads at once (python/cpython#106905:
a spurious SystemError "AST constructor recursion depth mismatch", which a reader would report as a damaged
file). A streamed scan's reader threads open many chunk files at once."""


def load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """`np.load(path, mmap_mode, allow_pickle=False)` with its header parsed under `NPY_HEADER_LOCK`."""
    with NPY_HEADER_LOCK:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, reading only the header (under `NPY_HEADER_LOCK`)."""
    fmt = np.lib.format
    with NPY_HEADER_LOCK, open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version} (the store writes 1.0)")
        offset = f.tell()
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered array (the store writes C order)")
    return tuple(int(s) for s in shape), dtype, offset


def _check_file(root: Path, path: Path, what: str = "file") -> bool:
    """Whether `path` exists; raise UnsafePathError unless it is a regular file inside `root` (the run
    folder, resolved). A symlink is followed only if it leads inside the run."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise UnsafePathError(f"{path}: cannot be examined ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(root):
            raise UnsafePathError(f"{path}: a symlink leading outside the run folder (to {real}); refused")
        try:
            st = os.stat(real)
        except OSError:
            return False
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path}: not a regular {what}; refused")
    return True


def _check_dir(root: Path, path: Path) -> None:
    """`path` (a sub-folder of the run) must resolve inside the run folder."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise UnsafePathError(f"{path}: leads outside the run folder (to {real}); refused")


def _check_npy(path: Path, shape: tuple | None, dtype_ok, root: Path | None = None, growing: bool = False):
    """Raise CorruptChunkError unless ``path`` is a complete .npy of ``shape`` (None entries = any). With
    `growing` (the open chunk) the first dimension is not checked and the file may be longer than its
    header says. Returns (shape, dtype, data offset, file size)."""
    if root is not None:
        if not _check_file(root, path, "chunk file"):
            raise CorruptChunkError(f"{path}: chunk file listed in the manifest is missing")
    elif not path.is_file():
        raise CorruptChunkError(f"{path}: chunk file listed in the manifest is missing")
    try:
        got_shape, got_dtype, offset = _npy_header(path)
    except Exception as e:  # truncated / garbage header
        raise CorruptChunkError(f"{path}: unreadable .npy header ({one_line(e, 200)})") from None
    if got_dtype.hasobject:
        raise CorruptChunkError(f"{path}: object dtype (pickled data is never read)")
    if shape is not None:
        want = (None,) + tuple(shape[1:]) if growing else tuple(shape)
        if len(got_shape) != len(want) or any(s is not None and s != g for s, g in zip(want, got_shape)):
            w = "×".join("?" if s is None else str(s) for s in want)
            raise CorruptChunkError(f"{path}: shape {'×'.join(map(str, got_shape))} does not match the "
                                    f"manifest ({w})")
    if dtype_ok is not None and not dtype_ok(got_dtype):
        raise CorruptChunkError(f"{path}: unexpected dtype {got_dtype}")
    expected = offset + math.prod(got_shape) * got_dtype.itemsize
    size = path.stat().st_size
    if size != expected and not (growing and size >= offset):
        raise CorruptChunkError(f"{path}: file is {size} bytes, expected {expected} "
                                f"({'truncated' if size < expected else 'trailing data'})")
    return got_shape, got_dtype, offset, size


def _is_int(dt: np.dtype) -> bool:
    return dt.kind in "iu"


def chunk_file(run_path: str | os.PathLike, index: int, array: str) -> Path:
    return Path(run_path) / "traj" / f"{int(index):06d}.{array}.npy"


def _normalise_layers(layers: list[dict]) -> list[dict]:
    out, offset = [], 0
    for i, lay in enumerate(layers):
        d = dict(lay)
        if "name" not in d:
            raise ValueError(f"layer {i} has no name")
        shape = [int(s) for s in d.get("shape", [d.get("numel", 0)])]
        numel = int(d.get("numel", int(np.prod(shape, dtype=np.int64)) if shape else 1))
        if "offset" in d and int(d["offset"]) != offset:
            raise ValueError(f"layer {d['name']!r}: offset {d['offset']} != {offset} (layers must be contiguous)")
        d.update(shape=shape, numel=numel, offset=offset)
        out.append(d)
        offset += numel
    return out


# ---- writer ---------------------------------------------------------------------------------------------
class RunWriter:
    """Writes one run folder. Every file is replaced atomically or appended to (the open chunk); the
    manifest is rewritten last. Thread-safe: one lock serialises the manifest-changing methods (the recorder
    writes from a background thread)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._lock = threading.RLock()
        self.open: ChunkAppender | None = None

    # -- creation --
    @classmethod
    def create(cls, runs_dir: str | os.PathLike, run_id: str, manifest_fields: dict | None = None) -> "RunWriter":
        if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
            raise ValueError(f"invalid run id {one_line(repr(run_id))}: use letters, digits and . _ - + = "
                             "(starting with a letter or digit, at most 255 characters)")
        runs_dir = Path(runs_dir)
        path = runs_dir / run_id
        if path.exists():
            if not path.is_dir():
                raise RunExistsError(f"{path}: exists and is not a run folder")
            if any(path.iterdir()):
                raise RunExistsError(f"{path}: run folder already exists and is not empty; "
                                     "choose another run id or delete it")
        now = _now_iso()
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "run_id": run_id, "status": "running", "reason": None,
            "config": {}, "device": None, "torch_version": None, "seed": None,
            "created": now, "updated": now, "pid": os.getpid(), "host": socket.gethostname(),
            "layers": [], "n_weights": 0, "steps_per_epoch": None, "total_steps": None, "record_every": None,
            "rule": {"name": "none"}, "chunks": [], "state_arrays": [],
        }
        fields = dict(manifest_fields or {})
        for key in ("schema_version", "run_id", "chunks", "open_chunk"):
            if key in fields:
                raise ValueError(f"manifest field {key!r} is set by the store")
        manifest.update(fields)
        if manifest["status"] not in STATUSES:
            raise ValueError(f"unknown status {manifest['status']!r}; expected one of {', '.join(STATUSES)}")
        manifest["layers"] = _normalise_layers(manifest.get("layers") or [])
        manifest["n_weights"] = sum(lay["numel"] for lay in manifest["layers"])
        manifest["state_arrays"] = list(manifest.get("state_arrays") or [])
        for name in manifest["state_arrays"]:
            _check_state_name(name)
        manifest = json.loads(json.dumps(manifest, default=_json_default))
        try:  # what we write must read back
            validate_manifest(manifest)
        except Exception as e:
            raise ValueError(f"invalid run metadata: {describe_errors(e) if hasattr(e, 'errors') else e}") from None
        try:
            (path / "traj").mkdir(parents=True, exist_ok=True)
            (path / "summary").mkdir(exist_ok=True)
        except OSError as e:
            raise StoreWriteError.from_oserror(e, path) from None
        writer = cls(path, manifest)
        writer._write_manifest()
        _fsync_dir(runs_dir)
        return writer

    # -- manifest --
    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now_iso()
        data = json.dumps(self.manifest, indent=1, default=_json_default).encode()
        _atomic_write(self.path / MANIFEST, lambda f: f.write(data))

    def update_manifest(self, **fields) -> None:
        with self._lock:
            self._update_manifest(fields)

    def _update_manifest(self, fields: dict) -> None:
        for key in ("schema_version", "run_id", "chunks", "open_chunk"):
            if key in fields:
                raise ValueError(f"manifest field {key!r} is set by the store")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}; expected one of {', '.join(STATUSES)}")
        if "layers" in fields:
            if self.manifest["chunks"] or self.open is not None:
                raise ValueError("layers cannot change once chunks are written")
            fields["layers"] = _normalise_layers(fields["layers"])
            fields["n_weights"] = sum(lay["numel"] for lay in fields["layers"])
        if "state_arrays" in fields:
            fields["state_arrays"] = list(fields["state_arrays"])
            for name in fields["state_arrays"]:
                _check_state_name(name)
        self.manifest.update(fields)
        self._write_manifest()

    def set_status(self, status: str, reason: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        with self._lock:
            self.manifest["status"] = status
            self.manifest["reason"] = reason
            self._write_manifest()

    # -- data: whole chunks --
    def _check_chunk_arrays(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
        """The arrays of a chunk, checked against the registry and converted; and new state array names."""
        if "step" not in arrays:
            raise ValueError("a chunk needs a 'step' array")
        step = np.asarray(arrays["step"])
        if step.ndim != 1 or step.shape[0] < 1 or not _is_int(step.dtype):
            raise ValueError(f"'step' must be a non-empty 1-D integer array, got {step.dtype} {step.shape}")
        n = step.shape[0]
        n_weights = int(self.manifest.get("n_weights") or 0)
        n_layers = len(self.manifest.get("layers") or [])
        prepared: dict[str, np.ndarray] = {"step": step.astype(np.int64, copy=False)}
        new_states = []
        for name, arr in arrays.items():
            if name == "step":
                continue
            if name in LEVEL_DELTA_ARRAYS or name == SIDE_BITS:
                raise ValueError(f"array name {name!r} is reserved (the store's encoding of 'level' or 'side')")
            spec = TRAJ_ARRAYS.get(name)
            if spec is None:
                _check_state_name(name)
                if name not in self.manifest["state_arrays"]:
                    new_states.append(name)
                spec = STATE_ARRAY
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise ValueError(f"array {name!r} has {arr.shape[:1]} records, 'step' has {n}")
            want = spec.expected_shape(n, n_weights, n_layers)
            if name == "bounds":
                arr = arr.astype(np.float32, copy=False)
            if arr.shape != want:
                raise ValueError(f"array {name!r} must be {list(want)}, got {list(arr.shape)}")
            if not spec.dtype_ok(arr.dtype):
                raise ValueError(f"array {name!r} must be {spec.dtype}, got {arr.dtype}")
            prepared[name] = arr
        if SIDE in prepared:  # a 0/1 array: eight weights per byte (np.packbits along the weights)
            prepared[SIDE_BITS] = _pack_side(prepared.pop(SIDE))
        return prepared, new_states

    def append_chunk(self, arrays: dict[str, np.ndarray]) -> dict:
        """Write one whole chunk (all files, atomically), then list it in the manifest. Returns its entry."""
        with self._lock:
            if self.open is not None:
                raise RuntimeError("a chunk is open for appending; seal it first")
            prepared, new_states = self._check_chunk_arrays(arrays)
            if "level" in prepared:
                enc = level_delta.encode(prepared["level"])
                if enc is not None:  # rare level changes: store the first row and the changes (level_delta)
                    del prepared["level"]
                    prepared.update(zip(LEVEL_DELTA_ARRAYS, enc))
            index = len(self.manifest["chunks"])
            for name, arr in prepared.items():
                _atomic_save_npy(chunk_file(self.path, index, name), arr)
            _fsync_dir(self.path / "traj")
            step = prepared["step"]
            entry = {"index": index, "n_records": int(step.shape[0]), "first_step": int(step[0]),
                     "last_step": int(step[-1]), "arrays": list(prepared)}
            self.manifest["chunks"].append(entry)
            self.manifest["state_arrays"].extend(new_states)
            self._write_manifest()
            return entry

    # -- data: the open chunk, appended record by record --
    def open_chunk(self, buffers: dict[str, np.ndarray]) -> "ChunkAppender":
        """Start the next chunk, backed by `buffers` (name -> array [capacity, ...]: the rows it will hold;
        `ChunkAppender.append(n)` writes the rows filled so far). New state array names are declared."""
        with self._lock:
            if self.open is not None:
                raise RuntimeError("a chunk is already open")
            self.open = ChunkAppender(self, len(self.manifest["chunks"]), buffers)
            return self.open

    def write_metrics(self, df) -> None:
        problem = metrics_problem(df)
        if problem:
            raise ValueError(f"metrics: {problem}")
        _atomic_write(self.path / METRICS, lambda f: df.to_parquet(f, index=False))

    def write_summary(self, name: str, array: np.ndarray) -> None:
        if name not in SUMMARY_ARRAYS:
            raise ValueError(f"unknown summary {name!r}; known: {', '.join(SUMMARY_ARRAYS)} "
                             "(add it to lts_core.store.SUMMARY_ARRAYS)")
        path = self.path / "summary" / f"{name}.npy"
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as e:
            raise StoreWriteError.from_oserror(e, path.parent) from None
        _atomic_save_npy(path, np.asarray(array))


def _pack_side(side: np.ndarray) -> np.ndarray:
    """Rows of the 0/1 `side` array [r, N] as bits [r, ⌈N/8⌉] (np.packbits along the weights)."""
    if side.size and side.max() > 1:
        raise ValueError(f"array {SIDE!r} must hold 0/1 values")
    return np.packbits(side, axis=1)


def _check_state_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid array name {one_line(repr(name))}: use letters, digits and _ (at most 64)")
    if name in TRAJ_ARRAYS:
        raise ValueError(f"array name {name!r} is reserved for the store's {name!r} array")


class ChunkAppender:
    """The open chunk of a run: one growing file per array (`NpyAppender`), written from the recorder's
    buffers. Levels go out as changes (`level_delta`) while that stays at most half the dense size, else
    as dense rows (the chunk then switches for good). Used from one thread at a time."""

    def __init__(self, writer: RunWriter, index: int, buffers: dict[str, np.ndarray]):
        self.writer, self.index, self.buf = writer, index, buffers
        self.n = 0  # rows written
        self.capacity = int(buffers["step"].shape[0])
        self.n_weights = int(writer.manifest.get("n_weights") or 0)
        self.files: dict[str, NpyAppender] = {}
        self.dropped: list[str] = []  # files left behind by a switch to dense levels (removed at sealing)
        prepared, new_states = writer._check_chunk_arrays({k: v[:1] for k, v in buffers.items()})
        self.level_mode = "delta" if "level" in prepared else None
        self.n_changes = 0
        try:
            for name in prepared:
                if name == "step" or name == "level":
                    continue
                if name == SIDE_BITS:  # packed as it is appended (`_pack_side`)
                    self.files[name] = NpyAppender(self._path(name), np.uint8, ((self.n_weights + 7) // 8,))
                    continue
                self.files[name] = self._new_file(name)
            if self.level_mode == "delta":
                self.files["level_base"] = NpyAppender(self._path("level_base"), np.uint8)
                self.files["level_change_at"] = NpyAppender(self._path("level_change_at"), np.int64)
                self.files["level_change_to"] = NpyAppender(self._path("level_change_to"), np.uint8)
            self.files["step"] = NpyAppender(self._path("step"), np.int64)  # never O_DIRECT: its size counts rows
            _fsync_dir(writer.path / "traj")
        except OSError as e:
            self.abandon()
            raise StoreWriteError.from_oserror(e) from None
        writer.manifest["state_arrays"].extend(new_states)
        self._write_manifest_entry()

    def _path(self, name: str) -> Path:
        return chunk_file(self.writer.path, self.index, name)

    def _new_file(self, name: str) -> NpyAppender:
        arr = self.buf[name]
        direct = (arr.nbytes >= MIN_BYTES and arr.flags.c_contiguous
                  and arr.ctypes.data % 4096 == 0)
        return NpyAppender(self._path(name), arr.dtype, arr.shape[1:], direct)

    @property
    def arrays(self) -> list[str]:
        """The chunk's arrays as readers see them, ``step`` first."""
        return ["step"] + [k for k in self.files if k != "step"]

    def _write_manifest_entry(self) -> None:
        with self.writer._lock:
            self.writer.manifest["open_chunk"] = {"index": self.index, "arrays": self.arrays}
            self.writer._write_manifest()

    def append(self, stop: int) -> None:
        """Write rows ``[n, stop)`` of the buffers (every array, ``step`` last)."""
        if stop <= self.n:
            return
        if stop > self.capacity:
            raise ValueError(f"row {stop} beyond the chunk's capacity {self.capacity}")
        try:
            if self.level_mode == "delta":
                self._append_level_changes(stop)
            for name, f in self.files.items():
                if name in ("step",) + LEVEL_DELTA_ARRAYS:
                    continue
                if name == SIDE_BITS:
                    f.append(_pack_side(self.buf[SIDE][self.n:stop]))
                    continue
                f.write_upto(self.buf[name], stop * f.row_bytes)
            self.files["step"].write_upto(self.buf["step"], stop * 8)
        except OSError as e:
            raise StoreWriteError.from_oserror(e) from None
        self.n = stop

    def _append_level_changes(self, stop: int) -> None:
        lev, n = self.buf["level"], self.n_weights
        if self.n == 0:
            self.files["level_base"].write_upto(lev[0], n)  # (never touched again)
        at_parts, to_parts = [], []
        for i in range(max(self.n, 1), stop):
            j = np.flatnonzero(lev[i] != lev[i - 1])
            if j.size:
                at_parts.append(j.astype(np.int64) + i * n)
                to_parts.append(lev[i, j])
            self.n_changes += j.size
        budget = 0.5 * (stop - 1) * n  # the rule of level_delta.encode: at most half the dense rows
        if self.n_changes * level_delta.BYTES_PER_CHANGE > budget:
            self._switch_to_dense_levels(stop)
            return
        if at_parts:
            self.files["level_change_at"].append(np.concatenate(at_parts))
            self.files["level_change_to"].append(np.concatenate(to_parts))

    def _switch_to_dense_levels(self, stop: int) -> None:
        f = self._new_file("level")
        f.write_upto(self.buf["level"], stop * f.row_bytes)
        for name in LEVEL_DELTA_ARRAYS:
            self.files.pop(name).abandon()
            self.dropped.append(name)
        self.files = {"level": f, **self.files}
        self.level_mode = "dense"
        self._write_manifest_entry()

    def sync(self) -> None:
        """fsync every file of the chunk (records survive a power cut)."""
        try:
            for f in self.files.values():
                f.sync()
        except OSError as e:
            raise StoreWriteError.from_oserror(e) from None

    def seal(self) -> dict:
        """Finish the chunk (final headers, exact sizes, fsync) and list it in the manifest."""
        n = self.n
        if n == 0:
            raise RuntimeError("an empty chunk cannot be sealed")
        try:
            for name, f in self.files.items():
                f.close(f.written // f.row_bytes if name in LEVEL_DELTA_ARRAYS else n)
        except OSError as e:
            raise StoreWriteError.from_oserror(e) from None
        _fsync_dir(self.writer.path / "traj")
        step = self.buf["step"]
        entry = {"index": self.index, "n_records": n, "first_step": int(step[0]), "last_step": int(step[n - 1]),
                 "arrays": self.arrays}
        w = self.writer
        with w._lock:
            w.manifest["chunks"].append(entry)
            w.manifest.pop("open_chunk", None)
            w.open = None
            w._write_manifest()
        for name in self.dropped:  # unlisted now: readers that opened the chunk while open keep their maps
            try:
                self._path(name).unlink()
            except OSError:
                pass
        return entry

    def abandon(self) -> None:
        """Stop writing after a failure: cut half-written rows off (frees their blocks), close the files.
        The chunk stays open in the manifest; readers take its complete records."""
        for name, f in self.files.items():
            if name not in LEVEL_DELTA_ARRAYS:
                f.truncate(self.n * f.row_bytes)
            f.abandon()
        self.writer.open = None


# ---- liveness -------------------------------------------------------------------------------------------
def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _pid_alive(pid: int, created: float | None) -> bool:
    """Is `pid` a live process on this host that could be the run's writer?"""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:  # pragma: no cover
        return False
    # Linux: a zombie has ended; a process started after the run was created is a reused pid.
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    if fields and fields[0] in ("Z", "X"):
        return False
    boot = _boot_time()
    if created is not None and boot is not None and len(fields) > 19:
        try:
            started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError):
            return True
        if started > created + 2.0:
            return False
    return True


# ---- reader ---------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict:
    """The run's manifest, checked against `lts_core.manifest.RunManifest` (raises a RunError subclass)."""
    mpath = path / MANIFEST
    if not path.is_dir():
        raise MissingManifestError(f"{mpath}: no such run folder")
    root = Path(os.path.realpath(path))
    if not _check_file(root, mpath, "manifest"):
        raise MissingManifestError(f"{mpath}: manifest missing (not a run, or it crashed before starting)")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise CorruptManifestError(f"{mpath}: {mpath.stat().st_size} bytes, too big for a manifest")
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except RunError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptManifestError(f"{mpath}: not valid JSON ({one_line(e, 200)})") from None
    except OSError as e:
        raise CorruptManifestError(f"{mpath}: cannot be read ({e.strerror})") from None
    if not isinstance(manifest, dict):
        raise CorruptManifestError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise SchemaVersionError(f"{mpath}: written by a newer scratchoff (schema {version}); "
                                 f"this version reads schemas 1 to {SCHEMA_VERSION}")
    try:
        validate_manifest(manifest)
    except Exception as e:
        why = describe_errors(e) if hasattr(e, "errors") else one_line(e)
        raise CorruptManifestError(f"{mpath}: invalid manifest — {why}") from None
    return manifest


class _ChunkMoved(Exception):
    """The open chunk was sealed or changed between reading the manifest and opening its files."""


@dataclass(frozen=True)
class RunProgress:
    """How far a run got, from what is on disk: `records` trajectory records up to step `last_step`
    (None when none), `epochs_logged` rows of metrics (never more than the records cover), and the run's
    plan (`total_steps`, `steps_per_epoch`, `epochs`; None when unknown)."""
    records: int
    last_step: int | None
    epochs_logged: int
    total_steps: int | None
    steps_per_epoch: int | None
    epochs: int | None

    @property
    def fraction(self) -> float | None:
        """Share of the planned steps recorded (0..1), None when the plan is unknown."""
        if not self.total_steps:
            return None
        return 0.0 if self.last_step is None else min(1.0, (self.last_step + 1) / self.total_steps)

    def __str__(self) -> str:
        spe = self.steps_per_epoch
        if self.last_step is None:
            where = "no record yet"
        else:
            where = f"recorded to step {self.last_step}" + (f" of {self.total_steps}" if self.total_steps else "")
            if spe:
                where += f" (epoch {(self.last_step + 1) / spe:.1f}" + (f" of {self.epochs})" if self.epochs else ")")
        return f"{where}, {self.records} records, {self.epochs_logged} epochs of metrics"


class Run:
    """A read-only view of one run. Arrays are read from memory-mapped chunk files on demand; the records
    of a run still being written (or killed) are those on disk when it was opened."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        for attempt in range(3):  # a chunk sealed while we opened it: read the manifest again
            try:
                self._open()
                return
            except _ChunkMoved:
                if attempt == 2:
                    raise RunError(f"{self.path}: the run kept changing while it was opened; try again") from None

    def _open(self) -> None:
        self.manifest: dict = _read_manifest(self.path)
        m = self.manifest
        self._root = Path(os.path.realpath(self.path))
        for sub in ("traj", "summary", "cache"):
            if os.path.lexists(self.path / sub):
                _check_dir(self._root, self.path / sub)
        self.layers: list[dict] = m["layers"]
        self.n_weights: int = sum(int(lay["numel"]) for lay in self.layers)
        self.state_arrays: list[str] = list(m.get("state_arrays") or [])
        for name in self.state_arrays:
            if name in TRAJ_ARRAYS:
                raise CorruptManifestError(f"{self.path / MANIFEST}: state array {name!r} has the name of a "
                                           "core array")
        self._chunks: list[dict] = [dict(c) for c in m["chunks"]]
        self._status, self._reason = self._effective_status()
        self._validate_chunks()
        oc = m.get("open_chunk")
        if oc is not None:
            ch = self._open_chunk_entry(oc)
            if ch is not None:
                self._chunks.append(ch)
        self.n_records: int = sum(int(c["n_records"]) for c in self._chunks)
        self._steps: np.ndarray | None = None
        self._metrics = None
        self._checked: dict = {}  # read_columns: parsed headers and checked level changes, per chunk
        self._levels_checked: set[tuple[int, int]] = set()  # (chunk, layer) whose levels are in range

    # -- identity / status --
    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.path.name)

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def status(self) -> str:
        return self._status

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def created(self) -> float | None:
        """Creation time as a Unix timestamp (None if unknown)."""
        return _parse_time(self.manifest.get("created"))

    @property
    def steps_per_epoch(self) -> int | None:
        return self.manifest.get("steps_per_epoch")

    @property
    def progress(self) -> RunProgress:
        """How far the run got (records on disk, last recorded step, epochs of metrics); see `RunProgress`.
        Reads metrics.parquet (RunError if it is broken)."""
        steps = self.steps
        epochs = self.config.get("epochs")
        return RunProgress(records=self.n_records, last_step=int(steps[-1]) if len(steps) else None,
                           epochs_logged=len(self.metrics), total_steps=self.manifest.get("total_steps"),
                           steps_per_epoch=self.steps_per_epoch, epochs=epochs)

    def _effective_status(self) -> tuple[str, str | None]:
        status, reason = self.manifest.get("status", "running"), self.manifest.get("reason")
        if status == "running" and self.manifest.get("host") == socket.gethostname():
            if not _pid_alive(self.manifest.get("pid"), self.created):
                return "interrupted", INTERRUPTED_REASON
        return status, reason

    def _spec(self, ch_index: int, name: str) -> ArraySpec:
        spec = TRAJ_ARRAYS.get(name)
        if spec is None and name in self.state_arrays:
            spec = STATE_ARRAY
        if spec is None:
            raise CorruptManifestError(f"{self.path / MANIFEST}: chunk {ch_index} lists an unknown array "
                                       f"{one_line(repr(name))}; known: {', '.join(TRAJ_ARRAYS)} and the "
                                       "state arrays the manifest declares")
        return spec

    def _check_chunk_names(self, index: int, arrays: list[str]) -> None:
        for name in arrays:
            self._spec(index, name)
        has_levels = "level" in arrays or all(a in arrays for a in LEVEL_DELTA_ARRAYS)
        missing = [a for a in REQUIRED_ARRAYS if a not in arrays] + ([] if has_levels else ["level"])
        if missing:
            raise CorruptManifestError(f"{self.path / MANIFEST}: chunk {index} has no {', '.join(missing)} array")

    def _validate_chunks(self) -> None:
        n, n_layers = self.n_weights, len(self.layers)
        for ch in self._chunks:
            r = int(ch["n_records"])
            arrays = self._chunk_arrays(ch)
            self._check_chunk_names(ch["index"], arrays)
            shapes = {}
            for name in arrays:
                spec = self._spec(ch["index"], name)
                path = chunk_file(self.path, ch["index"], name)
                shapes[name] = _check_npy(path, spec.expected_shape(r, n, n_layers), spec.dtype_ok, self._root)[0]
            if "level_base" in shapes and shapes["level_change_at"] != shapes["level_change_to"]:
                raise CorruptChunkError(f"{chunk_file(self.path, ch['index'], 'level_change_to')}: "
                                        f"{shapes['level_change_at'][0]} change positions but "
                                        f"{shapes['level_change_to'][0]} change values")

    def _open_chunk_entry(self, oc: dict) -> dict | None:
        """The records of the open chunk that are complete on disk, memory-mapped now (so that the chunk
        being sealed meanwhile does not matter), or None when it holds none yet."""
        index, arrays = int(oc["index"]), list(oc["arrays"])
        self._check_chunk_names(index, arrays)
        n, n_layers = self.n_weights, len(self.layers)
        info = {}
        for name in arrays:
            spec = self._spec(index, name)
            path = chunk_file(self.path, index, name)
            try:
                info[name] = _check_npy(path, spec.expected_shape(None, n, n_layers), spec.dtype_ok, self._root,
                                        growing=True)
            except CorruptChunkError:
                if not path.exists():
                    raise _ChunkMoved from None  # sealed (and listed) or switched since we read the manifest
                raise

        def rows_on_disk(name):
            shape, dtype, offset, size = info[name]
            per_row = dtype.itemsize * math.prod(shape[1:])
            return (size - offset) // per_row if per_row else 0

        rows = rows_on_disk("step")
        for name in arrays:
            if TRAJ_ARRAYS.get(name) is not None and TRAJ_ARRAYS[name].shape[0] != "r":
                continue
            rows = min(rows, rows_on_disk(name))
        mm, k = {}, None
        if rows and "level_base" in arrays:
            if rows_on_disk("level_base") < n:
                rows = 0
            else:
                k = min(rows_on_disk("level_change_at"), rows_on_disk("level_change_to"))
                at = self._map(index, "level_change_at", info, (k,)) if k else np.empty(0, np.int64)
                k = int(np.searchsorted(at, rows * n)) if k else 0  # changes of complete records only
        if not rows:
            return None
        for name in arrays:
            if name == "level_base":
                shape = (n,)
            elif name in ("level_change_at", "level_change_to"):
                shape = (k,)
            else:
                shape = (rows,) + info[name][0][1:]
            mm[name] = self._map(index, name, info, shape) if math.prod(shape) else \
                np.empty(shape, info[name][1])
        first, last = int(mm["step"][0]), int(mm["step"][rows - 1])
        return {"index": index, "n_records": rows, "first_step": first, "last_step": last, "arrays": arrays,
                "open": True, "maps": mm}

    def _map(self, index: int, name: str, info: dict, shape: tuple) -> np.ndarray:
        _, dtype, offset, _ = info[name]
        path = chunk_file(self.path, index, name)
        try:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        except FileNotFoundError:
            raise _ChunkMoved from None
        except (OSError, ValueError) as e:
            raise CorruptChunkError(f"{path}: cannot be read ({one_line(e, 200)})") from None

    def _chunk_arrays(self, ch: dict) -> list[str]:
        arrays = ch.get("arrays")
        if arrays is None:
            return list(CORE_ARRAYS) + self.state_arrays
        return list(arrays)

    # -- layers --
    @property
    def layer_names(self) -> list[str]:
        return [lay["name"] for lay in self.layers]

    def layer_index(self, layer: int | str) -> int:
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            i = int(layer)
            if not -len(self.layers) <= i < len(self.layers):
                raise IndexError(f"layer index {i} out of range: run {self.run_id} has {len(self.layers)} layers")
            return i % len(self.layers)
        for i, lay in enumerate(self.layers):
            if lay["name"] == layer:
                return i
        raise KeyError(f"no quantized layer {layer!r} in run {self.run_id}; layers: "
                       f"{', '.join(self.layer_names)}")

    def layer_slice(self, layer: int | str | None = None) -> slice:
        """Column range of `layer` in the flat weight index (None = all weights)."""
        if layer is None:
            return slice(0, self.n_weights)
        lay = self.layers[self.layer_index(layer)]
        return slice(int(lay["offset"]), int(lay["offset"]) + int(lay["numel"]))

    # -- chunk access --
    def _load(self, ch: dict, name: str) -> np.ndarray:
        """A stored array of one chunk, memory-mapped (a level chunk stored as changes is decoded)."""
        return self._load_cols(ch, name, None)

    def _load_cols(self, ch: dict, name: str, cols) -> np.ndarray:
        """Columns `cols` (slice, index array, or None = all) of a chunk's [r, N] array. Levels are checked
        to lie in their layer's range."""
        if name == "level" and "level_base" in self._chunk_arrays(ch):
            base, at, to = (self._load_file(ch, a) for a in LEVEL_DELTA_ARRAYS)
            problem = level_delta.check(base, at, to, int(ch["n_records"]))
            if problem:
                raise CorruptChunkError(f"{chunk_file(self.path, ch['index'], 'level_change_at')}: {problem}")
            out = level_delta.decode(base, at, to, int(ch["n_records"]), cols)
        elif name == SIDE and SIDE_BITS in self._chunk_arrays(ch):
            side = np.unpackbits(self._load_file(ch, SIDE_BITS), axis=1, count=self.n_weights)
            return side if cols is None else side[:, cols]
        else:
            mm = self._load_file(ch, name)
            out = mm if cols is None else mm[:, cols]
        if name == "level":
            self._check_levels(ch, out, cols)
        return out

    def _check_levels(self, ch: dict, arr: np.ndarray, cols) -> None:
        """CorruptChunkError if a level in `arr` (columns `cols` of chunk `ch`) is not below its layer's
        n_levels. A whole layer of a chunk is checked once per Run."""
        if not arr.size:
            return
        if cols is None:
            cols = slice(0, self.n_weights)
        if isinstance(cols, slice) and cols.step in (None, 1):
            start, stop = cols.start or 0, self.n_weights if cols.stop is None else cols.stop
            for li, lay in enumerate(self.layers):
                lim, off = lay.get("n_levels") or 256, int(lay["offset"])
                lo, hi = max(start, off), min(stop, off + int(lay["numel"]))
                whole = (lo, hi) == (off, off + int(lay["numel"]))
                if lo >= hi or lim >= 256 or (whole and (ch["index"], li) in self._levels_checked):
                    continue
                top = int(arr[:, lo - start:hi - start].max())
                if top >= lim:
                    self._level_error(ch, lay, top)
                if whole:
                    self._levels_checked.add((ch["index"], li))
            return
        flat = np.arange(self.n_weights)[cols] if isinstance(cols, slice) else np.asarray(cols, np.int64)
        ends = np.cumsum([int(lay["numel"]) for lay in self.layers])
        li = np.searchsorted(ends, flat, side="right")
        limits = np.array([lay.get("n_levels") or 256 for lay in self.layers])[li]
        bad = np.argwhere(arr >= limits)
        if bad.size:
            self._level_error(ch, self.layers[int(li[bad[0][1]])], int(arr[tuple(bad[0])]))

    def _level_error(self, ch: dict, lay: dict, top: int):
        name = "level_change_to" if "level_base" in self._chunk_arrays(ch) else "level"
        raise CorruptChunkError(f"{chunk_file(self.path, ch['index'], name)}: level {top} in layer "
                                f"{one_line(repr(lay['name']))}, which has {lay['n_levels']} levels "
                                f"(0..{lay['n_levels'] - 1})")

    def _load_file(self, ch: dict, name: str) -> np.ndarray:
        if name not in self._chunk_arrays(ch):
            raise RunError(f"{chunk_file(self.path, ch['index'], name)}: chunk {ch['index']} has no "
                           f"{name!r} array")
        if ch.get("open"):
            return ch["maps"][name]
        path = chunk_file(self.path, ch["index"], name)
        try:
            return load_npy(path, mmap_mode="r")
        except Exception as e:
            raise CorruptChunkError(f"{path}: cannot be read ({one_line(e, 200)})") from None

    @property
    def chunk_sizes(self) -> list[int]:
        """Number of records of each listed chunk, in record order."""
        return [int(ch["n_records"]) for ch in self._chunks]

    def read_columns(self, chunk: int, name: str, start: int, stop: int, out: np.ndarray | None = None,
                     check: bool = True) -> np.ndarray:
        """Columns [start, stop) of array `name` of the chunk at position `chunk`: [r, stop-start], read with
        positioned reads into `out` (a reusable buffer of at least that many elements) or a new array.

        Meant for streamed passes (`lts_core.analysis.stream`): no memory map, so nothing of the file stays
        resident in this process once the pass moves on; levels stored as changes come decoded, and are
        checked against their layer's range (`check=False`: by the caller, with `check_level_columns`).
        (The open chunk of a run being written is read from the maps taken when the run was opened.)
        """
        view = self._read_columns(chunk, name, start, stop, out)
        if name == "level" and check:
            self.check_level_columns(chunk, view, start, stop)
        return view

    def check_level_columns(self, chunk: int, levels: np.ndarray, start: int, stop: int) -> None:
        """CorruptChunkError, naming the chunk file, the level and the layer, if a level in `levels`
        (columns [start, stop) of the chunk at position `chunk`, [records, stop − start]) is not below its
        layer's n_levels."""
        self._check_levels(self._chunks[chunk], levels, slice(int(start), int(stop)))

    def _read_columns(self, chunk: int, name: str, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        ch = self._chunks[chunk]
        r, b = int(ch["n_records"]), int(stop) - int(start)
        if not 0 <= start <= stop <= self.n_weights:
            raise IndexError(f"columns [{start}, {stop}) outside 0..{self.n_weights}")
        if name == "level" and "level_base" in self._chunk_arrays(ch):
            base, at, to = (self._load_file(ch, a) for a in LEVEL_DELTA_ARRAYS)
            key = ("delta-ok", chunk)
            if key not in self._checked:
                problem = level_delta.check(base, at, to, r)
                if problem:
                    raise CorruptChunkError(f"{chunk_file(self.path, ch['index'], 'level_change_at')}: {problem}")
                self._checked[key] = True
            view = None if out is None else out.reshape(-1)[:r * b].reshape(r, b)
            return level_delta.decode_range(base, at, to, r, int(start), int(stop), view)
        if name == SIDE and SIDE_BITS in self._chunk_arrays(ch):  # the bytes holding the range, unpacked
            lo = int(start) // 8
            bits = self.read_columns_raw(chunk, SIDE_BITS, lo, -(-int(stop) // 8))
            view = np.empty((r, b), np.uint8) if out is None else out.reshape(-1)[:r * b].reshape(r, b)
            view[:] = np.unpackbits(bits, axis=1)[:, int(start) - 8 * lo:int(stop) - 8 * lo]
            return view
        return self.read_columns_raw(chunk, name, start, stop, out)

    def _header(self, chunk: int, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
        """(shape, dtype, data offset) of a sealed chunk's file, parsed once per Run."""
        key = ("header", chunk, name)
        if key not in self._checked:
            path = chunk_file(self.path, self._chunks[chunk]["index"], name)
            try:
                self._checked[key] = _npy_header(path)
            except Exception as e:
                raise CorruptChunkError(f"{path}: cannot be read ({e})") from None
        return self._checked[key]

    def read_columns_raw(self, chunk: int, name: str, start: int, stop: int, out: np.ndarray | None = None
                         ) -> np.ndarray:
        """Columns [start, stop) of the stored file `name` of a chunk, as stored (no decoding)."""
        ch = self._chunks[chunk]
        r, b = int(ch["n_records"]), int(stop) - int(start)
        if name not in self._chunk_arrays(ch):
            raise RunError(f"{chunk_file(self.path, ch['index'], name)}: chunk {ch['index']} has no "
                           f"{name!r} array")
        if ch.get("open"):
            src = ch["maps"][name][:, int(start):int(stop)]
            if out is None:
                return np.array(src)
            view = out.reshape(-1)[:r * b].reshape(r, b)
            view[...] = src
            return view
        path = chunk_file(self.path, ch["index"], name)
        shape, dtype, offset = self._header(chunk, name)
        n = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        if len(shape) != 2 or stop > n:
            raise RunError(f"{path}: not a [records, weights] array (shape {shape})")
        if out is None:
            view = np.empty((r, b), dtype=dtype)
        else:
            if out.dtype != dtype or out.size < r * b:
                raise ValueError(f"buffer of {out.size} {out.dtype} cannot hold {r}×{b} {dtype}")
            view = out.reshape(-1)[:r * b].reshape(r, b)
        item = dtype.itemsize
        try:
            f = PositionalReader(path)
        except OSError as e:
            raise CorruptChunkError(f"{path}: cannot be read ({e.strerror})") from None
        with f:
            rows = [(i, offset + (i * n + int(start)) * item) for i in range(r)]
            if b == n:  # whole rows: one read
                rows = [(slice(None), offset)]
            for i, pos in rows:
                dst = view[i]
                got = f.read_into(dst, pos)
                if got != dst.nbytes:
                    raise CorruptChunkError(f"{path}: the file ends before the data its header describes "
                                            f"(shape {shape}): {got} of {dst.nbytes} bytes at offset {pos}; "
                                            "the file was cut short")
        return view

    def column_buffer(self, name: str, start: int, stop: int, records: int, reuse: np.ndarray | None = None
                      ) -> np.ndarray:
        """A flat buffer of at least `records` rows of columns [start, stop) of array `name`, placed so that
        `read_columns` into it reads the chunk files straight from the disk (`npy_direct.PositionalReader`: its
        address congruent, modulo 4096, with the columns' offset in the first sealed chunk's file): `reuse`
        when it fits (dtype, size, placement), else a new one with room for `records` rows of `ALIGN` more
        columns (so that it fits the next task too), on transparent huge pages (`npy_direct.read_buffer`)."""
        dtype, phase = None, 0
        for c, ch in enumerate(self._chunks):
            if name in self._chunk_arrays(ch):
                if ch.get("open"):
                    dtype = ch["maps"][name].dtype
                else:
                    _, dtype, offset = self._header(c, name)
                    phase = (offset + int(start) * dtype.itemsize) % ALIGN
                break
        if dtype is None:   # levels stored as changes, side as bits: decoded into uint8
            dtype = np.dtype(np.uint8)
        n = int(records) * (int(stop) - int(start))
        if (reuse is not None and reuse.dtype == dtype and reuse.size >= n
                and (reuse.ctypes.data - phase) % ALIGN == 0):
            return reuse
        return read_buffer(n + int(records) * ALIGN, dtype, phase)

    def _gather(self, name: str, cols, width: int, dtype) -> np.ndarray:
        out = np.empty((self.n_records, width), dtype=dtype)
        r0 = 0
        for ch in self._chunks:
            r = int(ch["n_records"])
            if r:
                out[r0:r0 + r] = self._load_cols(ch, name, cols)
            r0 += r
        return out

    def _columns(self, name: str, layer, dtype=np.uint8) -> np.ndarray:
        sl = self.layer_slice(layer)
        return self._gather(name, sl, sl.stop - sl.start, dtype)

    # -- trajectories --
    @property
    def steps(self) -> np.ndarray:
        if self._steps is None:
            parts = [np.asarray(self._load(ch, "step"), dtype=np.int64) for ch in self._chunks]
            self._steps = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
            self._steps.setflags(write=False)
        return self._steps

    @property
    def epochs(self) -> np.ndarray:
        spe = self.steps_per_epoch
        return self.steps.astype(np.float64) / float(spe if spe else 1)

    def levels(self, layer: int | str | None = None) -> np.ndarray:
        """uint8 [R, n] level indices (n = the layer's weights, or all weights)."""
        return self._columns("level", layer)

    def dist_codes(self, layer: int | str | None = None) -> np.ndarray:
        """uint8 [R, n] distance codes (1/128 Δ units, saturating at 255)."""
        return self._columns("dist", layer)

    def dists(self, layer: int | str | None = None) -> np.ndarray:
        """float32 [R, n] distances to the level, in Δ units (code / 128)."""
        return decode_codes(self.dist_codes(layer))

    @property
    def has_raw_dists(self) -> bool:
        """Whether every chunk holds the rule's exact raw distances (runs recorded with `raw_distances`)."""
        return bool(self._chunks) and all(RAW_DIST in self._chunk_arrays(ch) for ch in self._chunks)

    def raw_dists(self, layer: int | str | None = None) -> np.ndarray:
        """float32 [R, n] exact raw distances the LTS rule measured, in normalised units (Δ = 1/(L−1)):
        bit for bit what the rule saw. RunError when the run did not record them (`has_raw_dists`)."""
        if not self.has_raw_dists:
            raise RunError(f"{self.path / MANIFEST}: run {self.run_id} recorded no exact raw distances "
                           f"({RAW_DIST!r}; record with raw_distances=True or every step)")
        return self._columns(RAW_DIST, layer, np.float32)

    def state(self, name: str, layer: int | str | None = None) -> np.ndarray:
        """uint8 [R, n] rule-state array (LTS: 'ema' distance code; osc: 'freq' × 255)."""
        if name not in self.state_arrays:
            raise KeyError(f"run {self.run_id} recorded no state array {name!r}; recorded: "
                           f"{', '.join(self.state_arrays) or 'none'}")
        return self._columns(name, layer)

    def bounds(self, layer: int | str | None = None) -> np.ndarray:
        """float32 [R, n_layers, 2] quantizer bounds per record (liq: lower, upper; lsq: step, nan).
        With `layer`: [R, 2]."""
        out = np.empty((self.n_records, len(self.layers), 2), dtype=np.float32)
        r0 = 0
        for ch in self._chunks:
            r = int(ch["n_records"])
            if r:
                out[r0:r0 + r] = self._load(ch, "bounds")
            r0 += r
        return out if layer is None else out[:, self.layer_index(layer)]

    def iter_chunks(self, arrays=("level", "dist"), layer: int | str | None = None) -> Iterator[dict]:
        """Stream the run chunk by chunk: dicts with 'index', 'step' and the requested stored arrays
        (memory-mapped, read-only, column-sliced to `layer`; levels stored as changes come decoded). 'dist' is the stored uint8 code; decode it
        with `decode_codes`. 'bounds' is [r, n_layers, 2] ([r, 2] with `layer`)."""
        sl = self.layer_slice(layer)
        li = None if layer is None else self.layer_index(layer)
        for ch in self._chunks:
            if not int(ch["n_records"]):
                continue
            out: dict[str, Any] = {"index": int(ch["index"]), "step": np.asarray(self._load(ch, "step"))}
            for name in arrays:
                if name == "step":
                    continue
                if name == "bounds":
                    mm = self._load(ch, name)
                    out[name] = mm if li is None else mm[:, li]
                else:
                    out[name] = self._load_cols(ch, name, sl)
            yield out

    def weights(self, idx, layer: int | str | None = None) -> dict:
        """Full trajectories of a few weights. `idx` indexes within `layer` (or the flat index if None).
        Returns {'index' (flat), 'step', 'epoch', 'level' [R,k], 'dist_code' [R,k], 'dist' float32 [R,k],
        <state> [R,k], 'freeze_step' [k] (if recorded)}."""
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        sl = self.layer_slice(layer)
        width = sl.stop - sl.start
        if idx.size and (idx.min() < -width or idx.max() >= width):
            raise IndexError(f"weight index out of range (0..{width - 1}) for "
                             f"{'run' if layer is None else f'layer {layer!r}'} in {self.run_id}")
        flat = np.where(idx < 0, idx + width, idx) + sl.start
        out: dict[str, Any] = {"index": flat, "step": self.steps, "epoch": self.epochs,
                               "level": self._gather("level", flat, flat.size, np.uint8)}
        codes = self._gather("dist", flat, flat.size, np.uint8)
        out["dist_code"], out["dist"] = codes, decode_codes(codes)
        for name in self.state_arrays:
            out[name] = self._gather(name, flat, flat.size, np.uint8)
        if self.has_raw_dists:
            out[RAW_DIST] = self._gather(RAW_DIST, flat, flat.size, np.float32)
        fs = self.freeze_steps()
        if fs is not None:
            out["freeze_step"] = fs[flat]
        return out

    # -- summaries / metrics --
    @property
    def summaries(self) -> list[str]:
        """Names of the known summaries (`SUMMARY_ARRAYS`) this run has."""
        d = self.path / "summary"
        return [name for name in SUMMARY_ARRAYS if (d / f"{name}.npy").exists()]

    def summary(self, name: str) -> np.ndarray:
        """A per-weight summary array [n_weights] (see `SUMMARY_ARRAYS`)."""
        spec = SUMMARY_ARRAYS.get(name)
        if spec is None:
            raise KeyError(f"unknown summary {one_line(repr(name))}; known: {', '.join(SUMMARY_ARRAYS)}")
        path = self.path / "summary" / f"{name}.npy"
        if not _check_file(self._root, path, "summary file"):
            raise RunError(f"{path}: no summary {name!r} in run {self.run_id}")
        try:
            _check_npy(path, spec.expected_shape(None, self.n_weights, len(self.layers)), spec.dtype_ok)
            return load_npy(path)
        except CorruptChunkError as e:
            raise RunError(str(e).replace("does not match the manifest", "does not match the run")) from None
        except Exception as e:
            raise RunError(f"{path}: cannot be read ({one_line(e, 200)})") from None

    def cache_file(self, name: str) -> Path:
        """Path of a derived file in the run's ``cache/`` folder; `name` must be listed in `CACHE_FILES`
        (or match one of its keys as a regular expression). The path may not exist yet; if it exists it
        is a regular file inside the run folder (UnsafePathError otherwise)."""
        if not any(name == k or re.fullmatch(k, name) for k in CACHE_FILES) or "/" in name or name in (".", ".."):
            raise KeyError(f"unknown cache file {one_line(repr(name))}; add it to lts_core.store.CACHE_FILES")
        path = self.path / "cache" / name
        _check_file(self._root, path, "cache file")
        return path

    def freeze_steps(self, layer: int | str | None = None) -> np.ndarray | None:
        """int64 [n] step at which each weight froze (-1 never); None if the run has no such summary."""
        if "freeze_step" not in self.summaries:
            return None
        return self.summary("freeze_step")[self.layer_slice(layer)]

    @property
    def metrics(self):
        """pandas DataFrame, one row per finished epoch, with at least `METRIC_COLUMNS` (numbers).
        CorruptMetricsError (a RunError) if metrics.parquet is unreadable or lacks them."""
        import pandas as pd
        if self._metrics is None:
            path = self.path / METRICS
            if not _check_file(self._root, path, "metrics file"):
                self._metrics = pd.DataFrame({c: pd.Series(dtype="float64") for c in METRIC_COLUMNS})
            else:
                try:
                    df = pd.read_parquet(path)
                except Exception as e:
                    raise CorruptMetricsError(f"{path}: cannot be read ({one_line(e, 200)})") from None
                problem = metrics_problem(df)
                if problem:
                    raise CorruptMetricsError(f"{path}: {problem}")
                self._metrics = df
        return self._metrics

    def __repr__(self) -> str:
        return (f"Run({self.run_id!r}, status={self.status!r}, records={self.n_records}, "
                f"weights={self.n_weights}, layers={len(self.layers)})")


def metrics_problem(df) -> str | None:
    """What is wrong with a metrics table (None if nothing): every `METRIC_COLUMNS` column must be there
    and numeric."""
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        return f"columns {', '.join(missing)} missing (has {one_line(', '.join(map(str, df.columns)), 200)})"
    bad = [c for c in METRIC_COLUMNS if df[c].dtype.kind not in "fiu"]
    if bad:
        return f"columns {', '.join(bad)} are not numbers ({', '.join(str(df[c].dtype) for c in bad)})"
    return None


def decode_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 distance code -> float32 Δ (numpy twin of lts_core.distance.decode_distance)."""
    out = np.asarray(codes).astype(np.float32)
    out /= np.float32(DIST_SCALE)
    return out


def open_run(path: str | os.PathLike) -> Run:
    return Run(path)


@dataclass
class RunEntry:
    path: Path
    run_id: str
    ok: bool
    error: str | None
    run: Run | None
    status: str           # the run's status, or "broken" when it cannot be opened
    created: float | None = None
    manifest: dict | None = None   # the manifest when it is valid (even if the run is broken otherwise)
    group: str | None = None       # the sub-folder holding it (e.g. a sweep), None at the top level


RUN_MARKERS = (MANIFEST, "traj", "metrics.parquet", "summary")


def _subdirs(p: Path) -> list[Path]:
    try:
        return sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith("."))
    except OSError:
        return []


def _entry(p: Path, group: str | None) -> RunEntry:
    try:
        run = Run(p)
        return RunEntry(p, run.run_id, True, None, run, run.status, run.created, run.manifest, group)
    except Exception as e:  # one broken run never hides the others
        try:
            manifest = _read_manifest(p)  # a broken run still shows its (valid) manifest's fields
        except Exception:
            manifest = None
        created = _parse_time(manifest.get("created")) if manifest else None
        if created is None:
            try:
                created = p.stat().st_mtime
            except OSError:
                created = None
        run_id = str(manifest.get("run_id") or p.name) if manifest else p.name
        msg = str(e) if isinstance(e, RunError) else f"{p}: {type(e).__name__}: {e}"
        return RunEntry(p, run_id, False, one_line(msg, 1000), None, "broken", created, manifest, group)


def list_runs(folder: str | os.PathLike, depth: int = 2) -> list[RunEntry]:
    """Every run under `folder`, newest first; a broken run is listed with ok=False and its error.

    A folder holding a manifest or run files is a run (broken if its manifest is missing); a folder holding
    only sub-folders is a group (e.g. a sweep) searched `depth - 1` levels further; empty folders are skipped.
    """
    folder = Path(folder)
    entries: list[RunEntry] = []

    def scan(d: Path, level: int, group: str | None) -> None:
        for p in _subdirs(d):
            if any((p / m).exists() for m in RUN_MARKERS):
                entries.append(_entry(p, group))
            elif level > 1:
                scan(p, level - 1, p.name if group is None else f"{group}/{p.name}")

    if folder.is_dir():
        scan(folder, depth, None)
    entries.sort(key=lambda e: (e.created if e.created is not None else -math.inf, e.run_id), reverse=True)
    return entries


def runs_dir() -> Path:
    """The default runs folder: $SCRATCHOFF_RUNS, else <data>/runs ($SCRATCHOFF_DATA or the repo's data/)."""
    env = os.environ.get("SCRATCHOFF_RUNS")
    if env:
        return Path(env)
    data = os.environ.get("SCRATCHOFF_DATA")
    return (Path(data) if data else Path(__file__).resolve().parent.parent / "data") / "runs"


__all__ = ["NPY_HEADER_LOCK", "load_npy", "SCHEMA_VERSION", "STATUSES", "METRIC_COLUMNS", "TRAJ_ARRAYS", "SUMMARY_ARRAYS", "CACHE_FILES",
           "ArraySpec", "RunError", "MissingManifestError", "CorruptManifestError", "SchemaVersionError",
           "CorruptChunkError", "CorruptMetricsError", "UnsafePathError", "RunExistsError", "StoreWriteError",
           "RunWriter", "ChunkAppender", "Run", "RunEntry", "RunProgress", "open_run", "list_runs", "runs_dir",
           "decode_codes", "chunk_file", "write_file_atomic", "metrics_problem"]
