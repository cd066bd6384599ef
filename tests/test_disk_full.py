"""Issue 13, item 2: on the first failed write (disk full) training stops, every record already written is
kept and readable, the CLI says "disk full at <path>, N records kept" in one line and exits 1, and no temp
file or torch message is left behind. One test uses a real 3 MB filesystem (a loop-mounted ext4 image, or a
tmpfs), the others inject ENOSPC."""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lts_core.store import StoreWriteError, open_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MB filesystem mounted at tmp_path/small: ext4 on a loop device (O_DIRECT works there), else a
    tmpfs; skipped where mounting is impossible (not root, no loop devices, a container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    img = tmp_path / "small.img"
    tried = []
    if os.geteuid() == 0 and shutil.which("mkfs.ext4"):
        with open(img, "wb") as f:
            f.truncate(3 << 20)
        mk = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], capture_output=True)
        if mk.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(img), str(mnt)],
                                                 capture_output=True).returncode == 0:
            yield mnt
            subprocess.run(["umount", str(mnt)])
            return
        tried.append("loop-mounted ext4")
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                            capture_output=True).returncode == 0:
        yield mnt
        subprocess.run(["umount", str(mnt)])
        return
    tried.append("tmpfs")
    pytest.skip(f"cannot mount a small filesystem here ({' and '.join(tried)} failed; needs root)")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lts_core", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_full_disk_stops_training_and_keeps_every_record(small_fs, tmp_path):
    out = small_fs / "run"
    r = cli("train", "--epochs", "40", "--fp-epochs", "1", "--record-every", "1", "--out", str(out), "--quiet",
            "--device", "cpu", env={"SCRATCHOFF_DATA": str(tmp_path / "data")})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    m = re.fullmatch(rf"error: disk full at {re.escape(str(out))}/\S+, (\d+) records kept", lines[0])
    assert m, lines[0]
    kept = int(m.group(1))
    run = open_run(out)
    assert run.n_records == kept > 0
    np.testing.assert_array_equal(run.steps, np.arange(kept))
    assert run.levels().shape == (kept, run.n_weights) and run.dists().max() < 2
    assert run.status in ("failed", "interrupted")  # failed when the manifest still fit
    if run.status == "failed":
        assert run.reason == lines[0].removeprefix("error: ")
    assert len(run.metrics) * run.steps_per_epoch <= kept  # metrics never ahead of the records
    assert run.manifest.get("steps_taken", kept) <= kept + 1  # training stopped at the first failed write
    assert not temp_files(out)


def test_full_cache_folder_leaves_no_temp_file_and_no_torch_message(small_fs, tmp_path):
    data = small_fs / "data"
    (data / "cache" / "fp").mkdir(parents=True)
    filler = small_fs / "filler"
    with open(filler, "wb") as f:  # leave about 64 kB: less than the pre-trained model needs
        try:
            while True:
                f.write(bytes(64 << 10))
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - (64 << 10)))
    out = tmp_path / "runs" / "r"
    r = cli("train", "--epochs", "2", "--fp-epochs", "1", "--out", str(out), "--quiet", "--device", "cpu",
            env={"SCRATCHOFF_DATA": str(data)})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert re.fullmatch(rf"error: disk full at {re.escape(str(data))}/cache/fp/\S+\.pt, 0 records kept", lines[0])
    assert "torch" not in r.stderr.lower() and "Pytorch" not in r.stderr
    assert not temp_files(data) and not list((data / "cache" / "fp").iterdir())
    assert not out.exists()  # the run folder it had taken is given back: nothing was recorded


class _FailAfter:
    """os.pwrite that raises ENOSPC from its `n`-th call on (a disk filling up)."""

    def __init__(self, n: int):
        self.n, self.calls, self.real = n, 0, os.pwrite

    def __call__(self, fd, data, offset):
        self.calls += 1
        if self.calls >= self.n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data, offset)


@pytest.mark.parametrize("fail_at", [1, 7, 40])
def test_injected_enospc_in_the_trainer(tmp_path, monkeypatch, fail_at):
    from lts_core.config import make_config
    from lts_core.trainer import train
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path / "data"))
    cfg = make_config(epochs=20, fp_epochs=1, device="cpu", record_every=1, width=32)
    monkeypatch.setattr(os, "pwrite", _FailAfter(fail_at))
    with pytest.raises(StoreWriteError) as e:
        train(cfg, run_dir=tmp_path / "runs" / "r", progress=False)
    monkeypatch.undo()
    assert e.value.disk_full and str(e.value).startswith(f"disk full at {tmp_path / 'runs' / 'r' / 'traj'}")
    run = open_run(tmp_path / "runs" / "r")
    assert str(e.value).endswith(f", {run.n_records} records kept") and run.n_records == e.value.records_kept
    assert run.status == "failed" and run.reason == str(e.value)
    np.testing.assert_array_equal(run.steps, np.arange(run.n_records))
    assert run.manifest["steps_taken"] <= run.n_records + 1  # stopped at once
    assert not temp_files(tmp_path / "runs")


def test_injected_enospc_writing_metrics(tmp_path, monkeypatch):
    """The metrics file (an atomic rename) fails: its temp file is removed, the records stay."""
    from lts_core.config import make_config
    from lts_core.store import RunWriter
    from lts_core.trainer import train
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path / "data"))
    real = RunWriter.write_metrics
    calls = []

    def write_metrics(self, df):
        calls.append(1)
        if len(calls) == 3:  # half-written, then the disk is full
            def half(f):
                f.write(b"PAR1")
                raise OSError(errno.ENOSPC, "No space left on device")
            from lts_core import store
            return store._atomic_write(self.path / "metrics.parquet", half)
        return real(self, df)

    monkeypatch.setattr(RunWriter, "write_metrics", write_metrics)
    with pytest.raises(StoreWriteError, match=r"disk full at .*metrics\.parquet, \d+ records kept"):
        train(make_config(epochs=6, fp_epochs=1, device="cpu", width=32), run_dir=tmp_path / "r", progress=False)
    run = open_run(tmp_path / "r")
    assert len(run.metrics) == 2 and run.n_records >= 3 and run.status == "failed"
    assert not temp_files(tmp_path / "r")
