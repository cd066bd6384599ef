"""Issue 13, items 5, 6, 8, 13: a corpus of corrupted and crafted run folders (tests/bad_runs.py). Each bad
run is listed as broken with a one-line reason naming the file (or fails only where its damage is read),
the good run beside it keeps working, nothing outside a run folder is ever read, and `python -m lts_core
runs` lists them all without a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bad_runs import CASES, build_corpus, make_good_run
from lts_core.store import RunError, list_runs, open_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    runs, outside = build_corpus(tmp_path_factory.mktemp("corpus"))
    return runs, outside, {e.path.name: e for e in list_runs(runs)}


def test_corpus_is_complete(corpus):
    runs, _, entries = corpus
    assert set(entries) == {c.name for c in CASES} | {"good"}
    assert len({c.name for c in CASES}) == len(CASES) >= 100


def test_good_run_beside_them_reads(corpus):
    runs, _, entries = corpus
    good = entries["good"]
    assert good.ok and good.status == "complete" and good.run.n_records == 7
    assert good.run.levels().shape == (7, 17) and len(good.run.metrics) == 3
    assert good.run.manifest["chunks"][0]["arrays"] == ["step", "level", "dist", "ema", "bounds", "raw_dist",
                                                        "side_bits"]
    assert good.run.state("side").shape == good.run.raw_dists().shape == (7, 17)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_run_is_reported_not_raised(corpus, case):
    runs, outside, entries = corpus
    e = entries[case.name]
    if case.expect == "broken":
        assert not e.ok and e.run is None and e.status == "broken"
        assert case.needle in e.error, e.error
        assert "\n" not in e.error and len(e.error) <= 1000
        assert str(runs / case.name) in e.error or case.name in e.error  # names the file or the run
        assert e.manifest is None or isinstance(e.manifest.get("config", {}), dict)
        with pytest.raises(RunError):
            open_run(runs / case.name)
        return
    assert e.ok, e.error
    run = e.run
    if case.expect == "ok":
        good = entries["good"].run  # same seed: the same arrays
        assert np.array_equal(run.state("ema"), good.state("ema"))
        assert np.array_equal(run.state("side"), good.state("side"))
        assert np.array_equal(run.levels(), good.levels()) and len(run.metrics) == 3
        return
    read = {"metrics": lambda: run.metrics, "levels": lambda: run.levels(),
            "summary": lambda: run.freeze_steps()}[case.expect]
    with pytest.raises(RunError) as err:
        read()
    assert case.needle in str(err.value) and "\n" not in str(err.value)


def test_no_file_outside_a_run_is_opened(corpus, monkeypatch):
    """Opening and reading every run of the corpus never opens a file under the 'outside' folder."""
    runs, outside, _ = corpus
    opened = []
    real_open = os.open

    def spy(path, *a, **k):
        opened.append(os.path.realpath(path))
        return real_open(path, *a, **k)

    import builtins
    real_builtin_open = builtins.open

    def spy_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_builtin_open(file, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(builtins, "open", spy_open)
    for e in list_runs(runs):
        if e.ok:
            for read in (e.run.levels, e.run.dist_codes, lambda: e.run.metrics, e.run.freeze_steps):
                try:
                    read()
                except RunError:
                    pass
    monkeypatch.undo()
    leaked = [p for p in opened if p.startswith(str(outside.resolve()))]
    assert not leaked and len(opened) > 100


def test_cli_runs_lists_every_run(corpus):
    runs, _, entries = corpus
    r = subprocess.run([sys.executable, "-m", "lts_core", "runs", "--folder", str(runs)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(entries)
    broken = {c.name for c in CASES if c.expect in ("broken", "metrics")}
    for name in broken:
        assert sum(name in line and "BROKEN" in line for line in lines) == 1, name
    assert any(line.startswith("good ") and "complete" in line for line in lines)


def test_schema_1_and_example_runs_still_read():
    for e in list_runs(ROOT / "data" / "runs"):
        assert e.ok, e.error
        assert e.run.levels().shape == (e.run.n_records, e.run.n_weights) and len(e.run.metrics) > 0


def test_writer_refuses_unknown_names(tmp_path):
    run = make_good_run(tmp_path, "r")
    from lts_core.store import RunWriter
    w = RunWriter.create(tmp_path, "w", {"layers": [{"name": "a", "shape": [4], "n_levels": 4}]})
    with pytest.raises(ValueError, match="invalid array name"):
        w.append_chunk({"step": np.array([0]), "level": np.zeros((1, 4), np.uint8), "dist": np.zeros((1, 4), np.uint8),
                        "bounds": np.zeros((1, 1, 2), np.float32), "../x": np.zeros((1, 4), np.uint8)})
    with pytest.raises(ValueError, match="unknown summary"):
        w.write_summary("../../x", np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="invalid run id"):
        RunWriter.create(tmp_path, "a\nb", {})
    with pytest.raises(ValueError, match="invalid run metadata.*bits"):
        RunWriter.create(tmp_path, "cfg", {"config": {"bits": True}})
    assert open_run(run).status == "complete"


def test_crafted_analysis_cache_reads_nothing_outside(tmp_path):
    """A cache meta file naming arrays with path separators (or a cache folder leading out of the run) is
    ignored: the analysis recomputes, and no file outside the run is opened."""
    import json as _json

    from lts_core.analysis import cache
    runs = tmp_path / "runs"
    run_dir = make_good_run(runs, "r")
    secret = tmp_path / "secret.npy"
    np.save(secret, np.arange(17))
    run = open_run(run_dir)
    stamp = cache.run_stamp(run)
    (run_dir / "cache").mkdir()
    meta = {"version": cache.CACHE_VERSION, "stamp": stamp, "settings": {}, "key": "0123456789ab",
            "arrays": ["../../../secret"], "tables": []}
    (run_dir / "cache" / "levels.json").write_text(_json.dumps(meta))
    assert cache.load(run, "levels", {}) is None
    meta["arrays"], meta["key"] = ["x"], "../../.."
    (run_dir / "cache" / "levels.json").write_text(_json.dumps(meta))
    assert cache.load(run, "levels", {}) is None
    with pytest.raises(KeyError):
        run.cache_file("../manifest.json")
    (run_dir / "cache" / "levels.json").unlink()
    (run_dir / "cache").rmdir()
    (run_dir / "cache").symlink_to(tmp_path)
    (e,) = list_runs(runs)
    assert not e.ok and "outside the run folder" in e.error
