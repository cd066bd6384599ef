"""The Streamlit app, headless (streamlit.testing.v1.AppTest): every page renders on real runs, controls move
the figures, URLs carry the view, broken/empty/hostile folders give clear messages, the Train page starts,
limits and watches short runs, and the server binds localhost however it is started."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"
PAGES = ["runs", "settling", "distributions", "sweep", "trajectories", "train", "compare", "learn"]
TIMEOUT = 120
if str(APP) not in sys.path:  # the pages import the app's own modules (common, jobs) this way too
    sys.path.insert(0, str(APP))
LTS_SETTINGS = dict(schedule="fixed", threshold=0.3, decay=0.95, warmup_epochs=2.0)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A small runs folder: baseline + LTS (digits MLP, 8 QAT epochs, 3 FP epochs) and one broken run."""
    base = tmp_path_factory.mktemp("app")
    runs, data = base / "runs", base / "data"
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHOFF_RUNS", str(runs))
    mp.setenv("SCRATCHOFF_DATA", str(data))
    mp.delenv("SCRATCHOFF_DEBUG", raising=False)
    mp.delenv("SCRATCHOFF_MAX_JOBS", raising=False)
    from lts_core.config import make_config
    from lts_core.trainer import train

    setup = dict(model="mlp", dataset="digits", bits=2, epochs=8, fp_epochs=3, device="cpu", seed=0)
    train(make_config(**setup, rule="none"), runs / "base", progress=False)
    train(make_config(**setup, rule="lts", **LTS_SETTINGS), runs / "lts", progress=False)
    shutil.copytree(runs / "base", runs / "broken")
    (runs / "broken" / "manifest.json").unlink()
    yield runs
    mp.undo()


@pytest.fixture
def served_config():
    """What app/.streamlit/config.toml gives a real server (AppTest reads no config file); defaults after."""
    from streamlit import config
    config.set_option("browser.gatherUsageStats", False, "app/.streamlit/config.toml")
    config.set_option("server.address", "localhost", "app/.streamlit/config.toml")
    yield
    config.set_option("browser.gatherUsageStats", True, config.ConfigOption.DEFAULT_DEFINITION)
    config.set_option("server.address", None, config.ConfigOption.DEFAULT_DEFINITION)


def page(name: str) -> AppTest:
    return AppTest.from_file(str(APP / "app_pages" / f"{name}.py"), default_timeout=TIMEOUT)


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; metrics: {[m.label for m in at.metric]}")


def number(text: str) -> float:
    return float(re.search(r"-?[\d,]*\.?\d+", text).group(0).replace(",", ""))


def shown(element) -> str:
    """An element's text as the reader sees it (the app backslash-escapes names read from disk)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", element.value)


def no_problem(at: AppTest, allow_errors: bool = False) -> None:
    assert not at.exception, [e.value for e in at.exception]
    if not allow_errors:
        assert not at.error, [e.value for e in at.error]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def vega_charts(at: AppTest) -> list[dict]:
    """The page's Vega-Lite specs, each with its data frames back under "datasets" (sent as Arrow)."""
    import pyarrow as pa
    out = []
    for c in at.get("vega_lite_chart"):
        spec = json.loads(c.proto.spec)
        spec["datasets"] = {d.name: pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in c.proto.datasets}
        out.append(spec)
    return out


def chart_titles(at: AppTest) -> list[str]:
    """Titles of every chart of the page, Plotly and Vega-Lite."""
    return ([c["layout"].get("title", {}).get("text", "") for c in charts(at)]
            + [(c.get("title") or {}).get("text", "") for c in vega_charts(at)])


def vega_chart(at: AppTest, title: str) -> dict:
    return next(c for c in vega_charts(at) if title in (c.get("title") or {}).get("text", ""))


def vega_series(spec: dict) -> list[str]:
    """The named series of a Vega-Lite chart (its colour legend), in order."""
    for layer in spec["layer"]:
        color = layer["encoding"].get("color", {})
        if color.get("field") == "series":
            return color["scale"]["domain"]
    return []


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders(runs_dir, name):
    at = page(name).run()
    no_problem(at, allow_errors=(name == "runs"))
    assert at.title, "every page has a title"


