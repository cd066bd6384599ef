"""The app's savings figures (issue 10): accounted vs structural vs measured for every run on Runs and Compare
('—' for runs that did not record them), the Sweep page's predicted structural share, the Train page's
granularity and bound-grad switches, and the Learn page's explanation. Headless (AppTest), on real runs."""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")
from test_app import metric, no_problem, page, vega_chart  # noqa: E402  (the page helpers of the app's tests)
from lts_core.channels import DEFAULT_CHANNEL_QUANTILE  # noqa: E402

SAVINGS_COLUMNS = ["bwd accounted (%)", "bwd skippable (%)", "bwd s", "step s"]
NEW_METRICS = ["backward_flops_skippable", "step_seconds", "backward_seconds"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A baseline, a channel-LTS run with active bounds (digits MLP, 8 QAT epochs) and an 'old' run: the
    baseline's folder with the issue-10 metrics columns removed, as runs recorded before them are."""
    base = tmp_path_factory.mktemp("savings_app")
    folder = base / "runs"
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHOFF_RUNS", str(folder))
    mp.setenv("SCRATCHOFF_DATA", str(base / "data"))
    mp.delenv("SCRATCHOFF_DEBUG", raising=False)
    from lts_core.config import make_config
    from lts_core.trainer import train
    setup = dict(model="mlp", dataset="digits", bits=2, epochs=8, fp_epochs=3, device="cpu", seed=0)
    train(make_config(**setup, rule="none"), folder / "base", progress=False)
    train(make_config(**setup, rule="lts", schedule="fixed", threshold=0.3, decay=0.95, warmup_epochs=2.0,
                      granularity="channel", bound_grad="active"), folder / "chan", progress=False)
    shutil.copytree(folder / "base", folder / "old")
    mpath = folder / "old" / "metrics.parquet"
    pd.read_parquet(mpath).drop(columns=NEW_METRICS).to_parquet(mpath)
    import common as C
    C.refresh_runs()
    yield folder
    mp.undo()


def stored(folder: Path, name: str) -> pd.DataFrame:
    from lts_core import open_run
    return open_run(folder / name).metrics


def test_runs_table_shows_the_three_figures_and_a_dash_where_missing(runs):
    at = page("runs").run()
    no_problem(at)
    table = at.dataframe[0]
    df = table.value.set_index("run")
    for col in SAVINGS_COLUMNS:
        assert col in df.columns, col
    chan = stored(runs, "chan")
    assert df.loc["chan", "bwd skippable (%)"] == pytest.approx(100 * chan["backward_flops_skippable"].iloc[-1])
    assert df.loc["chan", "bwd accounted (%)"] == pytest.approx(
        100 * chan["backward_flops_saved"].iloc[-1])
    assert df.loc["chan", "bwd skippable (%)"] > 0    # channels froze, so some backward is skippable
    assert df.loc["chan", "bwd s"] == pytest.approx(chan["backward_seconds"].sum())
    assert df.loc["chan", "step s"] == pytest.approx(chan["step_seconds"].sum())
    assert 0 < df.loc["chan", "bwd s"] < df.loc["chan", "step s"]   # the backward is part of the step
    assert df.loc["base", "bwd skippable (%)"] == 0
    for col in ("bwd skippable (%)", "bwd s", "step s"):
        assert pd.isna(df.loc["old", col]), col
    assert table.proto.placeholder == "—"       # what the reader sees for a missing value


def test_runs_one_run_metrics_and_time_curve(runs):
    at = page("runs").run()
    at.selectbox(key="run").set_value("chan").run()
    no_problem(at)
    chan = stored(runs, "chan")
    assert metric(at, "Backward seconds (measured)") == f"{chan['backward_seconds'].sum():,.1f} s"
    assert metric(at, "Step seconds (measured)") == f"{chan['step_seconds'].sum():,.1f} s"
    assert metric(at, "Structurally skippable") == f"{100 * chan['backward_flops_skippable'].iloc[-1]:.1f}%"
    assert metric(at, "LTS freezes") == "whole output channels"
    assert metric(at, "Bounds learn from") == "unfrozen weights"
    time_chart = vega_chart(at, "Measured time per epoch")
    drawn = pd.concat(time_chart["datasets"].values())
    assert np.allclose(drawn[drawn.series == "backward passes"].y, chan["backward_seconds"])
    at.selectbox(key="run").set_value("old").run()
    no_problem(at)
    assert metric(at, "Backward seconds (measured)") == "—" and metric(at, "Structurally skippable") == "—"
    assert any("did not record its step and backward seconds" in c.value for c in at.caption)


def test_compare_shows_measured_time_per_run(runs):
    at = page("compare").run()
    at.multiselect(key="cmp").set_value(["base", "chan", "old"]).run()
    no_problem(at)
    df = at.dataframe[0].value.set_index("run")
    base, chan = stored(runs, "base"), stored(runs, "chan")
    assert df.loc["chan", "backward ÷ first run"] == pytest.approx(
        chan["backward_seconds"].sum() / base["backward_seconds"].sum())
    assert df.loc["chan", "step ÷ first run"] == pytest.approx(chan["step_seconds"].sum() / base["step_seconds"].sum())
    assert df.loc["base", "step ÷ first run"] == pytest.approx(1.0)
    assert pd.isna(df.loc["old", "bwd s"]) and pd.isna(df.loc["old", "step ÷ first run"])
    assert at.dataframe[0].proto.placeholder == "—"
    figs = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
            for c in at.get("plotly_chart")}
    bwd = figs["Measured backward seconds per epoch"]
    assert [t["name"] for t in bwd["data"]] == ["base", "chan"]   # the old run has no seconds to draw
    y = bwd["data"][1]["y"]   # plotly sends float arrays base64-encoded
    y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"]) if isinstance(y, dict) else np.asarray(y)
    assert np.allclose(y, chan["backward_seconds"])


