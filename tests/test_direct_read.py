"""Reading chunk files with O_DIRECT (lts_core.npy_direct.PositionalReader, Run.read_columns, the streamed
passes' buffers): every byte as an ordinary read gives it, aligned or not, at the ends of the file, through the
fallback where O_DIRECT is refused, and a clear error when a file is shorter than its header says."""
import errno
import os

import numpy as np
import pytest

from lts_core import npy_direct
from lts_core.analysis import stream
from lts_core.analysis.level_stats import LevelStatsPass
from lts_core.analysis.stream import (READ_AHEAD, RunSource, chunk_groups, plan_tasks, run_passes, serial,
                                      thread_executor)
from lts_core.npy_direct import ALIGN, PositionalReader, aligned_empty
from lts_core.store import CorruptChunkError, RunWriter, open_run
from test_stream import check_stats, reference, trajectories


def direct_io_works(folder) -> bool:
    """Whether this filesystem takes O_DIRECT reads (tmpfs and others refuse them)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / "probe"
    probe.write_bytes(b"x" * 2 * ALIGN)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [aligned_empty(ALIGN, np.uint8)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def every_read_direct(monkeypatch):
    """Reads of any size try O_DIRECT; counts the reads that went each way."""
    monkeypatch.setattr(npy_direct, "DIRECT_READ_MIN", 0)
    monkeypatch.delenv("SCRATCHOFF_DIRECT_READ", raising=False)
    npy_direct._no_direct_devices.clear()
    seen = {"direct": 0, "staged": 0}
    real_direct, real_staged = PositionalReader._read_direct, PositionalReader._read_staged

    def direct(self, out, pos):
        seen["direct"] += 1
        return real_direct(self, out, pos)

    def staged(self, out, pos):
        seen["staged"] += 1
        return real_staged(self, out, pos)
    monkeypatch.setattr(PositionalReader, "_read_direct", direct)
    monkeypatch.setattr(PositionalReader, "_read_staged", staged)
    yield seen
    npy_direct._no_direct_devices.clear()


RANGES = [(0, 3 * ALIGN), (0, 5), (1, 2 * ALIGN + 3), (ALIGN - 1, ALIGN + 2), (ALIGN, 3 * ALIGN),
          (100, 100 + 3 * ALIGN), (5 * ALIGN + 17, 9 * ALIGN), (0, 9 * ALIGN + 123), (7000, 9 * ALIGN + 123)]


def test_positional_reads_equal_the_bytes_aligned_or_not(tmp_path, every_read_direct):
    data = np.random.default_rng(0).integers(0, 256, 9 * ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    with PositionalReader(path) as f:
        for a, b in RANGES:
            for phase in (0, a % ALIGN, 7):   # buffers congruent with the file offset (read in place) or not
                out = aligned_empty(b - a, np.uint8, phase)
                assert f.read_into(out, a) == b - a
                np.testing.assert_array_equal(out, data[a:b], err_msg=f"[{a}, {b}) phase {phase}")
        # past the end of the file: the bytes there are, and how many
        out = aligned_empty(2 * ALIGN, np.uint8, 123)
        assert f.read_into(out, 8 * ALIGN + 123) == ALIGN
        np.testing.assert_array_equal(out[:ALIGN], data[8 * ALIGN + 123:])
        assert f.read_into(aligned_empty(3 * ALIGN, np.uint8, 5), 8 * ALIGN + 5) == ALIGN + 118
        assert f.read_into(np.empty(10, np.uint8), len(data) + 50) == 0
    if direct_io_works(tmp_path):
        assert every_read_direct["direct"] > 0 and every_read_direct["staged"] > 0


def test_reads_fall_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch, every_read_direct):
    data = np.random.default_rng(1).integers(0, 256, 5 * ALIGN + 9, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    real_open = os.open

    def refusing_open(p, flags, *a):   # as tmpfs answers
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)
    monkeypatch.setattr(os, "open", refusing_open)
    with PositionalReader(path) as f:
        out = np.empty(4 * ALIGN, np.uint8)
        assert f.read_into(out, 77) == out.size
        np.testing.assert_array_equal(out, data[77:77 + out.size])
        assert not f.direct
    with PositionalReader(path) as f:   # the filesystem is remembered: not tried again
        assert not f.direct
    monkeypatch.setattr(os, "open", real_open)
    npy_direct._no_direct_devices.clear()

    def refusing_preadv(fd, buffers, offset, *a):   # O_DIRECT opens but the read is refused (alignment)
        if fd == f.direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *a)
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    f = PositionalReader(path, direct=True)
    with f:
        out = aligned_empty(4 * ALIGN, np.uint8)
        assert f.read_into(out, ALIGN) == out.size
        np.testing.assert_array_equal(out, data[ALIGN:5 * ALIGN])
        assert not f.direct
    # switched off by the environment
    monkeypatch.setenv("SCRATCHOFF_DIRECT_READ", "0")
    assert not npy_direct.direct_reads_enabled() and not PositionalReader(path).direct


def write_wide_run(folder, lv, dist, chunk: int, padded: bool, sizes, monkeypatch):
    """A run of one- or several-record chunks whose files have the 4096-byte header (padded: written with
    O_DIRECT from page-aligned arrays) or numpy's own (np.save)."""
    monkeypatch.setattr(npy_direct, "MIN_BYTES", 0 if padded else 1 << 62)
    layers = [{"name": f"l{i}", "shape": [n], "numel": n, "n_levels": 4} for i, n in enumerate(sizes)]
    w = RunWriter.create(folder, "r", {"layers": layers, "steps_per_epoch": 10, "total_steps": 10 * len(lv)})
    for a in range(0, len(lv), chunk):
        r = min(chunk, len(lv) - a)
        arrays = {"step": np.arange(a, a + r) * 10, "bounds": np.zeros((r, len(sizes), 2), np.float32)}
        for name, arr in (("level", lv), ("dist", dist)):
            arrays[name] = aligned_empty(arr[a:a + r].shape, np.uint8)
            arrays[name][...] = arr[a:a + r]
        w.append_chunk(arrays)
    monkeypatch.setattr(npy_direct, "MIN_BYTES", 1 << 20)
    return open_run(folder / "r")