@pytest.mark.parametrize("name", ["runs", "settling", "distributions", "sweep", "trajectories", "compare", "learn"])
def test_no_chart_uses_black_or_white_ink(runs_dir, name):
    """Theme-aware colours: nothing drawn in black (invisible on the dark theme) or white lines/markers."""
    at = page(name).run()
    vega = [{k: v for k, v in c.items() if k != "datasets"} for c in vega_charts(at)]
    text = json.dumps([c["data"] for c in charts(at)] + vega).lower()
    assert at.get("plotly_chart") or vega
    for ink in ('"color": "black"', '"color": "#000000"', '"color": "#000"', '"color": "white"'):
        assert ink not in text, f"{name}: a trace uses {ink}"
    for ink in ('"black"', '"#000000"', '"#000"', '"white"', '"#ffffff"', '"#fff"'):
        assert ink not in json.dumps(vega).lower(), f"{name}: a Vega-Lite chart uses {ink}"


def test_entry_point_opens_runs_and_switches_pages(runs_dir, served_config):
    at = AppTest.from_file(str(APP / "scratchoff_app.py"), default_timeout=TIMEOUT).run()
    no_problem(at, allow_errors=True)  # the Runs page (opened from the root URL) reports the broken run
    assert any(t.value == "Runs" for t in at.title)
    at.switch_page("app_pages/distributions.py").run()
    no_problem(at)
    assert any("Distributions" in t.value for t in at.title)


def test_entry_point_refuses_to_serve_with_usage_statistics_on(runs_dir):
    """AppTest reads no config file: Streamlit's defaults (statistics on, every interface) are refused."""
    at = AppTest.from_file(str(APP / "scratchoff_app.py"), default_timeout=TIMEOUT).run()
    assert any("refuses to serve" in shown(e) for e in at.error)
    assert not at.title  # no page is shown


def test_exposure_rules(served_config):
    import common as C
    from streamlit import config
    assert C.exposure_problem() is None
    config.set_option("server.address", "0.0.0.0", "command-line argument or environment variable")
    assert C.exposure_problem() is None  # an explicit choice (the README's "Sharing on a network")
    config.set_option("server.address", None, config.ConfigOption.DEFAULT_DEFINITION)
    assert "every network interface" in C.exposure_problem()
    config.set_option("server.address", "localhost", "test")
    config.set_option("browser.gatherUsageStats", True, "test")
    assert "usage statistics" in C.exposure_problem()


