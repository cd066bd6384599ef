"""Run store: writer/reader round trip, lazy column reads, and robustness to crashes and corruption."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from lts_core.store import (METRIC_COLUMNS, SCHEMA_VERSION, CorruptChunkError, CorruptManifestError,
                            MissingManifestError, RunError, RunExistsError, RunWriter, SchemaVersionError,
                            chunk_file, list_runs, open_run)

LAYERS = [{"name": "fc1", "shape": [3, 4], "n_levels": 4, "bits": 2, "flops": 24, "kind": "liq"},
          {"name": "fc2", "shape": [5], "n_levels": 4, "bits": 2, "flops": 10, "kind": "lsq"}]
N = 17


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _chunk(rng, steps, with_state=True):
    r = len(steps)
    out = {"step": np.asarray(steps, dtype=np.int64),
           "level": rng.integers(0, 4, (r, N), dtype=np.uint8),
           "dist": rng.integers(0, 256, (r, N), dtype=np.uint8),
           "bounds": rng.standard_normal((r, 2, 2)).astype(np.float32)}
    if with_state:
        out["ema"] = rng.integers(0, 256, (r, N), dtype=np.uint8)
    return out


def make_run(tmp_path, run_id="r1", chunks=((0, 2), (4, 6, 8)), status="complete", seed=0, **fields):
    rng = np.random.default_rng(seed)
    w = RunWriter.create(tmp_path, run_id, {"layers": LAYERS, "steps_per_epoch": 4, "total_steps": 9,
                                            "record_every": 2, "state_arrays": ["ema"],
                                            "config": {"model": "mlp"}, **fields})
    written = [_chunk(rng, c) for c in chunks]
    for c in written:
        w.append_chunk(c)
    if status != "running":
        w.set_status(status)
    cat = {k: np.concatenate([c[k] for c in written]) for k in written[0]} if written else {}
    return w, cat


def test_round_trip_and_layer_slicing(tmp_path):
    w, cat = make_run(tmp_path)
    w.write_summary("freeze_step", np.arange(N, dtype=np.int64) - 1)
    run = open_run(tmp_path / "r1")
    m = run.manifest
    assert m["schema_version"] == SCHEMA_VERSION == 2
    assert run.status == "complete" and run.reason is None and run.run_id == "r1"
    assert run.config == {"model": "mlp"}
    assert [c["n_records"] for c in m["chunks"]] == [2, 3]
    assert m["chunks"][1]["first_step"] == 4 and m["chunks"][1]["last_step"] == 8
    assert [lay["offset"] for lay in run.layers] == [0, 12] and run.n_weights == N and run.n_records == 5
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6, 8])
    assert run.steps.dtype == np.int64
    np.testing.assert_allclose(run.epochs, np.array([0, 2, 4, 6, 8]) / 4)
    np.testing.assert_array_equal(run.levels(), cat["level"])
    np.testing.assert_array_equal(run.dist_codes(), cat["dist"])
    d = run.dists()
    assert d.dtype == np.float32
    np.testing.assert_array_equal(d, cat["dist"].astype(np.float32) / 128)
    np.testing.assert_array_equal(run.state("ema"), cat["ema"])
    np.testing.assert_array_equal(run.bounds(), cat["bounds"])
    np.testing.assert_array_equal(run.bounds("fc2"), cat["bounds"][:, 1])
    for key in ("fc1", 0):
        np.testing.assert_array_equal(run.levels(key), cat["level"][:, :12])
    for key in ("fc2", 1, -1):
        np.testing.assert_array_equal(run.levels(key), cat["level"][:, 12:])
        np.testing.assert_array_equal(run.state("ema", key), cat["ema"][:, 12:])
    np.testing.assert_array_equal(run.freeze_steps(), np.arange(N) - 1)
    np.testing.assert_array_equal(run.freeze_steps("fc2"), np.arange(12, N) - 1)
    with pytest.raises(KeyError, match="nope"):
        run.levels("nope")
    with pytest.raises(IndexError):
        run.levels(5)
    with pytest.raises(KeyError):
        run.state("freq")


def test_decode_matches_torch_decode(tmp_path):
    torch = pytest.importorskip("torch")
    from lts_core.distance import decode_distance
    make_run(tmp_path)
    run = open_run(tmp_path / "r1")
    np.testing.assert_array_equal(run.dists(), decode_distance(torch.from_numpy(run.dist_codes())).numpy())


def test_iter_chunks_and_weights(tmp_path):
    _, cat = make_run(tmp_path)
    run = open_run(tmp_path / "r1")
    chunks = list(run.iter_chunks(("level", "dist", "bounds"), layer="fc2"))
    assert [c["index"] for c in chunks] == [0, 1]
    np.testing.assert_array_equal(np.concatenate([c["step"] for c in chunks]), run.steps)
    np.testing.assert_array_equal(np.concatenate([c["level"] for c in chunks]), cat["level"][:, 12:])
    np.testing.assert_array_equal(np.concatenate([c["dist"] for c in chunks]), cat["dist"][:, 12:])
    assert chunks[0]["bounds"].shape == (2, 2)
    wts = run.weights(np.array([0, 4]), layer="fc2")
    np.testing.assert_array_equal(wts["index"], [12, 16])
    np.testing.assert_array_equal(wts["level"], cat["level"][:, [12, 16]])
    np.testing.assert_array_equal(wts["dist_code"], cat["dist"][:, [12, 16]])
    np.testing.assert_array_equal(wts["ema"], cat["ema"][:, [12, 16]])
    assert "freeze_step" not in wts and run.freeze_steps() is None
    with pytest.raises(IndexError):
        run.weights([5], layer="fc2")


def test_metrics_empty_then_written(tmp_path):
    w, _ = make_run(tmp_path, status="running")
    run = open_run(tmp_path / "r1")
    assert list(run.metrics.columns) == list(METRIC_COLUMNS) and len(run.metrics) == 0
    df = pd.DataFrame([{c: float(i) for c in METRIC_COLUMNS} for i in range(2)])
    w.write_metrics(df)
    pd.testing.assert_frame_equal(open_run(tmp_path / "r1").metrics, df)
    assert not [p for p in (tmp_path / "r1").iterdir() if ".tmp-" in p.name]


def test_empty_run_reads(tmp_path):
    make_run(tmp_path, chunks=(), status="running")
    run = open_run(tmp_path / "r1")
    assert run.n_records == 0 and run.status == "running"
    assert run.levels().shape == (0, N) and run.steps.shape == (0,) and run.bounds().shape == (0, 2, 2)


def test_create_refuses_existing_nonempty_dir(tmp_path):
    make_run(tmp_path)
    with pytest.raises(RunExistsError, match="already exists"):
        RunWriter.create(tmp_path, "r1", {})
    (tmp_path / "empty").mkdir()
    RunWriter.create(tmp_path, "empty", {})  # an empty folder is fine
    with pytest.raises(ValueError):
        RunWriter.create(tmp_path, "../evil", {})


def test_writer_rejects_bad_chunks(tmp_path):
    w, _ = make_run(tmp_path, chunks=())
    rng = np.random.default_rng(1)
    bad = _chunk(rng, [0, 1])
    bad["level"] = bad["level"][:, :5]
    with pytest.raises(ValueError, match="level"):
        w.append_chunk(bad)
    bad = _chunk(rng, [0, 1])
    bad["dist"] = bad["dist"].astype(np.int16)
    with pytest.raises(ValueError, match="uint8"):
        w.append_chunk(bad)
    assert open_run(tmp_path / "r1").n_records == 0


def test_running_with_dead_pid_is_interrupted(tmp_path):
    make_run(tmp_path, run_id="dead", status="running", pid=_dead_pid())
    make_run(tmp_path, run_id="alive", status="running")  # this process
    dead, alive = open_run(tmp_path / "dead"), open_run(tmp_path / "alive")
    assert dead.status == "interrupted" and dead.reason == "process ended without closing the run"
    assert json.loads((tmp_path / "dead" / "manifest.json").read_text())["status"] == "running"  # not rewritten
    assert dead.n_records == 5
    assert alive.status == "running"
    other_host = make_run(tmp_path, run_id="remote", status="running", pid=_dead_pid(), host="elsewhere")
    assert other_host and open_run(tmp_path / "remote").status == "running"


def test_truncated_chunk(tmp_path):
    make_run(tmp_path, run_id="good")
    make_run(tmp_path, run_id="bad")
    f = chunk_file(tmp_path / "bad", 1, "level")
    data = f.read_bytes()
    f.write_bytes(data[:len(data) - 7])
    with pytest.raises(CorruptChunkError, match=str(f).replace("\\", "\\\\")):
        open_run(tmp_path / "bad")
    f.write_bytes(data[:40])  # header cut in the middle
    with pytest.raises(CorruptChunkError, match="000001.level.npy"):
        open_run(tmp_path / "bad")
    entries = {e.run_id: e for e in list_runs(tmp_path)}
    assert entries["good"].ok and entries["good"].run is not None and entries["good"].error is None
    assert not entries["bad"].ok and entries["bad"].run is None and entries["bad"].status == "broken"
    assert "000001.level.npy" in entries["bad"].error


def test_missing_or_wrong_shape_chunk(tmp_path):
    make_run(tmp_path)
    f = chunk_file(tmp_path / "r1", 0, "dist")
    np.save(f, np.zeros((2, N + 1), np.uint8))
    with pytest.raises(CorruptChunkError, match="shape"):
        open_run(tmp_path / "r1")
    f.unlink()
    with pytest.raises(CorruptChunkError, match="missing"):
        open_run(tmp_path / "r1")


def test_manifest_errors(tmp_path):
    make_run(tmp_path, run_id="nomani")
    (tmp_path / "nomani" / "manifest.json").unlink()
    with pytest.raises(MissingManifestError, match="manifest.json"):
        open_run(tmp_path / "nomani")
    make_run(tmp_path, run_id="badjson")
    (tmp_path / "badjson" / "manifest.json").write_text("{ not json")
    with pytest.raises(CorruptManifestError, match="manifest.json"):
        open_run(tmp_path / "badjson")
    make_run(tmp_path, run_id="future")
    mpath = tmp_path / "future" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(SchemaVersionError, match=r"newer scratchoff \(schema 99\); this version reads schemas 1 to 2"):
        open_run(tmp_path / "future")
    assert issubclass(SchemaVersionError, RunError)
    with pytest.raises(MissingManifestError):
        open_run(tmp_path / "does-not-exist")
    entries = list_runs(tmp_path)
    assert len(entries) == 3 and not any(e.ok for e in entries)
    assert {e.run_id for e in entries} == {"nomani", "badjson", "future"}


def test_orphans_ignored(tmp_path):
    _, cat = make_run(tmp_path)
    d = tmp_path / "r1" / "traj"
    # a crash after the rename of chunk 2's files but before the manifest listed it, and a stray temp file
    rng = np.random.default_rng(5)
    for name, arr in _chunk(rng, [10, 12]).items():
        np.save(chunk_file(tmp_path / "r1", 2, name), arr)
    (d / f"000003.level.npy.tmp-{os.getpid()}").write_bytes(b"partial")
    (tmp_path / "r1" / "manifest.json.tmp-123").write_text("{")
    run = open_run(tmp_path / "r1")
    assert run.n_records == 5
    np.testing.assert_array_equal(run.levels(), cat["level"])


def test_list_runs_sorted_newest_first(tmp_path):
    for rid in ("a", "b", "c"):
        make_run(tmp_path, run_id=rid)
        time.sleep(0.01)
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / ".hidden").mkdir()
    entries = list_runs(tmp_path)
    assert [e.run_id for e in entries] == ["c", "b", "a"]
    assert all(e.ok and e.status == "complete" for e in entries)
    assert list_runs(tmp_path / "missing") == []


def test_no_pickle(tmp_path):
    w, _ = make_run(tmp_path)
    with pytest.raises(ValueError):
        w.write_summary("obj", np.array([{"a": 1}], dtype=object))


def test_list_runs_finds_sweep_groups_and_skips_empty_folders(tmp_path):
    make_run(tmp_path, run_id="top")
    sweep = tmp_path / "sweep-1"
    sweep.mkdir()
    make_run(sweep, run_id="inner-a")
    make_run(sweep, run_id="inner-b")
    (sweep / "inner-b" / "manifest.json").unlink()  # broken inside a group: listed as broken
    (tmp_path / "sweep-2").mkdir()  # a sweep that has not started: skipped, not "broken"
    (tmp_path / ".logs").mkdir()  # hidden folders are not runs
    entries = {e.path.name: e for e in list_runs(tmp_path)}
    assert set(entries) == {"top", "inner-a", "inner-b"}
    assert entries["top"].group is None and entries["inner-a"].group == "sweep-1"
    assert entries["inner-a"].ok and not entries["inner-b"].ok and entries["inner-b"].status == "broken"
    assert "manifest" in entries["inner-b"].error
    assert {e.path.name for e in list_runs(tmp_path, depth=1)} == {"top"}


def test_schema_1_runs_still_read(tmp_path):
    """Runs written before levels could be stored as changes (schema 1, e.g. the shipped examples) read as
    before."""
    _, cat = make_run(tmp_path, run_id="old")
    mpath = tmp_path / "old" / "manifest.json"
    m = json.loads(mpath.read_text())
    assert all("level" in c["arrays"] for c in m["chunks"])  # random levels: stored dense
    m["schema_version"] = 1
    mpath.write_text(json.dumps(m))
    run = open_run(tmp_path / "old")
    assert run.manifest["schema_version"] == 1
    assert np.array_equal(run.levels(), cat["level"]) and np.array_equal(run.dist_codes(), cat["dist"])


def test_side_array_is_stored_as_packed_bits(tmp_path):
    """The optional 0/1 `side` state array costs one bit per weight per record on disk, and every reader (whole
    array, layer, iter_chunks, positioned column reads at any offset) gets the 0/1 values back."""
    rng = np.random.default_rng(5)
    n = 37  # not a multiple of 8
    layers = [{"name": "a", "shape": [3, 7], "n_levels": 4}, {"name": "b", "shape": [16], "n_levels": 4}]
    w = RunWriter.create(tmp_path, "side", {"layers": layers, "state_arrays": ["side"]})
    sides = []
    for r0 in (0, 3):
        side = rng.integers(0, 2, (3, n), dtype=np.uint8)
        sides.append(side)
        w.append_chunk({"step": np.arange(r0, r0 + 3), "level": rng.integers(0, 4, (3, n), dtype=np.uint8),
                        "dist": rng.integers(0, 65, (3, n), dtype=np.uint8), "side": side,
                        "bounds": np.zeros((3, 2, 2), np.float32)})
    with pytest.raises(ValueError, match="0/1"):
        w.append_chunk({"step": np.arange(6, 7), "side": np.full((1, n), 2, np.uint8)})
    full = np.concatenate(sides)
    run = open_run(tmp_path / "side")
    assert "side" in run.state_arrays and run.manifest["chunks"][0]["arrays"].count("side_bits") == 1
    f = tmp_path / "side" / "traj" / "000000.side_bits.npy"
    assert np.load(f).shape == (3, 5)  # ceil(37 / 8) bytes per record
    np.testing.assert_array_equal(run.state("side"), full)
    np.testing.assert_array_equal(run.state("side", "b"), full[:, 21:])
    np.testing.assert_array_equal(np.concatenate([c["side"] for c in run.iter_chunks(("side",), layer="a")]),
                                  full[:, :21])
    for start, stop in ((0, 37), (3, 4), (5, 21), (8, 16), (21, 37), (36, 37), (9, 9)):
        got = np.concatenate([run.read_columns(c, "side", start, stop) for c in range(2)])
        np.testing.assert_array_equal(got, full[:, start:stop])
    buf = np.empty(100, np.uint8)
    np.testing.assert_array_equal(run.read_columns(1, "side", 11, 30, buf), sides[1][:, 11:30])
    assert run.weights([2, 30])["side"].tolist() == full[:, [2, 30]].tolist()


@pytest.mark.parametrize("end", ["open", "killed", "sealed"])
def test_side_bits_appended_record_by_record(tmp_path, end):
    """The recorder's open chunk packs `side` as it appends: while the run is written, after a kill (the chunk
    never sealed) and once sealed, every reader gets the 0/1 values of the records on disk back."""
    rng = np.random.default_rng(7)
    n, cap = 37, 6  # not a multiple of 8
    layers = [{"name": "a", "shape": [3, 7], "n_levels": 4}, {"name": "b", "shape": [16], "n_levels": 4}]
    w = RunWriter.create(tmp_path, "side", {"layers": layers})
    buf = {"step": np.arange(cap, dtype=np.int64), "level": rng.integers(0, 4, (cap, n), dtype=np.uint8),
           "dist": rng.integers(0, 65, (cap, n), dtype=np.uint8), "side": rng.integers(0, 2, (cap, n), np.uint8),
           "bounds": np.zeros((cap, 2, 2), np.float32)}
    chunk = w.open_chunk(buf)
    chunk.append(2)
    chunk.append(5)
    kept = 5
    if end == "killed":
        buf["side"][5] = 2  # a bad value: refused, and the records already written stay readable
        with pytest.raises(ValueError, match="0/1"):
            chunk.append(6)
        chunk.abandon()
    elif end == "sealed":
        chunk.seal()
        assert np.load(chunk_file(tmp_path / "side", 0, "side_bits")).shape == (kept, 5)
    run = open_run(tmp_path / "side")
    arrays = (run.manifest["open_chunk"] if end != "sealed" else run.manifest["chunks"][0])["arrays"]
    assert "side_bits" in arrays and "side" not in arrays and run.state_arrays == ["side"]
    assert run.n_records == kept
    full = buf["side"][:kept]
    np.testing.assert_array_equal(run.state("side"), full)
    np.testing.assert_array_equal(run.state("side", "b"), full[:, 21:])
    for start, stop in ((0, 37), (3, 4), (5, 21), (8, 16), (36, 37)):
        np.testing.assert_array_equal(run.read_columns(0, "side", start, stop), full[:, start:stop])
    np.testing.assert_array_equal(run.levels(), buf["level"][:kept])