@pytest.mark.parametrize("chunk,padded", [(1, True), (1, False), (4, True), (4, False)])
def test_streamed_passes_read_with_o_direct_give_the_in_memory_results(tmp_path, monkeypatch, every_read_direct,
                                                                       chunk, padded):
    sizes = [150_000, 3, 0, 120_000]
    lv, dist, _ = trajectories(R=9, N=sum(sizes), seed=3)
    run = write_wide_run(tmp_path, lv, dist, chunk, padded, sizes, monkeypatch)
    header = open(run.path / "traj" / "000000.level.npy", "rb").read(ALIGN)
    assert (header[8] + 256 * header[9] + 10 == ALIGN) == padded   # the .npy header's length
    tasks = plan_tasks(sizes, 2)
    assert len(tasks) == 3 and all(t.start % stream.ALIGN_COLS == 0 for t in tasks)   # bounds on 4096 columns
    for executor in (serial, thread_executor(2)):
        (stats,) = run_passes(RunSource(run), [LevelStatsPass()], executor)
        check_stats(stats, reference(lv, dist, sizes))
    for c, r0 in ((0, 0), (len(run.chunk_sizes) - 1, len(lv) - run.chunk_sizes[-1])):   # first and last columns
        for a, b in ((0, 5 * ALIGN + 1), (sum(sizes) - 3 * ALIGN - 7, sum(sizes)), (1, sum(sizes))):
            buf = run.column_buffer("dist", a, b, run.chunk_sizes[c])
            np.testing.assert_array_equal(run.read_columns(c, "dist", a, b, buf), dist[r0:r0 + run.chunk_sizes[c], a:b])
    if direct_io_works(tmp_path):
        assert every_read_direct["direct"] > 0
        if chunk == 1:   # one-record chunks: the task's slices sit in place (congruent), the ends bounced
            off = 4096 if padded else 128
            assert run.column_buffer("level", tasks[1].start, tasks[1].stop, 2).ctypes.data % ALIGN == \
                (off + tasks[1].start) % ALIGN


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_shorter_than_its_header_says_is_a_clear_error(tmp_path, monkeypatch, every_read_direct, direct):
    sizes = [70_000]
    lv, dist, _ = trajectories(R=3, N=sum(sizes), seed=2)
    run = write_wide_run(tmp_path, lv, dist, 1, True, sizes, monkeypatch)
    if not direct:
        monkeypatch.setenv("SCRATCHOFF_DIRECT_READ", "0")
    path = run.path / "traj" / "000001.dist.npy"
    os.truncate(path, os.path.getsize(path) - 1000)   # cut after the run was opened
    np.testing.assert_array_equal(run.read_columns(1, "dist", 0, 60_000), dist[1:2, :60_000])
    with pytest.raises(CorruptChunkError, match=r"000001\.dist\.npy: the file ends before the data its header "
                                                r"describes .*69000 of 70000 bytes"):
        run.read_columns(1, "dist", 0, 70_000)
    with pytest.raises(CorruptChunkError, match="ends before"):
        run_passes(RunSource(run), [LevelStatsPass(), _NeedsDist()], serial)


