"""Issue 13, item 1: a process killed with SIGKILL at a random moment loses at most the record it was
writing, its metrics never list an epoch whose records are missing, and the reader says how far it got."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lts_core.store import list_runs, open_run

ROOT = Path(__file__).resolve().parent.parent
LOOP = Path(__file__).with_name("record_loop.py")


def _kill_at_random(cmd, delay: float, env=None, ready=None):
    """Start `cmd`, SIGKILL it `delay` seconds after its first stdout line (and after `ready()` is true);
    return the stdout lines read before the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    lines: list[str] = []
    first = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            first.set()
        first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(120), "the child printed nothing"
    deadline = time.time() + 120
    while ready is not None and not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    seen = list(lines)  # what the child had said before the kill (it may have gone further since)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    return seen


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 32 << 20])  # chunks sealed during the run / one open chunk
def test_sigkill_loses_at_most_the_record_being_written(tmp_path, chunk_bytes):
    rng = np.random.default_rng(chunk_bytes)
    epoch_steps = 7
    for i, delay in enumerate(rng.uniform(0.0, 1.5, 3)):
        run_id = f"killed-{i}"
        seen = _kill_at_random([sys.executable, str(LOOP), str(tmp_path), run_id, "100000", str(chunk_bytes),
                                str(epoch_steps)], float(delay))
        taken, epochs = (int(w) for w in seen[-1].split()[1::2])
        run = open_run(tmp_path / run_id)
        assert run.status == "interrupted"
        n = run.n_records
        assert n >= taken - 1, f"only {n} records on disk after the child said it had taken {taken}"
        np.testing.assert_array_equal(run.steps, np.arange(n))  # a contiguous prefix: nothing half-read
        levels, codes = run.levels(), run.dist_codes()
        assert levels.shape == codes.shape == (n, run.n_weights) and levels.max() <= 3
        assert np.array_equal(run.state("ema").shape, (n, run.n_weights))
        m = run.metrics
        assert len(m) >= epochs and len(m) * epoch_steps <= n  # metrics never ahead of the records
        p = run.progress
        assert p.records == n and p.last_step == n - 1 and p.epochs_logged == len(m)
        assert f"{n} records" in str(p) and f"step {n - 1} of 100000" in str(p)
        if chunk_bytes == 1 << 20 and n > 200:
            assert len(run.manifest["chunks"]) >= 1  # sealed chunks and the open one read together


def test_sigkill_during_cli_training_keeps_metrics_behind_records(tmp_path):
    """The real trainer, killed at random moments (during pre-training too): whatever is left opens, its
    metrics cover no more epochs than its records, and `runs` shows how far it got."""
    env = {"SCRATCHOFF_DATA": str(tmp_path / "data")}
    rng = np.random.default_rng(13)
    killed = []
    for i, delay in enumerate(rng.uniform(0.0, 2.0, 4)):
        out = tmp_path / "runs" / f"cli-{i}"
        ready = None if i == 0 else (out / "manifest.json").exists  # the first one dies during start-up
        cmd = [sys.executable, "-u", "-c",
               "import sys; print('started', flush=True); from lts_core.cli import main; sys.argv[0]='x'; main()",
               "train", "--epochs", "200", "--fp-epochs", "3", "--record-every", "2", "--out", str(out),
               "--quiet", "--device", "cpu"]
        _kill_at_random(cmd, float(delay), env, ready)
        if not (out / "manifest.json").exists():
            continue  # killed before QAT started: no run (the folder may be there, empty)
        killed.append(out)
        run = open_run(out)
        assert run.status == "interrupted" and run.reason == "process ended without closing the run"
        spe = run.steps_per_epoch
        if len(run.metrics):
            last_epoch_step = int(run.metrics["epoch"].iloc[-1]) * spe - 1
            assert run.n_records and run.steps[-1] >= last_epoch_step - 1  # records every 2 steps
        np.testing.assert_array_equal(run.steps, np.arange(run.n_records) * 2)
    assert len(killed) >= 3
    r = subprocess.run([sys.executable, "-m", "lts_core", "runs", "--folder", str(tmp_path / "runs")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    for out in killed:
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(out.name + " "))
        assert "interrupted" in line and "records" in line and "epochs of metrics" in line
    assert all(e.ok for e in list_runs(tmp_path / "runs"))
