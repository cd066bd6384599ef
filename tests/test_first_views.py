"""What makes the app's first views light: the Distributions page's counts kept in the run's cache (equal to a
fresh pass, reused, recounted when the run changes, written by the recorder at finish), the Vega-Lite chart
builder (stacked bars, heat-map cells, tick labels, one legend) and the toggle in front of weight-by-weight
replays of big runs on the Sweep page."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lts_core import Recorder, quantize_model
from lts_core.analysis import cached_record_distributions, first_view_distributions, record_distributions
from lts_core.analysis import summaries
from lts_core.store import open_run
from test_distributions import synthetic

APP = Path(__file__).resolve().parent.parent / "app"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

FIELDS = ("steps", "dist", "ema", "thresholds", "occupancy", "positions", "bounds", "frozen_by", "newly_frozen",
          "n_weights", "ema_source", "pos_first", "pos_res", "signed", "n_levels", "kind", "bits")


def assert_same(a, b) -> None:
    for k in FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        if isinstance(y, np.ndarray):
            np.testing.assert_array_equal(np.asarray(x), y, err_msg=k)
        else:
            assert x == y, (k, x, y)


def no_pass(*args, **kwargs):
    raise AssertionError("counted again instead of read from the cache")


@pytest.mark.parametrize("how", ["freeze_steps", "replay"])
def test_cached_distributions_equal_a_pass_and_are_read_back(tmp_path, monkeypatch, how):
    run, _, fs = synthetic(tmp_path)
    kw = ({"freeze_steps": fs[:30]} if how == "freeze_steps" else
          {"replay": {"schedule": "linear", "ratio": 0.5, "warmup_steps": 10, "decay": 0.9}})
    first = cached_record_distributions(run, 0, **kw)
    assert_same(first, record_distributions(run, 0, **kw))
    assert any(p.name.startswith("dist-") for p in (tmp_path / "syn" / "cache").iterdir())
    with monkeypatch.context() as m:
        m.setattr("lts_core.analysis.distributions.record_distributions", no_pass)
        again = cached_record_distributions(open_run(tmp_path / "syn"), 0, **kw)
    assert_same(again, first)
    # other freezing or another layer is another item, never the cached one
    other = {"freeze_steps": np.where(fs[:30] >= 0, -1, 3)} if how == "freeze_steps" else \
        {"replay": {**kw["replay"], "ratio": 0.25}}
    assert_same(cached_record_distributions(run, 0, **other), record_distributions(run, 0, **other))


def test_cached_distributions_are_recounted_when_the_run_changes(tmp_path, monkeypatch):
    import json
    run, _, fs = synthetic(tmp_path)
    path = tmp_path / "syn" / "manifest.json"
    whole = path.read_text()
    shorter = json.loads(whole)
    shorter["chunks"] = shorter["chunks"][:2]              # the run as it was two chunks in
    path.write_text(json.dumps(shorter))
    early = cached_record_distributions(open_run(tmp_path / "syn"), 1, freeze_steps=fs[30:])
    assert early.n_records == 8
    path.write_text(whole)                                  # it recorded one chunk more
    grown = open_run(tmp_path / "syn")
    d = cached_record_distributions(grown, 1, freeze_steps=fs[30:])
    assert d.n_records == 11
    assert_same(d, record_distributions(grown, 1, freeze_steps=fs[30:]))


def test_recorder_keeps_the_first_distributions_view_at_finish(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                           bits=2, first_last_bits=None, example_input=x[:2])
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "weight_quantizer")]
    rec = Recorder.create(tmp_path, model, {"rule": "none"}, every=1, steps_per_epoch=2, total_steps=4,
                          run_id="fin", layers=layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        rec.step()
        opt.step()
    rec.finish()
    run = open_run(tmp_path / "fin")
    with monkeypatch.context() as m:
        m.setattr("lts_core.analysis.distributions.record_distributions", no_pass)
        kept = first_view_distributions(run)
    want = record_distributions(run, 0, replay={**summaries.run_settings(run), "ratio": 1.0})
    assert_same(kept, want)
    assert kept.n_records == 4 and kept.n_weights == 8 * 16


# ---- the Vega-Lite chart builder -----------------------------------------------------------------------------
def layer_data(spec: dict, i: int):
    return spec["datasets"][spec["layer"][i]["data"]["name"]]


def test_bars_stack_in_the_order_given_and_keep_counts():
    from charts import Chart
    x = np.array([0.0, 1.0, 2.0])
    spec = Chart("t", "x", "y").bars(x, {"a": ([1.0, 2.0, np.nan], "#111111", [10, 20, 30]),
                                         "b": ([3.0, 0.0, 5.0], "#222222")}, width=0.5).spec()
    df = layer_data(spec, 0)
    a, b = df[df.series == "a"], df[df.series == "b"]
    assert list(a.y0) == [0, 0] and list(a.y1) == [1, 2] and list(a.n) == [10, 20]   # the NaN bar is left out
    assert list(b.y0) == [1, 2, 0] and list(b.y1) == [4, 2, 5]                     # on top of a's bars
    assert list(a.x0) == [-0.25, 0.75] and list(a.x1) == [0.25, 1.25]
    color = spec["layer"][0]["encoding"]["color"]["scale"]
    assert color == {"domain": ["a", "b"], "range": ["#111111", "#222222"]}
    unstacked = layer_data(Chart().bars(x, {"a": ([1, 1, 1], "#1"), "b": ([2, 2, 2], "#2")}, 1, stack=False)
                           .spec(), 0)
    assert set(unstacked.y0) == {0}


def test_heatmap_cells_ticks_and_rules():
    from charts import Chart, edges_from_centers
    z = np.arange(6.0).reshape(2, 3)
    c = Chart("h", "epoch", "ρ", y_ticks={0.0: "0", 0.75: "> ½"})
    spec = c.heatmap(edges_from_centers([0, 1, 3]), np.array([[0, 0.5], [0.7, 0.8]]), z, "%", x_values=[0, 1, 3]
                     ).hline(0.25).spec()
    df = layer_data(spec, 0)
    assert len(df) == 6 and list(df.z) == list(z.ravel())
    np.testing.assert_allclose(df.x[:3], [0, 1, 3])                                  # hover: the column's x
    np.testing.assert_allclose((df.x0 + df.x1)[:3] / 2, [0, 1.25, 3])              # cells between the edges
    np.testing.assert_allclose(df.y[3:], 0.75)                                       # a row set apart
    axis = spec["layer"][0]["encoding"]["y"]["axis"]
    assert axis["values"] == [0.0, 0.75] and "'> ½'" in axis["labelExpr"]
    rule = spec["layer"][1]
    assert rule["mark"]["type"] == "rule" and "x" not in rule["encoding"]
    np.testing.assert_array_equal(edges_from_centers([0, 1, 3]), [-0.5, 0.5, 2, 4])


def test_heatmap_draws_a_run_of_equal_cells_as_one():
    """Plateaus (0 % in a warm-up, 100 % once every weight froze) are one cell each, spanning their columns,
    and hovering one says where it starts and ends; cells of other values, NaNs and other rows are kept."""
    from charts import Chart
    nan = np.nan
    z = np.array([[0, 0, 0, 5, 100, 100],
                  [0, 0, 7, 7, nan, nan]])
    spec = Chart("h", "epoch", "ρ").heatmap(np.arange(7.0), np.array([0.0, 1.0, 2.0]), z, "%").spec()
    df = layer_data(spec, 0)
    got = [(r.y, r.x0 + 0.01, r.x1 - 0.01, r.z) for r in df.itertuples()]   # 1 % overlap at each end
    want = [(0.5, 0, 3, 0), (0.5, 3, 4, 5), (0.5, 4, 6, 100),
            (1.5, 0, 2, 0), (1.5, 2, 4, 7), (1.5, 4, 6, nan)]
    np.testing.assert_allclose(np.array(got, dtype=float), np.array(want, dtype=float))
    assert list(df.x) == [0.5, 3.5, 4.5, 0.5, 2.5, 4.5] and list(df.x_to) == [2.5, 3.5, 5.5, 1.5, 3.5, 5.5]
    assert [t["field"] for t in spec["layer"][0]["encoding"]["tooltip"]] == ["x", "x_to", "y", "z"]
    # the same values in columns set apart by a gap are not joined across the gap
    apart = np.array([[0.0, 1.0], [1.0, 1.9], [2.1, 3.0]])   # the first two touch, the third stands apart
    df = layer_data(Chart().heatmap(apart, np.array([0.0, 1.0]), np.array([[1.0, 1.0, 1.0]]), "%").spec(), 0)
    assert len(df) == 2 and list(df.x_to) == [1.45, 2.55]


# ---- the Sweep page does not replay a big run weight by weight before the reader asks ---------------------------
@pytest.fixture
def example_runs(tmp_path, monkeypatch):
    import shutil
    for src in sorted((APP.parent / "data" / "runs").glob("example-*")):
        shutil.copytree(src, tmp_path / "runs" / src.name)
    monkeypatch.setenv("SCRATCHOFF_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path / "data"))
    return tmp_path / "runs"


def test_sweep_asks_before_replaying_a_big_run_weight_by_weight(example_runs, monkeypatch):
    from test_app import metric, no_problem, page
    import common as C
    monkeypatch.setattr(C, "WEIGHT_RECORDS_AT_ONCE", 100)     # the example runs count as big
    at = page("sweep").run()
    no_problem(at)
    assert "Skippable (predicted)" not in [m.label for m in at.metric]
    assert metric(at, "Updates eliminated, of quantized weights")   # the replay index's figures are there
    at.toggle(key="sweep_structural_go").set_value(True).run()
    no_problem(at)
    assert metric(at, "Skippable (predicted)")
    monkeypatch.setattr(C, "WEIGHT_RECORDS_AT_ONCE", 10 ** 12)
    assert "Skippable (predicted)" in [m.label for m in page("sweep").run().metric]


def test_the_warm_up_waits_for_a_quiet_server(monkeypatch):
    """The background imports hold the GIL, so they wait until no page has run for a while: never sooner."""
    import time

    import common as C

    C.mark_script_activity()
    t0 = time.monotonic()
    C.wait_for_quiet_server(quiet_seconds=0.3, poll_seconds=0.05)
    assert time.monotonic() - t0 >= 0.3 - 0.01
    C._LAST_SCRIPT_ACTIVITY[0] = time.monotonic() - 10.0   # the last page ran 10 s ago
    monkeypatch.setattr(C.time, "sleep", lambda s: pytest.fail("slept although the server was quiet"))
    C.wait_for_quiet_server(quiet_seconds=0.3, poll_seconds=0.05)
