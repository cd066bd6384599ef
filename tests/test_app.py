"""The Streamlit app, headless (streamlit.testing.v1.AppTest): every page renders on real runs, controls move
the figures, broken/empty folders give clear messages, and the Train page starts and watches a short run."""
from __future__ import annotations

import re
import shutil
import time
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"
PAGES = ["runs", "settling", "sweep", "trajectories", "train", "compare", "learn"]
TIMEOUT = 120
if str(APP) not in sys.path:  # the pages import the app's own modules (common, jobs) this way too
    sys.path.insert(0, str(APP))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A small runs folder: baseline + LTS (digits MLP, 8 QAT epochs, 3 FP epochs) and one broken run."""
    base = tmp_path_factory.mktemp("app")
    runs, data = base / "runs", base / "data"
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHOFF_RUNS", str(runs))
    mp.setenv("SCRATCHOFF_DATA", str(data))
    mp.delenv("SCRATCHOFF_DEBUG", raising=False)
    from lts_core.config import make_config
    from lts_core.trainer import train

    setup = dict(model="mlp", dataset="digits", bits=2, epochs=8, fp_epochs=3, device="cpu", seed=0)
    train(make_config(**setup, rule="none"), runs / "base", progress=False)
    train(make_config(**setup, rule="lts", schedule="linear"), runs / "lts", progress=False)
    shutil.copytree(runs / "base", runs / "broken")
    (runs / "broken" / "manifest.json").unlink()
    yield runs
    mp.undo()


def page(name: str) -> AppTest:
    return AppTest.from_file(str(APP / "pages" / f"{name}.py"), default_timeout=TIMEOUT)


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; metrics: {[m.label for m in at.metric]}")


def number(text: str) -> float:
    return float(re.search(r"-?[\d,]*\.?\d+", text).group(0).replace(",", ""))


def no_problem(at: AppTest, allow_errors: bool = False) -> None:
    assert not at.exception, [e.value for e in at.exception]
    if not allow_errors:
        assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders(runs_dir, name):
    at = page(name).run()
    no_problem(at, allow_errors=(name == "runs"))


def test_entry_point_navigation(runs_dir):
    at = AppTest.from_file(str(APP / "scratchoff_app.py"), default_timeout=TIMEOUT).run()
    no_problem(at, allow_errors=True)  # the Runs page (default) reports the broken run
    assert any(t.value == "Runs" for t in at.title)
    at.switch_page("pages/sweep.py").run()
    no_problem(at)
    assert any("Threshold sweep" in t.value for t in at.title)


def test_runs_page_lists_broken_run_without_hiding_others(runs_dir):
    at = page("runs").run()
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "broken" in errors[0] and "manifest" in errors[0]
    table = at.dataframe[0].value
    assert set(table["run"]) == {"base", "lts", "broken"}
    assert metric(at, "Runs") == "3" and metric(at, "Broken") == "1"
    assert {b.label for b in at.download_button} == {"Metrics as CSV", "Metrics as Parquet"}


def test_empty_folder_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHOFF_RUNS", str(tmp_path / "nothing-here"))
    for name in ("runs", "sweep", "settling"):
        at = page(name).run()
        no_problem(at)
        info = " ".join(i.value for i in at.info)
        assert "python -m lts_core train" in info and "Train" in info


def test_sweep_threshold_slider_moves_updates_eliminated(runs_dir):
    at = page("sweep").run()
    no_problem(at)
    assert "base" in at.selectbox(key="sweep_run").value  # a baseline run is preferred
    at.selectbox(key="sw_schedule").set_value("fixed").run()
    at.slider(key="sw_ratio").set_value(0.05).run()
    low = number(metric(at, "Updates eliminated"))
    at.slider(key="sw_ratio").set_value(0.4).run()
    high = number(metric(at, "Updates eliminated"))
    no_problem(at)
    assert high > low
    # the real LTS run of the same setup is overlaid and compared weight by weight
    assert 0 <= number(metric(at, "Jaccard (frozen sets)")) <= 100
    assert any("record resolution" in i.value for i in at.info)


def test_settling_epoch_slider_reveals_cells(runs_dir):
    at = page("settling").run()
    no_problem(at)
    slider = at.select_slider[0]  # the epoch slider
    slider.set_value(0).run()
    first = number(metric(at, "Revealed cells"))
    at.select_slider[0].set_value(len(slider.options) - 1).run()
    last = number(metric(at, "Revealed cells"))
    no_problem(at)
    assert last > first


def test_trajectories_selection_modes(runs_dir):
    at = page("trajectories").run()
    for mode in ("most oscillating", "latest settling"):
        at.radio(key="traj_mode").set_value(mode).run()
        no_problem(at)
    at.radio(key="traj_mode").set_value("by index").run()
    at.text_input(key="traj_idx").input("1, 2, 99999999").run()
    assert any("outside the layer" in e.value for e in at.error)
    assert not at.exception


def test_train_invalid_input_shows_error(runs_dir):
    at = page("train").run()
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_warmup").set_value(5.0)
    at.button[0].click().run()  # the form's submit button
    no_problem(at, allow_errors=True)
    assert any("warm-up" in e.value for e in at.error)
    assert "train_job" not in at.session_state


def test_train_short_run_end_to_end(runs_dir):
    at = page("train").run()
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_fp_epochs").set_value(1)
    at.text_input(key="tr_name").input("app-short")
    at.button[0].click().run()
    no_problem(at)
    job_id = at.session_state["train_job"]
    import jobs
    job = jobs.registry()[job_id]
    assert job.proc.wait(timeout=TIMEOUT) == 0, jobs.log_tail(job)
    at.run()
    no_problem(at)
    assert any("complete" in s.value for s in at.success)
    runs = page("runs").run()
    assert "app-short" in set(runs.dataframe[0].value["run"])


def test_failed_training_shows_its_reason(runs_dir):
    at = page("train").run()
    at.selectbox(key="tr_dataset").set_value("mnist")  # needs files that the test data folder does not have
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_fp_epochs").set_value(1)
    at.button[0].click().run()
    import jobs
    job = jobs.registry()[at.session_state["train_job"]]
    assert job.proc.wait(timeout=TIMEOUT) != 0
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("Training failed: mnist") for e in errors), errors
    assert not any("Traceback" in e for e in errors)


def test_stop_button_leaves_an_interrupted_run(runs_dir):
    at = page("train").run()
    at.number_input(key="tr_epochs").set_value(500)
    at.number_input(key="tr_fp_epochs").set_value(1)
    at.text_input(key="tr_name").input("app-stopped")
    at.button[0].click().run()
    import jobs
    job = jobs.registry()[at.session_state["train_job"]]
    deadline = time.time() + TIMEOUT
    while not (job.out / "metrics.parquet").exists() and job.running and time.time() < deadline:
        time.sleep(0.2)  # wait until QAT has started and logged an epoch
    at.run()
    at.button(key=f"stop_{job.id}").click().run()
    assert job.proc.wait(timeout=TIMEOUT) != 0
    at.run()
    no_problem(at)
    assert any("interrupted" in w.value for w in at.warning)
    from lts_core.store import open_run
    assert open_run(job.out).status == "interrupted"


def test_learn_threshold_changes_when_the_toy_weight_freezes():
    at = page("learn").run()
    no_problem(at)

    def freeze_message():
        texts = [m.value for m in (*at.success, *at.warning, *at.info) if "step" in m.value or "never" in m.value]
        assert texts, "the EMA step shows a verdict"
        return texts[-1]

    at.slider(key="learn_ratio_fixed").set_value(0.0).run()
    never = freeze_message()
    at.slider(key="learn_ratio_fixed").set_value(0.5).run()
    early = freeze_message()
    no_problem(at)
    assert "never freezes" in never and re.search(r"Frozen at step \d+", early)


def test_compare_selection_changes_the_table(runs_dir):
    at = page("compare").run()
    no_problem(at)
    assert len(at.multiselect(key="cmp_runs").value) == 2
    assert at.dataframe[0].value.shape[0] == 2
    at.multiselect(key="cmp_runs").set_value([at.multiselect(key="cmp_runs").value[0]]).run()
    assert any("at least two" in i.value for i in at.info)


def test_runs_page_picker_changes_the_figures(runs_dir):
    at = page("runs").run()
    no_problem(at, allow_errors=True)  # the broken run is reported with st.error
    shown = {}
    for name in ("base", "lts"):
        picker = at.selectbox(key="runs_run")
        option = next(o for o in picker.options if str(o).split()[0] == name)
        picker.set_value(option).run()
        shown[name] = number(metric(at, "Updates eliminated"))
    assert shown["base"] == 0.0 and shown["lts"] > 20  # the baseline eliminates nothing, the LTS run does
