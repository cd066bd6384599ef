"""Write large ``.npy`` files with ``O_DIRECT``, bypassing the page cache.

Recording every step streams megabytes per step to disk. Through the page cache each MB costs the CPU
about 0.4–1.6 ms (copy, page bookkeeping, writeback) on the 2-core virtual machines we measured; with
``O_DIRECT`` the disk reads the array straight from our buffer and the CPU cost falls to about 0.1 ms/MB
(`bench/bench_recording.py`, BENCHMARKS.md). The files are ordinary version-1.0 ``.npy`` files whose header
is padded with spaces to 4096 bytes, so that the data starts on a block boundary; `np.load` reads them as
any other.

``O_DIRECT`` needs the memory, the file offset and the length aligned to the device's block size; we use
4096 bytes, which covers 512-byte and 4 KiB devices. The last partial block goes through a small aligned
bounce buffer and the file is then truncated to its exact size. Where ``O_DIRECT`` is not available
(macOS, Windows, tmpfs, some network filesystems) `write_npy_direct` returns False and the caller writes
the ordinary way.
"""
from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np

ALIGN = 4096  # bytes: block alignment for memory, file offsets and lengths
MIN_BYTES = 1 << 20  # smaller arrays are not worth it: the ordinary write is as cheap


def aligned_empty(shape, dtype) -> np.ndarray:
    """`np.empty` whose data starts on an `ALIGN`-byte boundary (so its leading rows can be written with
    O_DIRECT)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def npy_header(arr: np.ndarray, size: int = ALIGN) -> bytes:
    """A version-1.0 ``.npy`` header for `arr`, padded with spaces to exactly `size` bytes."""
    d = np.lib.format.header_data_from_array_1_0(arr)
    text = "{" + f"'descr': {d['descr']!r}, 'fortran_order': {d['fortran_order']!r}, 'shape': {d['shape']!r}, " + "}"
    body = text.encode("latin1")
    pad = size - len(np.lib.format.MAGIC_PREFIX) - 2 - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"a .npy header for shape {arr.shape} does not fit in {size} bytes")
    return (np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + struct.pack("<H", len(body) + pad + 1) + body
            + b" " * pad + b"\n")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - the kernel reports errors as OSError
            raise OSError(errno.EIO, "short write")
        view, offset = view[n:], offset + n


def write_npy_direct(path: str | os.PathLike, arr: np.ndarray) -> bool:
    """Write `arr` to `path` (created or truncated) as ``.npy`` with O_DIRECT and fsync it.

    Returns False, having left no file behind, when O_DIRECT cannot be used here: no ``os.O_DIRECT``, the
    filesystem refuses it, the array is smaller than `MIN_BYTES`, not C-contiguous or not `ALIGN`-aligned in
    memory. Other I/O errors (disk full…) are raised.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if (not flag or arr.nbytes < MIN_BYTES or not arr.flags.c_contiguous or arr.dtype.hasobject
            or arr.ctypes.data % ALIGN):
        return False
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    ok = False
    try:
        head = aligned_empty(ALIGN, np.uint8)
        head[:] = np.frombuffer(npy_header(arr), dtype=np.uint8)
        data = arr.reshape(-1).view(np.uint8)
        n_main = arr.nbytes - arr.nbytes % ALIGN
        _pwrite_all(fd, head, 0)
        _pwrite_all(fd, data[:n_main], ALIGN)
        if n_main < arr.nbytes:
            tail = aligned_empty(ALIGN, np.uint8)
            tail[:arr.nbytes - n_main] = data[n_main:]
            tail[arr.nbytes - n_main:] = 0
            _pwrite_all(fd, tail, ALIGN + n_main)
            os.ftruncate(fd, ALIGN + arr.nbytes)
        os.fsync(fd)
        ok = True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
        if not ok:
            try:
                path.unlink()
            except OSError:
                pass
    return ok
