"""Engine + recorder + store + replay together, on real (small) training runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lts_core.analysis.replay import ReplayIndex, agreement, replay_freeze_steps
from lts_core.config import make_config
from lts_core.store import list_runs, open_run
from lts_core.trainer import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    old = os.environ.get("SCRATCHOFF_DATA")
    os.environ["SCRATCHOFF_DATA"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SCRATCHOFF_DATA")
    else:
        os.environ["SCRATCHOFF_DATA"] = old


BASE = dict(model="mlp", dataset="digits", width=64, bits=2, epochs=8, fp_epochs=5, device="cpu",
            warmup_epochs=2, record_every=1)


@pytest.mark.parametrize("schedule,ratio", [("linear", 1.0), ("fixed", 0.125), ("sine", 0.75)])
def test_self_replay_of_a_recorded_lts_run_is_exact(data_env, tmp_path, schedule, ratio):
    run_dir = tmp_path / f"lts-{schedule}"
    res = train(make_config(**BASE, rule="lts", schedule=schedule, threshold=ratio), run_dir=run_dir, progress=False)
    run = open_run(run_dir)
    assert run.status == "complete" and run.n_records == run.manifest["total_steps"]
    actual = run.freeze_steps()
    assert (actual >= 0).mean() > 0.05
    s = run.manifest["rule"]["settings"]
    # recorded every step, the run kept the rule's exact raw distances: its replay is the rule, bit for bit
    assert run.has_raw_dists
    replayed = replay_freeze_steps(run, schedule=schedule, ratio=ratio, decay=s["decay"])
    np.testing.assert_array_equal(replayed, actual)
    # from the uint8 codes alone (1/128 Δ) most, not all, freeze steps come out the same
    coarse = replay_freeze_steps(run.steps, run.levels(), run.dist_codes(), schedule=schedule, ratio=ratio,
                                 warmup_steps=s["warmup_steps"], total_steps=s["total_steps"], decay=s["decay"],
                                 layer_sizes=[la["numel"] for la in run.layers],
                                 layer_n_levels=[la["n_levels"] for la in run.layers])
    assert 0.5 < agreement(coarse, actual)["exact_match"] <= 1.0
    # the indexed replay reports the live rule's whole-run figures, both denominators (ratio on the grid)
    idx = ReplayIndex.build(run, schedule=schedule, warmup_steps=s["warmup_steps"], decay=s["decay"])
    q = idx.query(ratio)
    assert q.updates_eliminated == pytest.approx(res.metrics[-1]["updates_eliminated"], abs=1e-9)
    assert q.updates_eliminated_all_params == pytest.approx(res.metrics[-1]["updates_eliminated_all_params"],
                                                            abs=1e-9)
    assert q.backward_flops_saved == pytest.approx(res.metrics[-1]["backward_flops_saved"], abs=1e-9)


def test_replay_of_baseline_predicts_actual_lts_run(data_env, tmp_path):
    """The replay ignores the feedback of freezing on training; agreement is measured, not assumed."""
    base = train(make_config(**BASE, rule="none"), run_dir=tmp_path / "base", progress=False)
    lts = train(make_config(**BASE, rule="lts", schedule="linear"), run_dir=tmp_path / "lts", progress=False)
    b, a = open_run(tmp_path / "base"), open_run(tmp_path / "lts")
    s = a.manifest["rule"]["settings"]
    pred = replay_freeze_steps(b, schedule="linear", ratio=1.0, warmup_steps=s["warmup_steps"], decay=s["decay"])
    ag = agreement(pred, a.freeze_steps())
    # identical until the warm-up ends, so the frozen sets overlap strongly
    assert ag["jaccard"] > 0.5 and ag["precision"] > 0.5 and ag["recall"] > 0.5
    assert base.metrics[0]["train_loss"] == lts.metrics[0]["train_loss"]


def test_sigint_mid_epoch_leaves_readable_interrupted_run(data_env, tmp_path):
    out = tmp_path / "runs" / "stopped"
    env = {**os.environ, "SCRATCHOFF_DATA": str(data_env)}
    proc = subprocess.Popen([sys.executable, "-m", "lts_core", "train", "--epochs", "400", "--fp-epochs", "2",
                             "--record-every", "1", "--out", str(out), "--quiet", "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.parquet"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert metrics.exists(), proc.stderr.read() if proc.poll() is not None else "no epoch finished in time"
    time.sleep(0.3)  # land somewhere inside a later epoch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    run = open_run(out)
    assert run.status == "interrupted" and "interrupted" in run.reason
    assert run.n_records >= 1 and run.levels().shape == (run.n_records, run.n_weights)
    assert np.all(np.diff(run.steps) == 1)  # every step recorded up to the last one
    assert len(run.metrics) >= 1
    entry = [e for e in list_runs(out.parent) if e.run_id == "stopped"][0]
    assert entry.ok and entry.status == "interrupted"


def test_per_weight_summaries_match_the_analysis(data_env, tmp_path):
    from lts_core.analysis.settle import final_levels, flips, settle_records
    train(make_config(**{**BASE, "record_every": 3}, rule="none"), run_dir=tmp_path / "r", progress=False)
    run = open_run(tmp_path / "r")
    levels = run.levels()
    assert set(run.summaries) >= {"final_level", "settle_record", "flips"}
    np.testing.assert_array_equal(run.summary("final_level"), final_levels(levels))
    np.testing.assert_array_equal(run.summary("settle_record"), settle_records(levels))
    np.testing.assert_array_equal(run.summary("flips"), flips(levels))
    assert run.summary("flips").sum() > 0