class _NeedsDist(LevelStatsPass):
    needs = ("level", "dist")


def _vma_of(address: int) -> dict:
    """The /proc/self/smaps entry of the mapping holding `address`: its header line and fields."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                entry = {"head": head, "hit": lo <= address < hi}
            elif entry is not None and entry["hit"] and head[0].endswith(":"):
                entry[head[0][:-1]] = " ".join(head[1:])
            if entry is not None and entry["hit"] and head[0] == "VmFlags:":
                return entry
    raise AssertionError(f"no mapping holds {address:#x}")


def test_read_buffers_are_placed_for_direct_reads_and_ask_for_huge_pages():
    """`read_buffer` (the streamed passes' chunk buffers, `Run.column_buffer`) starts at the asked phase modulo
    4096 like `aligned_empty`; from 2 MiB on it is an anonymous mapping of its own that asks for transparent
    huge pages (so a direct read hands the disk 2 MiB segments, not 4 KiB ones); smaller, a plain array."""
    from lts_core.npy_direct import HUGE_PAGE, read_buffer
    for n, phase in ((5 << 20, 123), (HUGE_PAGE, 0), (3 * HUGE_PAGE + 7, 4095), (1000, 17)):
        b = read_buffer(n, np.uint8, phase)
        assert b.shape == (n,) and b.dtype == np.uint8 and b.ctypes.data % ALIGN == phase
        b[:] = 7
        assert int(b.sum()) == 7 * n
        if n < HUGE_PAGE:
            assert isinstance(b.base, np.ndarray)
    w = read_buffer((3, 1 << 20), np.float32, 8)
    assert w.shape == (3, 1 << 20) and w.ctypes.data % ALIGN == 8
    mode_file = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not (os.path.exists("/proc/self/smaps") and os.path.exists(mode_file)):
        pytest.skip("no transparent huge pages here")
    mode = open(mode_file).read()
    b = read_buffer(9 << 20, np.uint8, 100)
    vma = _vma_of(b.ctypes.data + HUGE_PAGE)
    assert len(vma["head"]) == 5          # anonymous: no file name
    if "[never]" not in mode and "THPeligible" in vma:
        assert vma["THPeligible"].split()[0] == "1"
    if "[madvise]" in mode:
        assert "hg" in vma["VmFlags"].split()      # MADV_HUGEPAGE was asked for


def test_a_pass_reuses_its_read_buffers_from_task_to_task(tmp_path, monkeypatch):
    """Each thread's chain of tasks allocates its READ_AHEAD + 1 buffer sets once (`scan_chain`, `BufferPool`);
    its later tasks, narrower or up to 4096 columns wider, read into them, and the results stay those computed
    in memory."""
    sizes = [150_000, 3, 0, 120_000]
    lv, dist, _ = trajectories(R=9, N=sum(sizes), seed=4)
    run = write_wide_run(tmp_path, lv, dist, 2, True, sizes, monkeypatch)
    made, real = [], type(run).column_buffer

    def counting(self, name, start, stop, records, reuse=None):
        got = real(self, name, start, stop, records, reuse)
        if got is not reuse:
            made.append(name)
        return got
    monkeypatch.setattr(type(run), "column_buffer", counting)
    monkeypatch.setattr(stream, "GROUP_BYTES", 1)         # one chunk per group
    tasks = plan_tasks(sizes, 1, task_cols=70_000)     # bounds on 4096 columns: one placement for all tasks
    assert len(tasks) == 4 and len({t.size for t in tasks}) > 1
    groups = len(tasks) * len(chunk_groups(run.chunk_sizes, 0, 70_000))
    for executor, chains in ((serial, 1), (thread_executor(2), 2)):
        made.clear()
        (stats,) = run_passes(RunSource(run), [_NeedsDist()], executor, task_cols=70_000)
        check_stats(stats, reference(lv, dist, sizes))
        assert groups > (READ_AHEAD + 1) * chains     # more groups read than buffer sets made:
        assert 2 * (READ_AHEAD + 1) <= len(made) <= 2 * (READ_AHEAD + 1) * chains    # (level, dist) per set
