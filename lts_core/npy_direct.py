"""Write and read large ``.npy`` files with ``O_DIRECT``, bypassing the page cache.

Recording every step streams megabytes per step to disk. Through the page cache each MB costs the CPU
about 0.4–1.6 ms (copy, page bookkeeping, writeback) on the 2-core virtual machines we measured; with
``O_DIRECT`` the disk reads the array straight from our buffer and the CPU cost falls to about 0.1 ms/MB
(`bench/bench_recording.py`, BENCHMARKS.md). The files are ordinary version-1.0 ``.npy`` files whose header
is padded with spaces to 4096 bytes, so that the data starts on a block boundary; `np.load` reads them as
any other.

``O_DIRECT`` needs the memory, the file offset and the length aligned to the device's block size; we use
4096 bytes, which covers 512-byte and 4 KiB devices. The last partial block goes through a small aligned
bounce buffer and the file is then truncated to its exact size; an array that does not start on a 4096-byte
boundary (numpy's own allocations, e.g. the analysis cache's results) goes through an aligned staging
buffer. Where ``O_DIRECT`` is not available (macOS, Windows, tmpfs, some network filesystems)
`write_npy_direct` returns False and the caller writes the ordinary way.

Reading (`PositionalReader`): the streamed analyses read a big run's chunk files once, cold, column range by
column range. Through the page cache every byte costs the CPU about 0.5–1.7 ns (the kernel's page-cache work
and copy); with ``O_DIRECT`` about 0.1 ns (BENCHMARKS "Big runs"). A read of at least `DIRECT_READ_MIN`
bytes goes straight from the disk into the caller's buffer when the buffer and the file offset are congruent
modulo `ALIGN` (the partial blocks at both ends go through small per-thread bounce buffers, all in one
``preadv``), else through a per-thread aligned staging buffer and one copy. Smaller reads, systems without
``O_DIRECT``, filesystems that refuse it (tmpfs…) and ``SCRATCHOFF_DIRECT_READ=0`` use ordinary reads.
``O_DIRECT`` reads are coherent with the page cache (the kernel writes dirty pages back first), so a file
written the ordinary way reads the same. The streamed passes read into `read_buffer`s, on transparent huge
pages: a direct read then reaches the disk in 2 MiB segments instead of 4 KiB ones (2.8× the bandwidth on
the machine of BENCHMARKS.md "Session 9").
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np

ALIGN = 4096  # bytes: block alignment for memory, file offsets and lengths
MIN_BYTES = 1 << 20  # smaller arrays are not worth it: the ordinary write is as cheap
DIRECT_READ_MIN = 1 << 20  # bytes: smaller reads go through the page cache (a hot page cache beats the disk)
STAGE_BYTES = 8 << 20  # bytes: the most a staging buffer holds (longer unaligned reads and writes go in pieces)


def _layout(shape, dtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as a tuple, dtype, size in bytes) of an array to allocate."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    return shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def aligned_empty(shape, dtype, phase: int = 0) -> np.ndarray:
    """`np.empty` whose data starts `phase` bytes after an `ALIGN`-byte boundary (phase 0: on it, so its
    leading rows can be written with O_DIRECT; phase p: congruent with file offsets ≡ p, so reads land in it
    straight from the disk)."""
    shape, dtype, nbytes = _layout(shape, dtype)
    raw = np.empty(nbytes + 2 * ALIGN, dtype=np.uint8)
    start = (int(phase) - raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


HUGE_PAGE = 2 << 20     # bytes: a transparent huge page on x86-64 and most arm64 kernels
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


def read_buffer(shape, dtype, phase: int = 0) -> np.ndarray:
    """`aligned_empty` for buffers that ``O_DIRECT`` reads fill again and again (the streamed passes' chunk
    buffers): on Linux, an anonymous mapping of its own whose huge-page-aligned part asks for transparent huge
    pages (madvise MADV_HUGEPAGE). A direct read into ordinary pages hands the disk one segment per 4 KiB page;
    into huge pages, one per 2 MiB: on the machine of BENCHMARKS.md ("Session 9") 2 MiB reads ran at 3.0–3.4
    GB/s with 0.013–0.022 s of system time per GB, against 1.25 GB/s and 0.043–0.062 s/GB. Elsewhere, or when
    the mapping cannot be made, `aligned_empty`."""
    shape, dtype, nbytes = _layout(shape, dtype)
    if not hasattr(mmap, "MAP_PRIVATE") or nbytes < HUGE_PAGE:
        return aligned_empty(shape, dtype, phase)
    try:
        m = mmap.mmap(-1, nbytes + 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return aligned_empty(shape, dtype, phase)
    raw = np.frombuffer(m, np.uint8)
    base = (-raw.ctypes.data) % HUGE_PAGE
    if hasattr(m, "madvise"):
        try:
            m.madvise(MADV_HUGEPAGE, base, nbytes + HUGE_PAGE)
        except (OSError, ValueError):
            pass
    start = base + int(phase) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def npy_header(arr: np.ndarray, size: int = ALIGN) -> bytes:
    """A version-1.0 ``.npy`` header for `arr`, padded with spaces to exactly `size` bytes."""
    return npy_header_for(arr.shape, arr.dtype, size)


def npy_header_for(shape: tuple[int, ...], dtype, size: int = ALIGN) -> bytes:
    """A version-1.0 ``.npy`` header for a C-order array of `shape` and `dtype`, padded to `size` bytes."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    shape = tuple(int(s) for s in shape)
    text = "{" + f"'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, " + "}"
    body = text.encode("latin1")
    pad = size - len(np.lib.format.MAGIC_PREFIX) - 2 - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"a .npy header for shape {shape} does not fit in {size} bytes")
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

    An array that is not `ALIGN`-aligned in memory (numpy's own allocations are not) goes through an aligned
    staging buffer of at most `STAGE_BYTES`, a piece at a time (one copy, still no page cache).

    Returns False, having left no file behind, when O_DIRECT cannot be used here: no ``os.O_DIRECT``, the
    filesystem refuses it, the array is smaller than `MIN_BYTES` or not C-contiguous. Other I/O errors (disk
    full…) are raised.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or arr.nbytes < MIN_BYTES or not arr.flags.c_contiguous or arr.dtype.hasobject:
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
        if arr.ctypes.data % ALIGN == 0:
            _pwrite_all(fd, data[:n_main], ALIGN)
        elif n_main:   # e.g. numpy's own allocations (16 bytes past a page): through an aligned staging buffer
            stage = aligned_empty(min(STAGE_BYTES, n_main), np.uint8)
            for a in range(0, n_main, stage.size):
                part = stage[:min(stage.size, n_main - a)]
                part[:] = data[a:a + part.size]
                _pwrite_all(fd, part, ALIGN + a)
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


class NpyAppender:
    """A ``.npy`` file that grows at its end while others read it: a 4096-byte header, then rows.

    `write_upto(buf, end)` writes bytes ``[written, end)`` of `buf` (the whole data region, from the first
    row) at their place after the header. With ``direct`` (an `ALIGN`-aligned, C-contiguous `buf` of at
    least `MIN_BYTES` and a filesystem that takes it) the write uses ``O_DIRECT``: the block holding the old
    end is written again, and the new partial last block goes through a small aligned bounce buffer (the
    file may then hold up to 4095 bytes of zeros past its data until `close`). `append(arr)` writes a small
    array at the end the ordinary way. Readers of a growing file count its rows from its size; `close(rows)`
    writes the final header (shape ``(rows, *row_shape)``), cuts the file to its exact size and fsyncs it.
    OSError (disk full…) is raised with the file's path as ``filename``.
    """

    def __init__(self, path: str | os.PathLike, dtype, row_shape: tuple[int, ...] = (), direct: bool = False):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.written = 0  # bytes of data written (after the header)
        flag = getattr(os, "O_DIRECT", 0) if direct else 0
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError as e:
            if not flag or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise self._error(e) from None
            flag = 0
            self.fd = self._open_plain()
        self.direct = bool(flag)
        self._head = aligned_empty(ALIGN, np.uint8)
        self._bounce = aligned_empty(ALIGN, np.uint8) if self.direct else None
        self._write_header(0)

    def _open_plain(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> OSError:
        return OSError(e.errno, e.strerror or str(e), str(self.path))

    def _pwrite(self, data, offset: int) -> None:
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise self._error(e) from None
        else:
            return
        self._reopen_plain()  # the filesystem refuses O_DIRECT after all: write the ordinary way
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            raise self._error(e) from None

    def _reopen_plain(self) -> None:
        os.close(self.fd)
        self.fd, self.direct = self._open_plain(), False

    def _write_header(self, rows: int) -> None:
        self._head[:] = np.frombuffer(npy_header_for((rows,) + self.row_shape, self.dtype), dtype=np.uint8)
        self._pwrite(self._head, 0)

    def write_upto(self, buf: np.ndarray, end: int) -> None:
        """Write bytes ``[written, end)`` of `buf` (a view of the data from its first byte)."""
        if end <= self.written:
            return
        data = buf.reshape(-1).view(np.uint8)
        if self.direct:
            a = self.written - self.written % ALIGN
            main = end - end % ALIGN
            if main > a:
                self._pwrite(data[a:main], ALIGN + a)
            if end > main and self.direct:
                self._bounce[:end - main] = data[main:end]
                self._bounce[end - main:] = 0
                self._pwrite(self._bounce, ALIGN + main)
            elif end > main:  # fell back to ordinary writes just now
                self._pwrite(data[main:end], ALIGN + main)
        else:
            self._pwrite(data[self.written:end], ALIGN + self.written)
        self.written = end

    def append(self, arr: np.ndarray) -> None:
        """Write `arr` (whole rows of this file's dtype) at the end, the ordinary way."""
        data = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1).view(np.uint8)
        if not data.size:
            return
        if self.direct:  # only small streams use append; keep them off O_DIRECT
            self._reopen_plain()
        self._pwrite(data, ALIGN + self.written)
        self.written += data.size

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise self._error(e) from None

    def close(self, rows: int) -> None:
        """Final header for `rows` rows, exact size, fsync, close."""
        try:
            self._write_header(rows)
            os.ftruncate(self.fd, ALIGN + rows * self.row_bytes)
            os.fsync(self.fd)
        except OSError as e:
            raise self._error(e) from None
        finally:
            self.abandon()

    def truncate(self, nbytes: int) -> None:
        """Cut the data to `nbytes` (frees the blocks of a half-written row after a failed write)."""
        try:
            os.ftruncate(self.fd, ALIGN + nbytes)
        except OSError:
            pass

    def abandon(self) -> None:
        """Close without finishing (the file stays as it is)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- reading -------------------------------------------------------------------------------------------------

_no_direct_devices: set[int] = set()   # filesystems (st_dev) that refused O_DIRECT: not tried again
_local = threading.local()             # per thread: bounce and staging buffers


def direct_reads_enabled() -> bool:
    """Whether big reads may use O_DIRECT here: the system has it and ``SCRATCHOFF_DIRECT_READ`` is not 0."""
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get("SCRATCHOFF_DIRECT_READ", "1").strip() != "0"


def _thread_buffer(name: str, nbytes: int) -> np.ndarray:
    buf = getattr(_local, name, None)
    if buf is None or buf.size < nbytes:
        buf = aligned_empty(max(nbytes, ALIGN), np.uint8)
        setattr(_local, name, buf)
    return buf[:nbytes]


def _bytes_of(dst) -> np.ndarray:
    arr = np.frombuffer(dst, dtype=np.uint8) if not isinstance(dst, np.ndarray) else dst.reshape(-1)
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError("a read needs a writable contiguous buffer")
    return arr.view(np.uint8)


class PositionalReader:
    """One file read at given offsets into the caller's buffers (``with PositionalReader(path) as f:
    f.read_into(buf, pos)``): reads of at least `DIRECT_READ_MIN` bytes with O_DIRECT where allowed
    (`direct_reads_enabled`, the filesystem takes it), others with ordinary ``preadv``. `read_into` returns the
    bytes read, fewer only at the end of the file; OSError other than O_DIRECT being refused is raised."""

    def __init__(self, path: str | os.PathLike, direct: bool | None = None):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.direct_fd = -1
        self.direct = direct_reads_enabled() if direct is None else bool(direct) and hasattr(os, "O_DIRECT")
        if self.direct:
            try:
                self.direct = os.fstat(self.fd).st_dev not in _no_direct_devices
            except OSError:
                self.direct = False

    def __enter__(self) -> "PositionalReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1

    def _refused(self) -> None:
        """O_DIRECT refused by this filesystem: read it the ordinary way from now on."""
        try:
            _no_direct_devices.add(os.fstat(self.fd).st_dev)
        except OSError:
            pass
        self.direct = False

    def read_into(self, dst, pos: int) -> int:
        """Read len(dst) bytes at file offset `pos` into `dst` (a writable contiguous buffer); returns the bytes
        read (fewer only at the end of the file)."""
        out = _bytes_of(dst)
        if self.direct and out.size >= DIRECT_READ_MIN:
            if self.direct_fd < 0:
                try:
                    self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    self._refused()
            if self.direct_fd >= 0:
                try:
                    return self._read_direct(out, int(pos))
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._refused()
        return _pread_all(self.fd, memoryview(out), int(pos))

    def _read_direct(self, out: np.ndarray, pos: int) -> int:
        n, end = out.size, pos + out.size
        a0, m0, m1 = pos - pos % ALIGN, -(-pos // ALIGN) * ALIGN, end - end % ALIGN
        if (out.ctypes.data - pos) % ALIGN or m1 - m0 < ALIGN:
            return self._read_staged(out, pos)
        head = _thread_buffer("head", ALIGN) if m0 > pos else None
        tail = _thread_buffer("tail", ALIGN) if end > m1 else None
        iov = ([head] if head is not None else []) + [out[m0 - pos:m1 - pos]] + ([tail] if tail is not None else [])
        got = os.preadv(self.direct_fd, iov, a0)
        have = max(0, min(n, a0 + got - pos))       # bytes of [pos, end) read, the bounce buffers' included
        if head is not None and have:
            k = min(m0 - pos, have)
            out[:k] = head[pos - a0:pos - a0 + k]
        if tail is not None and pos + have > m1:
            out[m1 - pos:have] = tail[:pos + have - m1]
        if have < n:   # a short read (the file ends inside the range): the rest, if any, through staging
            return have + self._read_staged(out[have:], pos + have)
        return n

    def _read_staged(self, out: np.ndarray, pos: int) -> int:
        """Aligned reads into a per-thread staging buffer, each copied out; stops at the end of the file."""
        n, done = out.size, 0
        while done < n:
            p = pos + done
            q = min(pos + n, p + STAGE_BYTES - ALIGN)
            b0, b1 = p - p % ALIGN, -(-q // ALIGN) * ALIGN
            stage = _thread_buffer("stage", b1 - b0)
            got = os.preadv(self.direct_fd, [stage], b0)
            k = min(q, b0 + got) - p
            if k <= 0:
                break
            out[done:done + k] = stage[p - b0:p - b0 + k]
            done += k
            if b0 + got < q:   # short: the end of the file, or continue from where it stopped
                if got % ALIGN or got == 0:
                    break
        return done


def _pread_all(fd: int, dst: memoryview, pos: int) -> int:
    """Read len(dst) bytes at offset `pos` of `fd` into `dst` (stops early only at the end of the file)."""
    done = 0
    while done < dst.nbytes:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [dst[done:]], pos + done)
        else:  # pragma: no cover - platforms without preadv
            got = _pread_fallback(fd, dst[done:], pos + done)
        if not got:
            break
        done += got
    return done


def _pread_fallback(fd: int, dst: memoryview, pos: int) -> int:  # pragma: no cover - platforms without preadv
    data = os.pread(fd, dst.nbytes, pos)
    dst[:len(data)] = data
    return len(data)