def test_server_started_from_another_folder_binds_localhost(tmp_path):
    """`cd elsewhere && streamlit run /abs/app/scratchoff_app.py`: only loopback addresses listen, no network
    URL is printed and no usage-statistics notice (the app's config is found beside its main script)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(SCRATCHOFF_RUNS=str(tmp_path / "runs"), PYTHONPATH=str(ROOT))
    log = tmp_path / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP / "scratchoff_app.py"),
                                 "--server.port", str(port), "--server.fileWatcherType", "none"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
        listening = []
        for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
            if not os.path.exists(table):
                continue
            for line in Path(table).read_text().splitlines()[1:]:
                local, _, state = line.split()[1:4]
                addr, p = local.split(":")
                if int(p, 16) == port and state == "0A":  # LISTEN
                    listening.append(addr)
        loopback = {"0100007F", "00000000000000000000000001000000"}
        assert listening and set(listening) <= loopback, f"listening on {listening}"
        text = log.read_text()
        assert "Network URL" not in text and "External URL" not in text and "usage statistics" not in text, text
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)


def test_runs_page_lists_broken_run_without_hiding_others(runs_dir):
    at = page("runs").run()
    errors = [shown(e) for e in at.error]
    assert len(errors) == 1 and "broken" in errors[0] and "manifest" in errors[0]
    table = at.dataframe[0].value
    assert set(table["run"]) == {"base", "lts", "broken"}
    assert metric(at, "Runs") == "3" and metric(at, "Broken") == "1"
    assert {b.label for b in at.download_button} == {"Metrics as CSV", "Metrics as Parquet"}
    # a baseline's threshold is no "None" anywhere: the rule column says what ran
    assert not table.astype(str).isin(["None", "nan"]).any().any()


BAD_MANIFESTS = {
    "config-list": lambda m: m.update(config=[1, 2]),
    "config-string": lambda m: m.update(config="mlp"),
    "rule-list": lambda m: m.update(rule=["lts"]),
    "steps-per-epoch-string": lambda m: m.update(steps_per_epoch="ten"),
    "total-steps-string": lambda m: m.update(total_steps="many"),
    "threshold-string": lambda m: m["config"].update(threshold="high"),
    "ratio-string": lambda m: m["rule"].setdefault("settings", {}).update(ratio="x"),
}


def test_bad_manifests_are_listed_broken_and_hide_nothing(runs_dir, tmp_path, monkeypatch):
    """Issue 13.5: a config given as a list, a string steps_per_epoch or threshold… lists that run as broken
    with its reason; the good runs and every page keep working."""
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "base", runs / "good")
    for name, damage in BAD_MANIFESTS.items():
        shutil.copytree(runs_dir / "lts", runs / name)
        m = json.loads((runs / name / "manifest.json").read_text())
        damage(m)
        (runs / name / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv("SCRATCHOFF_RUNS", str(runs))
    import common as C
    C.refresh_runs()
    rows = {r["run_id"]: r for r in C.all_runs(runs)}
    assert rows["good"]["ok"]
    for name in BAD_MANIFESTS:
        assert not rows[name]["ok"] and rows[name]["status"] == "broken", name
        assert rows[name]["error"] and "manifest" in rows[name]["error"], (name, rows[name]["error"])
    at = page("runs").run()
    no_problem(at, allow_errors=True)
    assert metric(at, "Broken") == str(len(BAD_MANIFESTS))
    assert sum("broken" in shown(e) for e in at.error) == len(BAD_MANIFESTS)
    for name in ("settling", "distributions", "sweep", "trajectories", "compare"):
        at = page(name).run()
        no_problem(at)
        assert at.selectbox(key="run").value == "good" if name != "compare" else True


def markdown_texts(at: AppTest) -> list[str]:
    """Every string the page handed to Streamlit's markdown renderer (bodies and labels)."""
    out = []
    for kind in ("markdown", "caption", "error", "warning", "info", "success", "title", "header", "subheader"):
        out += [e.value for e in at.get(kind)]
    for m in at.metric:
        out.append(m.label)
    return out


