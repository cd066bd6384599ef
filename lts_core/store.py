"""Run store: one folder per run, written crash-safely while training and read lazily afterwards.

Layout of ``runs_dir/<run-id>/``::

    manifest.json                      what the run is and which trajectory chunks are complete
    metrics.parquet                    one row per finished epoch
    traj/<chunk:06d>.<array>.npy       step int64 [r]; level, dist, <state> uint8 [r, N]; bounds float32 [r, L, 2]
                                       (level may be stored as changes instead: level_base, level_change_at,
                                       level_change_to, see lts_core.level_delta; readers decode it)
    summary/<name>.npy                 per-weight summaries (freeze_step int64, -1 = never)

Every file is written to ``<name>.tmp-<pid>``, fsynced and renamed over its final name (``os.replace``);
chunk arrays of 1 MiB or more go to disk with ``O_DIRECT`` where the filesystem allows it
(`lts_core.npy_direct`: same ``.npy`` format, far less CPU per MB).
A chunk is listed in the manifest only after all of its files exist, so a crash at any point leaves a run
that reads up to its last listed chunk; unlisted (orphan) chunk files and temp files are ignored.
Nothing is pickled: arrays are saved and loaded with ``allow_pickle=False``.

Reading (`open_run`, `list_runs`, `Run`) validates the manifest and every listed chunk file's ``.npy``
header and size on open (cheap: no data is read) and then memory-maps the chunks on demand, copying only
the requested columns (one layer of a big run reads only that layer's bytes).
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import level_delta
from .npy_direct import write_npy_direct

SCHEMA_VERSION = 2  # 2: a chunk's levels may be stored as changes (level_delta); version 1 runs still read
STATUSES = ("running", "complete", "interrupted", "failed")
METRIC_COLUMNS = ("epoch", "train_loss", "test_acc", "frozen_fraction", "updates_eliminated",
                  "backward_flops_saved", "seconds", "lr")
CORE_ARRAYS = ("step", "level", "dist", "bounds")
LEVEL_DELTA_ARRAYS = ("level_base", "level_change_at", "level_change_to")  # "level" as changes (level_delta)
SIDE, SIDE_BITS = "side", "side_bits"  # the optional 0/1 `side` state array is stored as packed bits (1/8 B)
RAW_DIST = "raw_dist"  # optional float32 [r, N]: the LTS rule's exact raw distance, normalised units (Δ = 1/(L−1))
DIST_SCALE = 128  # same grid as lts_core.distance (kept here so the store needs no torch)
INTERRUPTED_REASON = "process ended without closing the run"
MANIFEST = "manifest.json"
METRICS = "metrics.parquet"

_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


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


class RunExistsError(RunError, FileExistsError):
    pass


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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _atomic_write(path: Path, write_fn) -> None:
    """Write via ``write_fn(fileobj)`` to a temp name, fsync, rename over ``path``."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    arr = np.ascontiguousarray(array)
    if arr.dtype.hasobject:
        raise ValueError(f"{path}: object arrays cannot be stored (no pickle)")
    tmp = _tmp_name(path)
    if write_npy_direct(tmp, arr):  # big aligned arrays: fsynced, bypassing the page cache
        os.replace(tmp, path)
        return
    _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, reading only the header."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:  # version 3 (utf-8 field names): let np.load parse it
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return tuple(arr.shape), arr.dtype, arr.offset
        offset = f.tell()
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered array (the store writes C order)")
    return tuple(int(s) for s in shape), dtype, offset


def _check_npy(path: Path, shape: tuple[int, ...] | None, dtype_ok) -> None:
    """Raise CorruptChunkError unless ``path`` is a complete .npy of ``shape`` (None entries = any)."""
    if not path.is_file():
        raise CorruptChunkError(f"{path}: chunk file listed in the manifest is missing")
    try:
        got_shape, got_dtype, offset = _npy_header(path)
    except Exception as e:  # truncated / garbage header
        raise CorruptChunkError(f"{path}: unreadable .npy header ({e})") from None
    if got_dtype.hasobject:
        raise CorruptChunkError(f"{path}: object dtype (pickled data is never read)")
    if shape is not None and (len(got_shape) != len(shape) or
                              any(s is not None and s != g for s, g in zip(shape, got_shape))):
        want = "×".join("?" if s is None else str(s) for s in shape)
        raise CorruptChunkError(f"{path}: shape {'×'.join(map(str, got_shape))} does not match the "
                                f"manifest ({want})")
    if dtype_ok is not None and not dtype_ok(got_dtype):
        raise CorruptChunkError(f"{path}: unexpected dtype {got_dtype}")
    expected = offset + int(np.prod(got_shape, dtype=np.int64)) * got_dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise CorruptChunkError(f"{path}: file is {size} bytes, expected {expected} "
                                f"({'truncated' if size < expected else 'trailing data'})")


