"""Offline datasets: `load_dataset(name, root) -> DatasetSplit`. Never touches the network.

- digits:        sklearn's bundled 8x8 digits, stratified 80/20 split with `seed`, in_shape (64,).
- mnist1d:       generated locally with the `mnist1d` package (canonical args, its seed 42), cached as
                 `<data_dir>/datasets/mnist1d.npz`, in_shape (1, 40).
- mnist, fashion-mnist: the four IDX files (optionally .gz) in `root`, in_shape (1, 28, 28).
- mnist1d-seq:   the same signals as sequences of 10 tokens × 4 samples, in_shape (10, 4) (tokens, features).
- cifar10:       the python batches (`cifar-10-batches-py`) or binary batches (`cifar-10-batches-bin`)
                 under `root` (or `root` is that folder), in_shape (3, 32, 32).
- cifar100:      `cifar-100-python/{train,test}` or `cifar-100-binary/{train,test}.bin` under `root` (or
                 `root` is that folder); the 100 fine labels; in_shape (3, 32, 32).

Inputs are standardized with statistics of the (possibly subsetted) training split: per feature for
digits, one scalar for mnist1d(-seq) / mnist / fashion-mnist, per channel for cifar10 / cifar100.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import random
import struct
import tempfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "mnist1d", "mnist1d-seq", "mnist", "fashion-mnist", "cifar10", "cifar100")
SEQ_TOKENS = 10  # mnist1d-seq: the 40-sample signal as 10 tokens of 4 consecutive samples


class DatasetError(ValueError):
    """A dataset could not be loaded; the message names the file and folder involved."""


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    x_train: torch.Tensor  # float32 [n_train, *in_shape]
    y_train: torch.Tensor  # int64 [n_train]
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    in_shape: tuple[int, ...]
    n_classes: int


def data_dir() -> Path:
    """The project's data folder: $SCRATCHOFF_DATA, else `<repo>/data`."""
    env = os.environ.get("SCRATCHOFF_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


# ----------------------------------------------------------------------------- helpers

def _fail(name: str, fname: str, folder, problem: str) -> DatasetError:
    return DatasetError(f"{name}: expected file '{fname}' in {folder} — {problem}")


def _subset_idx(n: int, k: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Deterministic subset: first k of a seeded permutation (kept in original order); None = all."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DatasetError(f"max_train/max_test must be a positive int or None, got {k!r}")
    return np.sort(rng.permutation(n)[:k]) if k < n else None


def _standardize(x_tr: torch.Tensor, x_te: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) / std with train statistics reduced over `dims` (in place on float32 tensors)."""
    var, mean = torch.var_mean(x_tr, dim=dims, keepdim=True, correction=0)
    std = var.sqrt()
    std[std < 1e-6] = 1.0  # constant features (e.g. digits' border pixels) stay at 0 after centering
    return x_tr.sub_(mean).div_(std), x_te.sub_(mean).div_(std)


def _finish(name, x_tr, y_tr, x_te, y_te, in_shape, dims, seed, max_train, max_test, n_classes=10):
    """Subset, convert to tensors, standardize and pack into a DatasetSplit."""
    i_tr = _subset_idx(len(y_tr), max_train, np.random.default_rng([seed, 0]))  # independent streams
    i_te = _subset_idx(len(y_te), max_test, np.random.default_rng([seed, 1]))
    if i_tr is not None:
        x_tr, y_tr = x_tr[i_tr], y_tr[i_tr]
    if i_te is not None:
        x_te, y_te = x_te[i_te], y_te[i_te]
    scale = 255.0 if x_tr.dtype == np.uint8 else 1.0  # bytes -> [0, 1]
    x_tr, x_te = (torch.from_numpy(np.array(x, dtype=np.float32)).div_(scale).reshape(-1, *in_shape)
                  for x in (x_tr, x_te))
    x_tr, x_te = _standardize(x_tr, x_te, dims)
    y_tr = torch.from_numpy(np.asarray(y_tr, dtype=np.int64).copy())
    y_te = torch.from_numpy(np.asarray(y_te, dtype=np.int64).copy())
    return DatasetSplit(x_tr, y_tr, x_te, y_te, name, tuple(in_shape), n_classes)


def _root_dir(name: str, root) -> Path:
    if root is None:
        raise DatasetError(f"{name}: needs root=<folder with the dataset files> (nothing is downloaded)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name}: root folder {root} does not exist or is not a folder")
    return root


# ----------------------------------------------------------------------------- digits

def _load_digits(seed, max_train, max_test) -> DatasetSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=seed)
    return _finish("digits", x_tr, y_tr, x_te, y_te, (64,), 0, seed, max_train, max_test)


# ----------------------------------------------------------------------------- mnist1d

def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """Canonical MNIST-1D (package defaults, seed 42), generated once and cached atomically as .npz."""
    from mnist1d.data import get_dataset_args, make_dataset  # lazy: pulls in matplotlib/requests

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # never downloaded
    meta = json.dumps(args, sort_keys=True)
    path = data_dir() / "datasets" / "mnist1d.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrs = {k: z[k] for k in ("x", "y", "x_test", "y_test", "meta")}
            if str(arrs.pop("meta")) == meta and arrs["x"].shape[1:] == (args["final_seq_length"],):
                return arrs
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable / stale cache: regenerate below
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # make_dataset reseeds the global RNGs; keep the caller's state intact
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrs = {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mnist1d.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(meta), **arrs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return arrs


def _load_mnist1d(seed, max_train, max_test) -> DatasetSplit:
    a = _mnist1d_arrays()
    L = a["x"].shape[1]
    return _finish("mnist1d", a["x"], a["y"], a["x_test"], a["y_test"], (1, L), (0, 1, 2), seed,
                   max_train, max_test)


def _load_mnist1d_seq(seed, max_train, max_test) -> DatasetSplit:
    """The same signals as a sequence task: each 40-sample signal cut into 10 tokens of 4 consecutive
    samples, in_shape (tokens, features) = (10, 4), for sequence models (the Transformer encoder)."""
    a = _mnist1d_arrays()
    L = a["x"].shape[1]
    return _finish("mnist1d-seq", a["x"], a["y"], a["x_test"], a["y_test"], (SEQ_TOKENS, L // SEQ_TOKENS),
                   (0, 1, 2), seed, max_train, max_test)


# ----------------------------------------------------------------------------- mnist / fashion-mnist (IDX)

_IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
              "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


MAX_IDX_BYTES = 256 << 20  # MNIST's largest file holds 47 MB; a header promising more is not MNIST


def _parse_idx(name: str, folder: Path, fname: str, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (`fname`, or `fname.gz`, plain preferred): magic 0x0000 08 <ndim>,
    ndim big-endian uint32 dims, data. Reads at most the size its header announces (+1 byte to detect
    trailing data), so a gzip bomb is refused after inflating no more than the expected IDX size."""
    for p in (folder / fname, folder / (fname + ".gz")):
        if p.is_file():
            break
    else:
        raise DatasetError(f"{name}: expected file '{fname}' (or .gz) in {folder} — not found")
    head_len = 4 + 4 * ndim
    try:
        with (gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")) as f:
            head = f.read(head_len)
            if len(head) < head_len:
                raise _fail(name, fname, folder, f"truncated header ({len(head)} bytes)")
            magic = struct.unpack(">I", head[:4])[0]
            if magic != 0x0800 + ndim:
                raise _fail(name, fname, folder,
                            f"bad magic number 0x{magic:08x} (expected 0x{0x0800 + ndim:08x})")
            dims = struct.unpack(f">{ndim}I", head[4:])
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise _fail(name, fname, folder, f"header {dims} announces {size} bytes of data, more than "
                                                 f"{MAX_IDX_BYTES >> 20} MiB; not an MNIST-style file")
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _fail(name, p.name, folder, f"unreadable ({e})") from None
    if len(data) != size:
        got = f"{head_len + len(data)}{'+' if len(data) > size else ''}"
        raise _fail(name, fname, folder, f"wrong length: {got} bytes, header {dims} implies {head_len + size}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _load_idx(name, root, seed, max_train, max_test) -> DatasetSplit:
    folder = _root_dir(name, root)
    a = {k: _parse_idx(name, folder, f, 3 if k.endswith("x") else 1) for k, f in _IDX_FILES.items()}
    for split in ("train", "test"):
        x, y, fy = a[f"{split}_x"], a[f"{split}_y"], _IDX_FILES[f"{split}_y"]
        if len(x) != len(y) or len(y) == 0:
            raise _fail(name, fy, folder, f"{len(y)} labels for {len(x)} images")
        if y.max() > 9:
            raise _fail(name, fy, folder, f"label {int(y.max())} out of range 0..9")
    if a["train_x"].shape[1:] != a["test_x"].shape[1:]:
        raise _fail(name, _IDX_FILES["test_x"], folder,
                    f"image size {a['test_x'].shape[1:]} differs from train {a['train_x'].shape[1:]}")
    in_shape = (1, *a["train_x"].shape[1:])
    return _finish(name, a["train_x"], a["train_y"], a["test_x"], a["test_y"], in_shape, (0, 1, 2, 3), seed,
                   max_train, max_test)


# ----------------------------------------------------------------------------- cifar10 / cifar100

_PICKLE_OK = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
              ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


@dataclass(frozen=True)
class _CifarFormat:
    """Where a CIFAR variant keeps its files and how its records hold the label."""
    py_dir: str             # python-pickle version's folder
    py_files: tuple         # ... its train files, then the test file
    label_key: bytes        # ... the label list in each pickle
    bin_dir: str            # binary version's folder
    bin_files: tuple
    label_bytes: int        # binary records: label bytes before the 3072 pixel bytes
    label_at: int           # ... which of them is the label used
    n_classes: int


_CIFAR = {
    "cifar10": _CifarFormat("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                            b"labels", "cifar-10-batches-bin",
                            tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",), 1, 0, 10),
    # CIFAR-100: 100 fine labels (the 20 coarse labels are not used); binary records are <coarse><fine><pixels>
    "cifar100": _CifarFormat("cifar-100-python", ("train", "test"), b"fine_labels", "cifar-100-binary",
                             ("train.bin", "test.bin"), 2, 1, 100),
}


def _files_doc(files: tuple) -> str:
    """'data_batch_1..5, test_batch' for CIFAR-10's six files, else the names."""
    if len(files) == 6:
        first, ext = files[0].rsplit("_", 1)[0], ".bin" if files[0].endswith(".bin") else ""
        return f"{first}_1..5{ext}, {files[-1]}"
    return ", ".join(files)


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler(encoding="bytes") that only builds numpy arrays, dicts, lists and bytes."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_OK:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_py_batch(name: str, fmt: _CifarFormat, folder: Path, fname: str) -> tuple[np.ndarray, np.ndarray]:
    p = folder / fname
    if not p.is_file():
        raise _fail(name, fname, folder, "not found")
    try:
        with open(p, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        x, y = np.asarray(d[b"data"]), np.asarray(d[fmt.label_key])
    except Exception as e:  # truncated, not a pickle, wrong content
        raise _fail(name, fname, folder, f"malformed python batch ({type(e).__name__}: {e})") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),) or len(x) == 0:
        raise _fail(name, fname, folder, f"malformed python batch (data {x.shape} {x.dtype}, labels {y.shape})")
    return x, y


def _cifar_bin_batch(name: str, fmt: _CifarFormat, folder: Path, fname: str) -> tuple[np.ndarray, np.ndarray]:
    p = folder / fname
    if not p.is_file():
        raise _fail(name, fname, folder, "not found")
    size = 3072 + fmt.label_bytes
    buf = np.fromfile(p, dtype=np.uint8)
    if buf.size == 0 or buf.size % size:
        raise _fail(name, fname, folder, f"wrong length: {buf.size} bytes is not a multiple of {size}")
    rec = buf.reshape(-1, size)
    return rec[:, fmt.label_bytes:], rec[:, fmt.label_at]


def _load_cifar(name: str, root, seed, max_train, max_test) -> DatasetSplit:
    fmt = _CIFAR[name]
    root = _root_dir(name, root)
    py = partial(_cifar_py_batch, name, fmt)
    binary = partial(_cifar_bin_batch, name, fmt)
    for folder, files, read in ((root, fmt.py_files, py), (root, fmt.bin_files, binary),
                                (root / fmt.py_dir, fmt.py_files, py), (root / fmt.bin_dir, fmt.bin_files, binary)):
        if folder.is_dir() and (folder != root or any((root / f).is_file() for f in files)):
            break
    else:
        raise DatasetError(f"{name}: expected '{fmt.py_dir}/{_files_doc(fmt.py_files)}' or "
                           f"'{fmt.bin_dir}/{_files_doc(fmt.bin_files)}' in {root} — not found")
    parts = [read(folder, f) for f in files]
    for f, (_, y) in zip(files, parts):
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= fmt.n_classes:
            raise _fail(name, f, folder, f"labels must be integers in 0..{fmt.n_classes - 1}")
    x_tr = np.concatenate([x for x, _ in parts[:-1]])
    y_tr = np.concatenate([y for _, y in parts[:-1]])
    x_te, y_te = parts[-1]
    return _finish(name, x_tr, y_tr, x_te, y_te, (3, 32, 32), (0, 2, 3), seed, max_train, max_test,
                   n_classes=fmt.n_classes)


# ----------------------------------------------------------------------------- entry point

def load_dataset(name: str, root: str | Path | None = None, seed: int = 0, *,
                 max_train: int | None = None, max_test: int | None = None) -> DatasetSplit:
    """Load a dataset offline. `root` is required for mnist / fashion-mnist / cifar10.

    `seed` drives the digits split and the optional subsetting (`max_train` / `max_test`: the first n of a
    seeded permutation). mnist1d is always the canonical generation (the package's own seed 42).
    Raises DatasetError (a ValueError) naming the expected file and folder on any problem.
    """
    key = name.lower().strip() if isinstance(name, str) else name
    if key == "digits":
        return _load_digits(seed, max_train, max_test)
    if key == "mnist1d":
        return _load_mnist1d(seed, max_train, max_test)
    if key in ("mnist", "fashion-mnist"):
        return _load_idx(key, root, seed, max_train, max_test)
    if key == "mnist1d-seq":
        return _load_mnist1d_seq(seed, max_train, max_test)
    if key in _CIFAR:
        return _load_cifar(key, root, seed, max_train, max_test)
    raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