def test_names_from_disk_are_plain_text(runs_dir, tmp_path, monkeypatch):
    """Issue 13.7: a run id, a layer name, a config value and a reason written as markdown images are shown
    as typed (escaped), never handed to the markdown renderer as an image or a link."""
    evil = "![x](http://127.0.0.1:9/t.png)"
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "lts", runs / "![x](t.png)")
    shutil.copytree(runs_dir / "base", runs / "plain-base")
    m = json.loads((runs / "![x](t.png)" / "manifest.json").read_text())
    m.update(run_id=evil, status="failed", reason=f"crashed {evil}")
    m["config"]["model"] = evil
    m["layers"][0]["name"] = evil
    (runs / "![x](t.png)" / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv("SCRATCHOFF_RUNS", str(runs))
    import common as C
    C.refresh_runs()
    seen = 0
    for name in ("runs", "settling", "distributions", "trajectories", "compare", "sweep"):
        at = page(name)
        at.query_params["run"] = "![x](t.png)"
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        for text in markdown_texts(at):
            assert "](" not in text.replace("\\]\\(", ""), f"{name}: unescaped markdown link in {text!r}"
            seen += "t\\.png" in text
    assert seen, "the hostile names were shown somewhere (escaped)"
    assert C.plain(evil) == r"\!\[x\]\(http\:\/\/127\.0\.0\.1\:9\/t\.png\)"


def test_sweep_threshold_moves_updates_eliminated(runs_dir):
    at = page("sweep").run()
    no_problem(at)
    assert at.selectbox(key="run").value == "base"  # a baseline run is preferred
    at.selectbox(key="schedule").set_value("fixed").run()
    at.number_input(key="rho").set_value(0.05).run()
    low = number(metric(at, "Updates eliminated, of quantized weights"))
    low_all = number(metric(at, "… of all trainable params"))
    at.number_input(key="rho").set_value(0.4).run()
    high = number(metric(at, "Updates eliminated, of quantized weights"))
    high_all = number(metric(at, "… of all trainable params"))
    no_problem(at)
    assert high > low and high_all > low_all
    # both denominators of the same frozen weight-steps: all trainable params include the full-precision layers
    assert high_all < high
    # the real LTS run of the same setup is overlaid and compared weight by weight
    assert 0 <= number(metric(at, "Jaccard (frozen sets)")) <= 100
    assert any("record resolution" in shown(i) for i in at.info)
    # the contrast with oscillation freezing: a Markdown table (no data grid for a first view to load) whose
    # LTS column repeats the replay's own count of frozen weights
    table = next(t for t in markdown_texts(at) if "| LTS replay | oscillation |" in t)
    frozen = next(m for m in at.metric if m.label == "Frozen at the end").proto.help.split()[0]
    assert f"| weights frozen | {frozen} |" in table
    assert not at.dataframe


def test_sweep_starts_from_the_overlaid_runs_settings_and_snaps_typed_values(runs_dir):
    """Issue 11.3.6 and 11.3.12: the replay defaults to the actual LTS run's settings, and a typed ρ is shown
    as the value the replay uses (its 1/1024 Δ grid), the same number as in the legend."""
    at = page("sweep").run()
    assert at.selectbox(key="actual").value == "lts"
    assert at.selectbox(key="schedule").value == LTS_SETTINGS["schedule"]
    assert at.number_input(key="rho").value == pytest.approx(LTS_SETTINGS["threshold"], abs=1 / 2048)
    assert at.select_slider(key="decay").value == LTS_SETTINGS["decay"]
    assert at.number_input(key="warmup").value == pytest.approx(LTS_SETTINGS["warmup_epochs"], abs=0.05)
    at.number_input(key="rho").set_value(0.02).run()
    shown = at.number_input(key="rho").value
    assert shown == 20 / 1024
    legend = vega_series(vega_chart(at, "Frozen fraction vs epoch"))
    assert any(f"ρ={shown:.4g}" in name for name in legend), legend


def test_url_reopens_the_same_view(runs_dir):
    """A shared URL (page, run, layer, ρ, schedule, warm-up, decay, record) reopens the same view."""
    at = page("distributions")
    for k, v in {"run": "base", "layer": "fc2", "schedule": "sine-growth", "rho": "0.5", "warmup": "1.0",
                 "decay": "0.95", "record": "6.00"}.items():
        at.query_params[k] = v
    at.run()
    no_problem(at)
    assert at.selectbox(key="run").value == "base"
    assert at.selectbox(key="schedule").value == "sine"
    assert at.number_input(key="rho").value == 0.5
    assert at.select_slider(key="decay").value == 0.95
    assert at.select_slider(key="record").value == "6.00"
    layers = [lay["name"] for lay in json.loads((runs_dir / "base" / "manifest.json").read_text())["layers"]]
    if "fc2" in layers:
        assert at.selectbox(key="layer").value == "fc2"
    at.number_input(key="rho").set_value(0.25).run()
    assert at.query_params["rho"] in (["0.25"], "0.25")


def test_distributions_record_slider_and_overlay(runs_dir):
    at = page("distributions")
    at.query_params["run"] = "lts"
    at.run()
    no_problem(at)
    labels = at.select_slider(key="record").options
    at.select_slider(key="record").set_value(labels[0]).run()
    first = number(metric(at, "Frozen"))
    at.select_slider(key="record").set_value(labels[-1]).run()
    last = number(metric(at, "Frozen"))
    no_problem(at)
    assert first == 0 and last > 20  # nothing frozen during warm-up, most weights by the end
    titles = chart_titles(at)
    assert any("Weights of lts" in t for t in titles) and any("EMA distance" in t for t in titles)
    at.selectbox(key="overlay").set_value("base").run()
    no_problem(at)
    assert any("Overlay" in shown(s) for s in at.subheader)
    assert any("base" in name for name in vega_series(vega_chart(at, "Weights of")))


def test_settling_record_slider_reveals_cells_and_counts_frozen_moved(runs_dir):
    at = page("settling")
    at.query_params["run"] = "lts"
    at.run()
    no_problem(at)
    slider = at.select_slider(key="record")
    slider.set_value(slider.options[0]).run()
    first = number(metric(at, "Revealed cells"))
    at.select_slider(key="record").set_value(slider.options[-1]).run()
    last = number(metric(at, "Revealed cells"))
    no_problem(at)
    assert last > first
    assert 0 <= number(metric(at, "Frozen, then on another level")) <= 100


def test_trajectories_selection_modes(runs_dir):
    at = page("trajectories").run()
    for mode in ("most oscillating", "latest settling"):
        at.radio(key="traj_mode").set_value(mode).run()
        no_problem(at)
    at.radio(key="traj_mode").set_value("by index").run()
    at.text_input(key="traj_idx").input("1, 2, 99999999").run()
    assert any("outside the layer" in shown(e) for e in at.error)
    at.text_input(key="traj_idx").input("").run()
    assert any("Type the indices" in shown(i) for i in at.info)
    at.text_input(key="traj_idx").input(", ".join(str(i) for i in range(25))).run()
    no_problem(at)
    colors = [tr.get("line", {}).get("color") for tr in charts(at)[0]["data"] if tr.get("legendgroup", "")
              .startswith("w") and tr.get("showlegend") is not False and tr.get("mode") == "lines+markers"]
    assert len(colors) == 20 and len(set(colors)) == 20  # one colour per weight, none repeated
    legend = [tr.get("name", "") for tr in charts(at)[0]["data"]]
    assert any("dotted" in n for n in legend) and any("solid" in n for n in legend)


def test_train_invalid_input_shows_error(runs_dir):
    at = page("train").run()
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_warmup").set_value(5.0)
    at.button(key="tr_start").click().run()
    no_problem(at, allow_errors=True)
    assert any("warm-up" in shown(e) for e in at.error)
    assert "train_job" not in at.session_state


def test_train_command_line_follows_the_settings(runs_dir):
    at = page("train").run()
    before = at.code[0].value
    at.number_input(key="tr_epochs").set_value(7).run()
    at.selectbox(key="tr_rule").set_value("none").run()
    after = at.code[0].value
    assert "--epochs 30" in before and "--epochs 7" in after and "--rule none" in after
    assert "--preset" not in after
    at.toggle(key="tr_preset").set_value(True).run()
    assert "--preset reference" in at.code[0].value   # the reference preset, as on the command line


def test_train_offers_the_paper_models_with_a_width_and_cifar100(runs_dir):
    at = page("train").run()
    assert {"resnet18", "mobilenetv2", "transformer"} <= set(at.selectbox(key="tr_model").options)
    assert "--width" not in at.code[0].value                    # empty: the model's own width
    at.selectbox(key="tr_model").set_value("resnet18").run()
    at.number_input(key="tr_width").set_value(16).run()
    at.selectbox(key="tr_dataset").set_value("cifar100").run()
    assert "--model resnet18 --width 16 --dataset cifar100" in at.code[0].value
    assert [t.label for t in at.text_input].count("Data folder") == 1   # CIFAR-100 is read from a folder


def _fake_mnist(folder: Path, n_train: int = 96, n_test: int = 48) -> None:
    """A tiny, valid MNIST in IDX format (28×28 images, labels 0–9)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lab = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], ">u4").tobytes() + img.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([0x801, n], ">u4").tobytes() + lab.tobytes())


def test_train_data_folder_is_checked_before_starting(runs_dir, tmp_path):
    """Issue 11.3.1: mnist needs a data folder: a missing field, a missing folder and a folder without the
    files are refused before anything starts; a valid folder trains."""
    import jobs
    at = page("train").run()
    at.selectbox(key="tr_dataset").set_value("mnist").run()
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_fp_epochs").set_value(1)
    at.button(key="tr_start").click().run()
    assert any("needs a data folder" in shown(e) for e in at.error)
    at.text_input(key="tr_data_root").input(str(tmp_path / "nowhere"))
    at.button(key="tr_start").click().run()
    assert any("does not exist" in shown(e) for e in at.error)
    (tmp_path / "empty").mkdir()
    at.text_input(key="tr_data_root").input(str(tmp_path / "empty"))
    at.button(key="tr_start").click().run()
    assert any("train-images-idx3-ubyte" in shown(e) for e in at.error)
    assert "train_job" not in at.session_state
    _fake_mnist(tmp_path / "mnist")
    at.text_input(key="tr_data_root").input(str(tmp_path / "mnist"))
    at.text_input(key="tr_name").input("app-mnist")
    at.button(key="tr_start").click().run()
    job = jobs.registry()[at.session_state["train_job"]]
    assert job.proc.wait(timeout=TIMEOUT) == 0, jobs.log_tail(job)
    from lts_core.store import open_run
    assert open_run(job.out).config["data_root"] == str(tmp_path / "mnist")


def test_train_short_run_end_to_end(runs_dir):
    at = page("train").run()
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_fp_epochs").set_value(1)
    at.text_input(key="tr_name").input("app-short")
    at.button(key="tr_start").click().run()
    no_problem(at)
    job_id = at.session_state["train_job"]
    import jobs
    job = jobs.registry()[job_id]
    assert job.proc.wait(timeout=TIMEOUT) == 0, jobs.log_tail(job)
    at.run()
    no_problem(at)
    assert any("complete" in shown(s) for s in at.success)
    # the process reported its epochs: FP pre-training and QAT, each done
    prog = {p.phase: p for p in jobs.progress(job)}
    assert prog["fp"].done == prog["fp"].total == 1 and prog["qat"].done == prog["qat"].total == 2
    runs = page("runs").run()
    assert "app-short" in set(runs.dataframe[0].value["run"])


def test_failed_training_shows_its_reason(runs_dir):
    """A job that fails inside its process (NaN loss) shows the one-line reason, never a traceback."""
    import jobs
    from lts_core.config import make_config
    cfg = make_config(model="mlp", dataset="digits", epochs=2, fp_epochs=1, lr=1e9, rule="none")
    job = jobs.start_train(cfg, Path(os.environ["SCRATCHOFF_RUNS"]), "app-nan")
    assert job.proc.wait(timeout=TIMEOUT) != 0
    at = page("train")
    at.session_state["train_job"] = job.id
    at.run()
    assert not at.exception
    errors = [shown(e) for e in at.error]
    assert any(e.startswith("Training failed:") and "loss" in e for e in errors), errors
    assert not any("Traceback" in e for e in errors)


def wait_stopped(job) -> int:
    """The return code of a job asked to stop, waited for as the Train page does: a SIGINT that lands in the
    process's start-up can be lost (a library's import catching everything), so SIGTERM follows after 8 s."""
    import jobs
    deadline = time.time() + TIMEOUT
    while job.proc.poll() is None and time.time() < deadline:
        jobs.escalate_stop(job)
        time.sleep(0.2)
    return job.proc.wait(timeout=1)


def test_job_limit_and_unique_ids(runs_dir, monkeypatch):
    """Issue 13.4: one job at a time by default (the rest refused with a message); the same run name from two
    tabs is refused for the second; job ids are unique and every job can be stopped."""
    import jobs
    from lts_core.config import make_config
    runs = Path(os.environ["SCRATCHOFF_RUNS"])
    cfg = make_config(model="mlp", dataset="digits", epochs=500, fp_epochs=1)
    first = jobs.start_train(cfg, runs)
    try:
        with pytest.raises(jobs.JobRefused, match="at most 1 at a time"):
            jobs.start_train(cfg, runs)
        monkeypatch.setenv("SCRATCHOFF_MAX_JOBS", "3")
        results: list = []

        def tab():  # two browser tabs asking for the same name at the same moment
            try:
                results.append(jobs.start_train(cfg, runs, "same-name"))
            except jobs.JobRefused as e:
                results.append(e)

        threads = [threading.Thread(target=tab) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started = [r for r in results if isinstance(r, jobs.Job)]
        refused = [r for r in results if isinstance(r, jobs.JobRefused)]
        assert len(started) == 1 and len(refused) == 1 and "already exists or is being started" in str(refused[0])
        third = jobs.start_train(cfg, runs)  # same settings, no name: another folder and another id
        ids = {first.id, started[0].id, third.id}
        assert len(ids) == 3 and len({first.out, started[0].out, third.out}) == 3
        with pytest.raises(jobs.JobRefused, match="at most 3 at a time"):
            jobs.start_train(cfg, runs)
        with pytest.raises(jobs.JobRefused, match="at most 1,000"):
            jobs.start_train(make_config(epochs=10**12), runs)
        for job in (first, started[0], third):
            jobs.stop(job)
        for job in (first, started[0], third):
            assert wait_stopped(job) != 0
            assert not job.running
    finally:
        for job in jobs.registry().values():
            if job.running:
                job.proc.kill()
                job.proc.wait()


def test_stop_button_leaves_an_interrupted_run(runs_dir):
    at = page("train").run()
    at.number_input(key="tr_epochs").set_value(500)
    at.number_input(key="tr_fp_epochs").set_value(1)
    at.text_input(key="tr_name").input("app-stopped")
    at.button(key="tr_start").click().run()
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
    assert any("interrupted" in shown(w) for w in at.warning)
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


def test_learn_one_bit_keeps_the_weight_on_the_axis():
    """Issue 11.3.3: at 1 bit the position slider spans 0–1 and the dot stays on the drawn axis."""
    at = page("learn").run()
    at.radio(key="learn_bits").set_value(1).run()
    no_problem(at)
    pos = at.slider(key="learn_pos_1")
    assert pos.min == 0.0 and pos.max == 1.0 and 0.0 <= pos.value <= 1.0
    fig = charts(at)[0]
    dot = next(t for t in fig["data"] if t.get("name") == "the weight")
    lo, hi = fig["layout"]["xaxis"]["range"]
    assert lo <= dot["x"][0] <= hi
    assert number(metric(at, "Distance to its level")) <= 0.5


def test_learn_backward_flops_step():
    at = page("learn").run()
    at.slider(key="learn_flops_f").set_value(0.6).run()
    no_problem(at)
    assert metric(at, "Backward FLOPs saved") == "30%" and metric(at, "Weight updates eliminated") == "60%"


def test_compare_selection_changes_the_table(runs_dir):
    at = page("compare").run()
    no_problem(at)
    assert len(at.multiselect(key="cmp").value) == 2
    assert at.dataframe[0].value.shape[0] == 2
    at.multiselect(key="cmp").set_value([at.multiselect(key="cmp").value[0]]).run()
    assert any("at least two" in shown(i) for i in at.info)


def test_runs_page_picker_changes_the_figures(runs_dir):
    at = page("runs").run()
    no_problem(at, allow_errors=True)  # the broken run is reported with st.error
    shown = {}
    for name in ("base", "lts"):
        at.selectbox(key="run").set_value(name).run()
        shown[name] = number(metric(at, "Updates eliminated, of quantized weights"))
        shown[name + "_all"] = number(metric(at, "… of all trainable params"))
    assert shown["base"] == 0.0 and shown["lts"] > 20  # the baseline eliminates nothing, the LTS run does
    # the paper's denominator (all trainable parameters) reads lower: the MLP's first and last layers stay FP
    assert 0 < shown["lts_all"] < shown["lts"]
    assert "Train loss" in chart_titles(at)
    overview = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    enc = overview["encoding"]
    assert enc["x"]["scale"]["domain"][0] < 0  # points at 0 % are not clipped
    assert enc["color"]["field"] == "rule" and enc["shape"]["field"] == "finished"  # by rule; unfinished apart
