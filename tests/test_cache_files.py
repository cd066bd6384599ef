"""Per-weight results written straight into their cache files during the scan (lts_core.analysis.cache.ArrayFiles,
the level statistics' collector with `files`): the files hold exactly the results, aligned parts go to the disk
with O_DIRECT and the rest through the page cache, and a build that fails or cannot write leaves no file behind
and still gives its results."""
import os

import numpy as np
import pytest

from lts_core import open_run
from lts_core.analysis import build_cache, cache
from lts_core.analysis.cache import ArrayFiles, ArrayFilesError
from lts_core.npy_direct import ALIGN, aligned_empty
from test_direct_read import direct_io_works
from test_stream import check_stats, reference, trajectories, write_run


def tmp_files(folder):
    return sorted(p.name for p in (folder / "r" / "cache").glob("*.tmp-*"))


def counting_pwrite(monkeypatch):
    """os.pwrite, counting the bytes that went through an O_DIRECT descriptor and through the others."""
    import fcntl
    seen = {"direct": 0, "buffered": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
        n = real(fd, data, offset)
        seen["direct" if direct else "buffered"] += n
        return n
    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


def test_array_files_hold_what_was_written_aligned_parts_directly(tmp_path, monkeypatch):
    lv, dist, _ = trajectories(R=4)
    write_run(tmp_path, lv, dist)
    run = open_run(tmp_path / "r")
    n = 3 * ALIGN + 100
    f = ArrayFiles(run, "levels", {}, cache.run_stamp(run), {"a": (np.int16, n), "b": (np.uint8, n)})
    seen = counting_pwrite(monkeypatch)
    want_a = np.arange(n, dtype=np.int16) * 3
    want_b = (np.arange(n) % 251).astype(np.uint8)
    part = aligned_empty(2 * ALIGN, np.int16)
    part[:] = want_a[:2 * ALIGN]
    f.write("a", 0, part)                          # aligned memory and offset: O_DIRECT
    f.write("a", 2 * ALIGN, want_a[2 * ALIGN:])     # the rest (offset aligned, memory not): buffered
    f.write("b", 0, want_b[:7])                     # unaligned start
    f.write("b", 7, want_b[7:])
    assert seen["buffered"] > 0                     # (tmpfs and others refuse O_DIRECT: all buffered, same data)
    assert seen["direct"] == (4 * ALIGN if direct_io_works(tmp_path) else 0)
    got = f.arrays()
    np.testing.assert_array_equal(got["a"], want_a)
    np.testing.assert_array_equal(got["b"], want_b)
    assert all(f".tmp-{os.getpid()}-" in p.name for p in f.paths.values())
    f.abort()
    assert tmp_files(tmp_path) == []


def test_writes_later_are_waited_for_and_their_errors_raised(tmp_path, monkeypatch):
    """`write_later` writes on a thread of its own and calls back when done; `arrays()` waits for every write,
    and an error of one is raised there (as `ArrayFilesError`); `abort` waits before closing the files."""
    import errno
    lv, dist, _ = trajectories(R=4)
    write_run(tmp_path, lv, dist)
    run = open_run(tmp_path / "r")
    n = 4 * ALIGN
    f = ArrayFiles(run, "levels", {}, cache.run_stamp(run), {"a": (np.int16, n)})
    done = []
    want = np.arange(n, dtype=np.int16)
    for start in range(0, n, ALIGN):
        part = aligned_empty(ALIGN, np.int16)
        part[:] = want[start:start + ALIGN]
        f.write_later(start, {"a": part}, lambda s=start: done.append(s))
    np.testing.assert_array_equal(f.arrays()["a"], want)
    assert sorted(done) == list(range(0, n, ALIGN))
    f.abort()
    g = ArrayFiles(run, "levels", {}, cache.run_stamp(run), {"a": (np.int16, n)})
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
                        if off >= ALIGN else real(fd, data, off))
    g.write_later(0, {"a": want})
    with pytest.raises(ArrayFilesError, match="full"):
        g.arrays()
    g.abort()
    assert tmp_files(tmp_path) == []