def _is_u8(dt: np.dtype) -> bool:
    return dt == np.uint8


def _is_int(dt: np.dtype) -> bool:
    return dt.kind in "iu"


def _is_f32(dt: np.dtype) -> bool:
    return dt == np.float32


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
    """Writes one run folder. Every file is replaced atomically; the manifest is rewritten last.
    Thread-safe: one lock serialises the manifest-changing methods (the recorder appends chunks from a
    background thread)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._lock = threading.RLock()

    # -- creation --
    @classmethod
    def create(cls, runs_dir: str | os.PathLike, run_id: str, manifest_fields: dict | None = None) -> "RunWriter":
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id) or run_id in (".", ".."):
            raise ValueError(f"invalid run id {run_id!r}: use letters, digits and . _ - + = "
                             "(starting with a letter or digit)")
        runs_dir = Path(runs_dir)
        path = runs_dir / run_id
        if path.exists():
            if not path.is_dir():
                raise RunExistsError(f"{path}: exists and is not a run folder")
            if any(path.iterdir()):
                raise RunExistsError(f"{path}: run folder already exists and is not empty; "
                                     "choose another run id or delete it")
        (path / "traj").mkdir(parents=True, exist_ok=True)
        (path / "summary").mkdir(exist_ok=True)
        now = _now_iso()
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "run_id": run_id, "status": "running", "reason": None,
            "config": {}, "device": None, "torch_version": None, "seed": None,
            "created": now, "updated": now, "pid": os.getpid(), "host": socket.gethostname(),
            "layers": [], "n_weights": 0, "steps_per_epoch": None, "total_steps": None, "record_every": None,
            "rule": {"name": "none"}, "chunks": [], "state_arrays": [],
        }
        fields = dict(manifest_fields or {})
        for key in ("schema_version", "run_id", "chunks"):
            if key in fields:
                raise ValueError(f"manifest field {key!r} is set by the store")
        manifest.update(fields)
        if manifest["status"] not in STATUSES:
            raise ValueError(f"unknown status {manifest['status']!r}; expected one of {', '.join(STATUSES)}")
        manifest["layers"] = _normalise_layers(manifest.get("layers") or [])
        manifest["n_weights"] = sum(lay["numel"] for lay in manifest["layers"])
        manifest["state_arrays"] = list(manifest.get("state_arrays") or [])
        for name in manifest["state_arrays"]:
            cls._check_array_name(name)
        writer = cls(path, manifest)
        writer._write_manifest()
        _fsync_dir(runs_dir)
        return writer

    @staticmethod
    def _check_array_name(name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"invalid array name {name!r}: use letters, digits and _")

    # -- manifest --
    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now_iso()
        data = json.dumps(self.manifest, indent=1, default=_json_default).encode()
        _atomic_write(self.path / MANIFEST, lambda f: f.write(data))

    def update_manifest(self, **fields) -> None:
        with self._lock:
            self._update_manifest(fields)

    def _update_manifest(self, fields: dict) -> None:
        for key in ("schema_version", "run_id", "chunks"):
            if key in fields:
                raise ValueError(f"manifest field {key!r} is set by the store")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}; expected one of {', '.join(STATUSES)}")
        if "layers" in fields:
            if self.manifest["chunks"]:
                raise ValueError("layers cannot change once chunks are written")
            fields["layers"] = _normalise_layers(fields["layers"])
            fields["n_weights"] = sum(lay["numel"] for lay in fields["layers"])
        if "state_arrays" in fields:
            fields["state_arrays"] = list(fields["state_arrays"])
            for name in fields["state_arrays"]:
                self._check_array_name(name)
        self.manifest.update(fields)
        self._write_manifest()

    def set_status(self, status: str, reason: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        with self._lock:
            self.manifest["status"] = status
            self.manifest["reason"] = reason
            self._write_manifest()

    # -- data --
    def append_chunk(self, arrays: dict[str, np.ndarray]) -> dict:
        """Write one chunk (all files, atomically), then list it in the manifest. Returns its entry."""
        with self._lock:
            return self._append_chunk(arrays)

    def _append_chunk(self, arrays: dict[str, np.ndarray]) -> dict:
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
            self._check_array_name(name)
            if name in LEVEL_DELTA_ARRAYS or name == SIDE_BITS:
                raise ValueError(f"array name {name!r} is reserved (the store's encoding of 'level' or 'side')")
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise ValueError(f"array {name!r} has {arr.shape[:1]} records, 'step' has {n}")
            if name == "bounds":
                if arr.shape[1:] != (n_layers, 2):
                    raise ValueError(f"'bounds' must be [{n}, {n_layers}, 2], got {list(arr.shape)}")
                arr = arr.astype(np.float32, copy=False)
            elif name == RAW_DIST:
                if arr.dtype != np.float32 or arr.shape[1:] != (n_weights,):
                    raise ValueError(f"{RAW_DIST!r} must be float32 [{n}, {n_weights}], got {arr.dtype} "
                                     f"{list(arr.shape)}")
            else:
                if arr.dtype != np.uint8:
                    raise ValueError(f"array {name!r} must be uint8, got {arr.dtype}")
                if arr.ndim != 2 or arr.shape[1] != n_weights:
                    raise ValueError(f"array {name!r} must be [{n}, {n_weights}], got {list(arr.shape)}")
                if name not in ("level", "dist") and name not in self.manifest["state_arrays"]:
                    new_states.append(name)
            prepared[name] = arr
        if SIDE in prepared:  # a 0/1 array: eight weights per byte (np.packbits along the weights)
            side = prepared.pop(SIDE)
            if side.size and side.max() > 1:
                raise ValueError(f"array {SIDE!r} must hold 0/1 values")
            prepared[SIDE_BITS] = np.packbits(side, axis=1)
        if "level" in prepared:
            enc = level_delta.encode(prepared["level"])
            if enc is not None:  # rare level changes: store the first row and the changes (level_delta)
                del prepared["level"]
                prepared.update(zip(LEVEL_DELTA_ARRAYS, enc))
        index = len(self.manifest["chunks"])
        for name, arr in prepared.items():
            _atomic_save_npy(chunk_file(self.path, index, name), arr)
        _fsync_dir(self.path / "traj")
        entry = {"index": index, "n_records": int(n), "first_step": int(step[0]), "last_step": int(step[-1]),
                 "arrays": list(prepared)}
        self.manifest["chunks"].append(entry)
        self.manifest["state_arrays"].extend(new_states)
        self._write_manifest()
        return entry

    def write_metrics(self, df) -> None:
        _atomic_write(self.path / METRICS, lambda f: df.to_parquet(f, index=False))

    def write_summary(self, name: str, array: np.ndarray) -> None:
        self._check_array_name(name)
        (self.path / "summary").mkdir(exist_ok=True)
        _atomic_save_npy(self.path / "summary" / f"{name}.npy", np.asarray(array))


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
    mpath = path / MANIFEST
    if not path.is_dir():
        raise MissingManifestError(f"{mpath}: no such run folder")
    if not mpath.is_file():
        raise MissingManifestError(f"{mpath}: manifest missing (not a run, or it crashed before starting)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptManifestError(f"{mpath}: not valid JSON ({e})") from None
    except OSError as e:
        raise CorruptManifestError(f"{mpath}: cannot be read ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptManifestError(f"{mpath}: expected a JSON object")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptManifestError(f"{mpath}: missing or invalid schema_version")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"{mpath}: written by a newer scratchoff (schema {version}); "
                                 f"this version reads schemas 1 to {SCHEMA_VERSION}")
    if version < 1:
        raise CorruptManifestError(f"{mpath}: invalid schema_version {version}")
    for key, kind in (("layers", list), ("chunks", list)):
        if not isinstance(manifest.get(key), kind):
            raise CorruptManifestError(f"{mpath}: field {key!r} missing or not a {kind.__name__}")
    try:
        for i, lay in enumerate(manifest["layers"]):
            int(lay["numel"]), int(lay["offset"]), str(lay["name"])
        for i, ch in enumerate(manifest["chunks"]):
            if int(ch["index"]) != i or int(ch["n_records"]) < 0:
                raise ValueError(f"chunk entry {i} is inconsistent")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptManifestError(f"{mpath}: malformed layers/chunks ({e})") from None
    return manifest


class Run:
    """A read-only view of one run. Arrays are read from memory-mapped chunk files on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest: dict = _read_manifest(self.path)
        m = self.manifest
        self.layers: list[dict] = m["layers"]
        self.n_weights: int = sum(int(lay["numel"]) for lay in self.layers)
        self._chunks: list[dict] = m["chunks"]
        self.n_records: int = sum(int(c["n_records"]) for c in self._chunks)
        self.state_arrays: list[str] = list(m.get("state_arrays") or [])
        self._status, self._reason = self._effective_status()
        self._validate_chunks()
        self._steps: np.ndarray | None = None
        self._metrics = None
        self._checked: dict = {}  # read_columns: parsed headers and checked level changes, per chunk

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

    def _effective_status(self) -> tuple[str, str | None]:
        status, reason = self.manifest.get("status", "running"), self.manifest.get("reason")
        if status == "running" and self.manifest.get("host") == socket.gethostname():
            if not _pid_alive(self.manifest.get("pid"), self.created):
                return "interrupted", INTERRUPTED_REASON
        return status, reason

    def _validate_chunks(self) -> None:
        n, n_layers = self.n_weights, len(self.layers)
        for ch in self._chunks:
            r = int(ch["n_records"])
            for name in self._chunk_arrays(ch):
                path = chunk_file(self.path, ch["index"], name)
                if name == "step":
                    _check_npy(path, (r,), _is_int)
                elif name == "bounds":
                    _check_npy(path, (r, n_layers, 2), _is_f32)
                elif name == RAW_DIST:
                    _check_npy(path, (r, n), _is_f32)
                elif name == SIDE_BITS:
                    _check_npy(path, (r, (n + 7) // 8), _is_u8)
                elif name in ("level", "dist") or name in self.state_arrays:
                    _check_npy(path, (r, n), _is_u8)
                elif name == "level_base":
                    _check_npy(path, (n,), _is_u8)
                elif name == "level_change_at":
                    _check_npy(path, (None,), _is_int)
                elif name == "level_change_to":
                    _check_npy(path, (None,), _is_u8)
                else:
                    _check_npy_first(path, r)

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
        """Columns `cols` (slice, index array, or None = all) of a chunk's [r, N] array."""
        if name == "level" and "level_base" in self._chunk_arrays(ch):
            base, at, to = (self._load_file(ch, a) for a in LEVEL_DELTA_ARRAYS)
            problem = level_delta.check(base, at, to, int(ch["n_records"]))
            if problem:
                raise CorruptChunkError(f"{chunk_file(self.path, ch['index'], 'level_change_at')}: {problem}")
            return level_delta.decode(base, at, to, int(ch["n_records"]), cols)
        if name == SIDE and SIDE_BITS in self._chunk_arrays(ch):
            side = np.unpackbits(self._load_file(ch, SIDE_BITS), axis=1, count=self.n_weights)
            return side if cols is None else side[:, cols]
        mm = self._load_file(ch, name)
        return mm if cols is None else mm[:, cols]

    def _load_file(self, ch: dict, name: str) -> np.ndarray:
        if name not in self._chunk_arrays(ch):
            raise RunError(f"{chunk_file(self.path, ch['index'], name)}: chunk {ch['index']} has no "
                           f"{name!r} array")
        path = chunk_file(self.path, ch["index"], name)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise CorruptChunkError(f"{path}: cannot be read ({e})") from None

    @property
    def chunk_sizes(self) -> list[int]:
        """Number of records of each listed chunk, in record order."""
        return [int(ch["n_records"]) for ch in self._chunks]

    def read_columns(self, chunk: int, name: str, start: int, stop: int, out: np.ndarray | None = None
                     ) -> np.ndarray:
        """Columns [start, stop) of array `name` of the chunk at position `chunk`: [r, stop-start], read with
        positioned reads into `out` (a reusable buffer of at least that many elements) or a new array.

        Meant for streamed passes (`lts_core.analysis.stream`): no memory map, so nothing of the file stays
        resident in this process once the pass moves on; levels stored as changes come decoded.
        """
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

    def read_columns_raw(self, chunk: int, name: str, start: int, stop: int, out: np.ndarray | None = None
                         ) -> np.ndarray:
        """Columns [start, stop) of the stored file `name` of a chunk, as stored (no decoding)."""
        ch = self._chunks[chunk]
        r, b = int(ch["n_records"]), int(stop) - int(start)
        if name not in self._chunk_arrays(ch):
            raise RunError(f"{chunk_file(self.path, ch['index'], name)}: chunk {ch['index']} has no "
                           f"{name!r} array")
        path = chunk_file(self.path, ch["index"], name)
        key = ("header", chunk, name)
        if key not in self._checked:
            try:
                self._checked[key] = _npy_header(path)
            except Exception as e:
                raise CorruptChunkError(f"{path}: cannot be read ({e})") from None
        shape, dtype, offset = self._checked[key]
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
        with open(path, "rb", buffering=0) as f:
            rows = [(i, offset + (i * n + int(start)) * item) for i in range(r)]
            if b == n:  # whole rows: one read
                rows = [(slice(None), offset)]
            for i, pos in rows:
                dst = memoryview(view[i]).cast("B")
                got = _pread_into(f, dst, pos)
                if got != dst.nbytes:
                    raise CorruptChunkError(f"{path}: short read ({got} of {dst.nbytes} bytes)")
        return view

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
        d = self.path / "summary"
        return sorted(p.name[:-4] for p in d.glob("*.npy")) if d.is_dir() else []

    def summary(self, name: str) -> np.ndarray:
        path = self.path / "summary" / f"{name}.npy"
        if not path.is_file():
            raise RunError(f"{path}: no summary {name!r} in run {self.run_id}")
        try:
            return np.load(path, allow_pickle=False)
        except Exception as e:
            raise RunError(f"{path}: cannot be read ({e})") from None

    def freeze_steps(self, layer: int | str | None = None) -> np.ndarray | None:
        """int64 [n] step at which each weight froze (-1 never); None if the run has no such summary."""
        if not (self.path / "summary" / "freeze_step.npy").is_file():
            return None
        fs = self.summary("freeze_step")
        if fs.shape != (self.n_weights,):
            raise RunError(f"{self.path / 'summary' / 'freeze_step.npy'}: shape {fs.shape} != ({self.n_weights},)")
        return fs[self.layer_slice(layer)]

    @property
    def metrics(self):
        import pandas as pd
        if self._metrics is None:
            path = self.path / METRICS
            if not path.is_file():
                self._metrics = pd.DataFrame({c: pd.Series(dtype="float64") for c in METRIC_COLUMNS})
            else:
                try:
                    self._metrics = pd.read_parquet(path)
                except Exception as e:
                    raise RunError(f"{path}: cannot be read ({e})") from None
        return self._metrics

    def __repr__(self) -> str:
        return (f"Run({self.run_id!r}, status={self.status!r}, records={self.n_records}, "
                f"weights={self.n_weights}, layers={len(self.layers)})")


def _pread_into(f, dst: memoryview, pos: int) -> int:
    """Read len(dst) bytes at offset `pos` of open file `f` into `dst` (stops early only at end of file);
    returns the bytes read."""
    done = 0
    while done < dst.nbytes:
        if hasattr(os, "preadv"):
            got = os.preadv(f.fileno(), [dst[done:]], pos + done)
        else:  # pragma: no cover - platforms without preadv
            f.seek(pos + done)
            got = f.readinto(dst[done:])
        if not got:
            break
        done += got
    return done


def _check_npy_first(path: Path, r: int) -> None:
    """Unknown extra array: only the record count (first dimension) is checked."""
    if not path.is_file():
        raise CorruptChunkError(f"{path}: chunk file listed in the manifest is missing")
    try:
        shape, _, _ = _npy_header(path)
    except Exception as e:
        raise CorruptChunkError(f"{path}: unreadable .npy header ({e})") from None
    _check_npy(path, (r,) + (None,) * (len(shape) - 1), None)


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
    manifest: dict | None = None   # the raw manifest when it could be parsed (even if the run is broken)
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
        manifest = None
        try:
            manifest = json.loads((p / MANIFEST).read_text())
            if not isinstance(manifest, dict):
                manifest = None
        except Exception:
            pass
        created = _parse_time(manifest.get("created")) if manifest else None
        if created is None:
            try:
                created = p.stat().st_mtime
            except OSError:
                created = None
        run_id = str(manifest.get("run_id") or p.name) if manifest else p.name
        msg = str(e) if isinstance(e, RunError) else f"{p}: {type(e).__name__}: {e}"
        return RunEntry(p, run_id, False, msg, None, "broken", created, manifest, group)


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


__all__ = ["SCHEMA_VERSION", "STATUSES", "METRIC_COLUMNS", "RunError", "MissingManifestError",
           "CorruptManifestError", "SchemaVersionError", "CorruptChunkError", "RunExistsError", "RunWriter",
           "Run", "RunEntry", "open_run", "list_runs", "runs_dir", "decode_codes", "chunk_file"]