def test_sweep_predicts_the_structural_share(runs):
    """Replaying on the baseline with the channel run overlaid: channel granularity with the run's quantile by
    default; a channel replay's structural share equals its accounted share (every frozen weight lies in a
    frozen channel) and equals the index's structural table; per weight it is at most the accounted share."""
    at = page("sweep").run()
    at.selectbox(key="run").set_value("base").run()
    at.selectbox(key="actual").set_value("chan").run()
    no_problem(at)
    assert at.selectbox(key="sweep_granularity").value == "channel"
    # the overlaid run's own quantile (it trained with the default)
    assert at.number_input(key="sweep_channel_quantile").value == DEFAULT_CHANNEL_QUANTILE
    acc, skip = metric(at, "Accounted"), metric(at, "Skippable (predicted)")
    assert acc == skip and float(skip.rstrip("%")) > 0
    # independent path: the in-memory index with its structural table, at the same grid threshold
    from lts_core import open_run
    from lts_core.analysis import ReplayIndex, arrays_from_run
    import common as C
    s = C.ReplaySettings(at.selectbox(key="schedule").value, at.number_input(key="rho").value,
                         at.number_input(key="warmup").value, at.select_slider(key="decay").value)
    run = open_run(runs / "base")
    arr = arrays_from_run(run)
    W = int(round(s.warmup_epochs * run.manifest["steps_per_epoch"]))
    for gran in ("channel", "weight"):
        idx = ReplayIndex.build(arr, schedule=s.schedule, warmup_steps=W, decay=s.decay, granularity=gran,
                                structural=True, device="cpu")
        q = idx.query(s.ratio)
        if gran == "weight":
            at.selectbox(key="sweep_granularity").set_value("weight").run()
            no_problem(at)
        assert metric(at, "Skippable (predicted)") == f"{100 * q.backward_flops_skippable:.1f}%"
        assert metric(at, "Accounted") == f"{100 * q.backward_flops_saved:.1f}%"
    assert float(metric(at, "Skippable (predicted)").rstrip("%")) <= float(
        metric(at, "Accounted").rstrip("%"))


def test_train_offers_granularity_and_bound_grad(runs):
    at = page("train").run()
    no_problem(at)
    assert "--granularity" not in at.code[0].value and "--bound-grad" not in at.code[0].value
    at.selectbox(key="tr_granularity").set_value("channel").run()
    at.selectbox(key="tr_bound_grad").set_value("active").run()
    cmd = at.code[0].value
    assert "--granularity channel" in cmd and "--bound-grad active" in cmd
    assert "--channel-quantile" not in cmd   # the default is not repeated
    at.number_input(key="tr_channel_quantile").set_value(0.75).run()
    assert "--channel-quantile 0.75" in at.code[0].value
    at.selectbox(key="tr_rule").set_value("none").run()
    no_problem(at)
    assert not any(w.key == "tr_granularity" for w in at.selectbox)   # baseline QAT freezes nothing
    assert "--granularity" not in at.code[0].value
    # the command line is what the CLI accepts
    from typer.testing import CliRunner
    from lts_core.cli import app as cli
    r = CliRunner().invoke(cli, ["train", "--help"])
    for opt in ("--granularity", "--channel-quantile", "--bound-grad"):
        assert opt in r.output


def test_learn_explains_accounted_structural_measured():
    at = page("learn").run()
    at.slider(key="learn_save_f").set_value(0.5).run()
    no_problem(at)
    # per weight: half of dW accounted, a 24-weight channel is almost never complete at 50% per weight
    assert metric(at, "Accounted") == "25%"
    assert metric(at, "Structurally skippable") == "0%" and metric(at, "Skipped in time (at best)") == "0%"
    assert any("practically does not happen" in i.value for i in at.info)
    at.radio(key="learn_save_gran").set_value("channel").run()
    assert metric(at, "Accounted") == "25%" and metric(at, "Structurally skippable") == "25%"
    assert metric(at, "Skipped in time (at best)") == "0%"          # bounds learn from all weights
    assert any("no time is saved" in w.value for w in at.warning)
    at.radio(key="learn_save_bounds").set_value("active").run()
    assert metric(at, "Skipped in time (at best)") == "25%"
    no_problem(at)
