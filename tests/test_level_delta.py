"""Levels stored as changes (lts_core.level_delta) and big chunk arrays written with O_DIRECT
(lts_core.npy_direct): both must read back bit for bit as the dense arrays they replace."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lts_core import level_delta
from lts_core.npy_direct import ALIGN, aligned_empty, write_npy_direct
from lts_core.store import CorruptChunkError, RunWriter, chunk_file, open_run


def sparse_levels(rng, r, n, p):
    """uint8 [r, n] levels where each weight changes level with probability p between records."""
    out = np.empty((r, n), np.uint8)
    out[0] = rng.integers(0, 4, n)
    for i in range(1, r):
        out[i] = out[i - 1]
        moved = rng.random(n) < p
        out[i, moved] = (out[i, moved] + rng.integers(1, 4, moved.sum())) % 4
    return out


@settings(max_examples=60, deadline=None)
@given(r=st.integers(2, 9), n=st.integers(1, 300), p=st.floats(0.0, 0.05), seed=st.integers(0, 10_000))
def test_round_trip_for_every_column_selection(r, n, p, seed):
    rng = np.random.default_rng(seed)
    lv = sparse_levels(rng, r, n, p)
    enc = level_delta.encode(lv, max_ratio=float("inf"))
    assert enc is not None
    base, at, to = enc
    # the encoding holds exactly the changes, in (record, weight) order
    assert at.size == int((lv[1:] != lv[:-1]).sum()) and level_delta.check(base, at, to, r) is None
    assert np.array_equal(level_delta.decode(base, at, to, r), lv)
    a, b = sorted(rng.integers(0, n + 1, 2))
    assert np.array_equal(level_delta.decode(base, at, to, r, slice(a, b)), lv[:, a:b])
    assert np.array_equal(level_delta.decode(base, at, to, r, slice(a, b, 3)), lv[:, a:b:3])
    idx = rng.integers(0, n, rng.integers(0, 12))  # unsorted, maybe repeated
    assert np.array_equal(level_delta.decode(base, at, to, r, idx), lv[:, idx])


def test_known_small_case_and_when_not_worth_it():
    lv = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 2, 3], [1, 2, 2, 0]], np.uint8)
    base, at, to = level_delta.encode(lv, max_ratio=float("inf"))
    assert base.tolist() == [0, 1, 2, 3]
    assert at.tolist() == [2 * 4 + 1, 3 * 4 + 0, 3 * 4 + 3] and to.tolist() == [2, 1, 0]
    # 3 changes × 9 bytes = 27 > half of the 12 dense bytes after the first row: stays dense
    assert level_delta.encode(lv) is None
    assert level_delta.encode(lv[:1]) is None  # one record: nothing to gain
    assert "increasing" in level_delta.check(base, at[::-1].copy(), to, 4)
    assert "outside" in level_delta.check(base, at + 4, to, 4)


LAYERS = [{"name": "a", "shape": [600, 50], "n_levels": 4, "bits": 2, "kind": "liq"},
          {"name": "b", "shape": [2000], "n_levels": 4, "bits": 2, "kind": "liq"}]


def write_run(tmp_path, levels_per_chunk, run_id="r"):
    n = 600 * 50 + 2000
    w = RunWriter.create(tmp_path, run_id, {"layers": LAYERS, "steps_per_epoch": 4, "record_every": 1})
    rng = np.random.default_rng(0)
    t = 0
    for lv in levels_per_chunk:
        r = lv.shape[0]
        w.append_chunk({"step": np.arange(t, t + r), "level": lv,
                        "dist": rng.integers(0, 256, (r, n), dtype=np.uint8),
                        "bounds": np.zeros((r, 2, 2), np.float32)})
        t += r
    w.set_status("complete")
    return open_run(tmp_path / run_id)


def test_store_keeps_rare_level_changes_as_changes_and_reads_them_back(tmp_path):
    rng = np.random.default_rng(1)
    n = 600 * 50 + 2000
    sparse = sparse_levels(rng, 6, n, 0.005)
    dense = rng.integers(0, 4, (3, n), dtype=np.uint8)  # every level moves: stays a dense array
    single = rng.integers(0, 4, (1, n), dtype=np.uint8)
    run = write_run(tmp_path, [sparse, dense, single])
    stored = [sorted(c["arrays"]) for c in run.manifest["chunks"]]
    assert "level_base" in stored[0] and "level" not in stored[0]
    assert "level" in stored[1] and "level_base" not in stored[1] and "level" in stored[2]
    on_disk = sum(chunk_file(run.path, 0, a).stat().st_size for a in ("level_base", "level_change_at",
                                                                      "level_change_to"))
    k = int((sparse[1:] != sparse[:-1]).sum())
    assert n + 9 * k < on_disk < n + 9 * k + 3 * 256  # first row + 9 bytes per change + three .npy headers
    assert on_disk < 0.25 * sparse.nbytes
    allv = np.concatenate([sparse, dense, single])
    assert np.array_equal(run.levels(), allv)
    assert np.array_equal(run.levels("b"), allv[:, 30000:])
    idx = np.array([31999, 5, 5, 20000])
    assert np.array_equal(run.weights(idx)["level"], allv[:, idx])
    got = [c["level"] for c in run.iter_chunks(arrays=("level",), layer="a")]
    assert np.array_equal(np.concatenate(got), allv[:, :30000])


def test_corrupt_level_changes_are_a_clear_error(tmp_path):
    rng = np.random.default_rng(2)
    run = write_run(tmp_path, [sparse_levels(rng, 4, 32000, 0.01)])
    f = chunk_file(run.path, 0, "level_change_at")
    at = np.load(f)
    np.save(f, at[::-1].copy())
    with pytest.raises(CorruptChunkError, match="level_change_at.*not strictly increasing"):
        open_run(run.path).levels()
    g = chunk_file(run.path, 0, "level_change_to")
    g.write_bytes(g.read_bytes()[:-5])
    with pytest.raises(CorruptChunkError, match="level_change_to.*truncated"):
        open_run(run.path)


def test_reserved_names_are_refused(tmp_path):
    w = RunWriter.create(tmp_path, "r", {"layers": LAYERS})
    with pytest.raises(ValueError, match="reserved"):
        w.append_chunk({"step": np.arange(1), "level_base": np.zeros((1, 32000), np.uint8)})


def _direct_supported(folder) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("phase", [0, 16, 1000])
@pytest.mark.parametrize("shape,dtype", [((3, 700_000), np.uint8), ((2 << 20,), np.uint8),
                                         ((5, 100_003), np.float32), ((9 << 20) // 4 + 5, np.int32)])
def test_direct_npy_reads_back_with_numpy(tmp_path, shape, dtype, phase):
    """Aligned arrays go straight to the disk; unaligned ones (phase ≠ 0, as numpy allocates) through the
    staging buffer, here in two pieces for the 9 MiB array."""
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    arr = aligned_empty(shape, dtype, phase * np.dtype(dtype).itemsize)
    arr[...] = np.random.default_rng(0).integers(0, 255, shape).astype(dtype)
    path = tmp_path / "a.npy"
    assert write_npy_direct(path, arr)
    assert path.stat().st_size == ALIGN + arr.nbytes  # header block + data, the padding cut off
    assert np.array_equal(np.load(path), arr)
    mm = np.load(path, mmap_mode="r")
    assert mm.offset == ALIGN and np.array_equal(mm, arr)


def test_cached_results_go_through_o_direct(tmp_path):
    """The analysis cache's per-weight arrays are numpy's own allocations (never page-aligned): they are
    written through the staging buffer, bypassing the page cache (a 4096-byte header shows it), and read back
    memory-mapped, bit for bit."""
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    from lts_core.analysis import cache
    run = write_run(tmp_path, [np.zeros((2, 32000), np.uint8)])
    flips = aligned_empty(3_000_001, np.int32, phase=16)    # where numpy's own big allocations start
    flips[:] = np.random.default_rng(1).integers(0, 50, flips.size)
    assert cache.save(run, "levels", {}, {"flips": flips}, {"t": np.arange(3)})
    got = cache.load(run, "levels", {})
    assert got.status == "fresh" and got.arrays["flips"].offset == ALIGN
    assert np.array_equal(got.arrays["flips"], flips) and np.array_equal(got.tables["t"], np.arange(3))


def test_direct_npy_declines_what_it_cannot_write(tmp_path, monkeypatch):
    arr = aligned_empty((2, 1 << 20), np.uint8)
    assert not write_npy_direct(tmp_path / "small.npy", arr[:, :1000].copy())  # small, and unaligned
    assert not write_npy_direct(tmp_path / "strided.npy", arr[:, ::2])
    assert not (tmp_path / "small.npy").exists() and not (tmp_path / "strided.npy").exists()

    def refuse(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "open", refuse)  # a filesystem without O_DIRECT (tmpfs)
    assert not write_npy_direct(tmp_path / "x.npy", arr)
    monkeypatch.undo()
    # the store then falls back to an ordinary write: the run still reads
    run = write_run(tmp_path, [np.zeros((2, 32000), np.uint8)])
    assert np.array_equal(run.levels(), np.zeros((2, 32000), np.uint8))


def test_recorder_chunks_go_through_o_direct_and_read_back(tmp_path):
    """The recorder's page-aligned buffers let the store write big chunk arrays with O_DIRECT (a 4096-byte
    .npy header), and what was recorded every step reads back equal to a fresh measurement of each step."""
    import torch
    from torch import nn

    from lts_core import Recorder, quantize_model
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4))
    quantize_model(model, bits=2, example_input=torch.randn(2, 8))
    q = model[2].weight_quantizer
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder.create(tmp_path, model, {"name": "direct"}, every=1, steps_per_epoch=3, total_steps=3)
    expected = []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        lv, dist = q.measure(model[2].weight)  # the reference path, recomputed from scratch
        expected.append((lv.reshape(-1).numpy().astype(np.uint8), dist.reshape(-1)))
        rec.step()
        opt.step()
    rec.finish()
    run = open_run(rec.path)
    assert np.load(chunk_file(run.path, 0, "dist"), mmap_mode="r").offset == ALIGN  # written with O_DIRECT
    from lts_core.distance import encode_distance
    for r, (lv, dist) in enumerate(expected):
        assert np.array_equal(run.levels()[r], lv)
        assert np.array_equal(run.dist_codes()[r], encode_distance(dist).numpy())