def test_a_refused_direct_write_goes_through_the_page_cache(tmp_path, monkeypatch):
    import errno
    lv, dist, _ = trajectories(R=4)
    write_run(tmp_path, lv, dist)
    run = open_run(tmp_path / "r")
    f = ArrayFiles(run, "levels", {}, cache.run_stamp(run), {"a": (np.uint8, 2 * ALIGN)})
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fd in f.direct.values():
            raise OSError(errno.EINVAL, "refused")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    part = aligned_empty(2 * ALIGN, np.uint8)
    part[:] = 9
    f.write("a", 0, part)
    np.testing.assert_array_equal(f.arrays()["a"], part)
    f.abort()


def test_the_cache_build_writes_the_level_statistics_during_the_scan(tmp_path, monkeypatch):
    """Wide tasks (on 4096-column bounds): most of the 800 KB of results go to the disk directly; the cached
    statistics equal the in-memory ones, are memory-mapped, and no temporary file is left."""
    sizes = [150_000, 150_003]
    lv, dist, _ = trajectories(R=6, N=sum(sizes), p_move=0.3, seed=2)
    write_run(tmp_path, lv, dist, sizes=sizes)
    seen = counting_pwrite(monkeypatch)
    stats = build_cache(open_run(tmp_path / "r"), workers=2)["levels"]
    check_stats(stats, reference(lv, dist, sizes))
    assert isinstance(stats.flips, np.memmap)
    if direct_io_works(tmp_path):                   # (elsewhere all through the page cache, same results)
        assert seen["direct"] > 0.9 * sum(sizes) * 8    # 8 bytes of results per weight
    assert tmp_files(tmp_path) == []
    again = build_cache(open_run(tmp_path / "r"))["levels"]     # read back from the cache
    check_stats(again, reference(lv, dist, sizes))


def test_a_build_that_cannot_write_its_files_computes_in_memory(tmp_path, monkeypatch):
    """A write that fails during the scan (disk full): the files are removed, the statistics computed again
    in memory (correct), and the cache save fails quietly as for a read-only folder."""
    lv, dist, _ = trajectories(seed=3)
    write_run(tmp_path, lv, dist)
    calls = []

    def full(self, name, start, part):
        calls.append(name)
        raise ArrayFilesError(28, "No space left on device")
    monkeypatch.setattr(ArrayFiles, "write", full)
    stats = build_cache(open_run(tmp_path / "r"))["levels"]
    assert calls
    check_stats(stats, reference(lv, dist))
    assert not isinstance(stats.flips, np.memmap)
    assert tmp_files(tmp_path) == []


def test_a_build_that_fails_leaves_no_file(tmp_path):
    """A damaged run (a level out of its layer's range) fails the build with the store's error; the files it
    had begun are removed."""
    from lts_core.store import RunError
    lv, dist, _ = trajectories(seed=4)
    lv[7, 3] = 200
    write_run(tmp_path, lv, dist)
    with pytest.raises(RunError, match="level"):
        build_cache(open_run(tmp_path / "r"))
    assert tmp_files(tmp_path) == []


def test_two_threads_building_one_runs_cache_do_not_share_files(tmp_path):
    """Two app sessions in one server may build the same run's cache at once: each writes files of its own
    (temporary names unique in the process), both get the right statistics, and the cache is whole."""
    import threading
    lv, dist, _ = trajectories(R=4)
    write_run(tmp_path / "small", lv, dist)
    small = open_run(tmp_path / "small" / "r")
    specs = {"a": (np.uint8, 5000)}
    f1, f2 = (ArrayFiles(small, "levels", {}, cache.run_stamp(small), specs) for _ in range(2))
    assert set(f1.paths.values()).isdisjoint(f2.paths.values())
    f1.write("a", 0, np.full(5000, 1, np.uint8))
    f2.write("a", 0, np.full(5000, 2, np.uint8))
    assert (f1.arrays()["a"] == 1).all() and (f2.arrays()["a"] == 2).all()
    f1.abort()
    f2.abort()
    sizes = [150_000, 150_003]
    lv, dist, _ = trajectories(R=6, N=sum(sizes), p_move=0.3, seed=5)
    write_run(tmp_path, lv, dist, sizes=sizes)
    want = reference(lv, dist, sizes)
    got, errors = [], []

    def build():
        try:
            got.append(build_cache(open_run(tmp_path / "r"))["levels"])
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 2
    for stats in got:
        check_stats(stats, want)
    check_stats(build_cache(open_run(tmp_path / "r"))["levels"], want)    # the cache as saved
    assert tmp_files(tmp_path) == []
