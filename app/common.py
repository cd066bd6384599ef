"""Shared helpers of the scratchoff app: safety checks, runs-folder scan, cached loaders, plain-text rendering of
names read from disk, URL-bound controls, theme-aware plot helpers, run picker.

Everything here is glue between Streamlit and the engine's public API (`lts_core.store`,
`lts_core.analysis`, `lts_core.schedules`, `lts_core.config`); no training or analysis logic lives here.
The engine is called only from the small loader functions of the "loaders" section, so that they can be
swapped for cached summaries without touching the pages.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import streamlit as st

from lts_core.store import RunError, list_runs, open_run, runs_dir

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
METRICS = "metrics.parquet"
SCHEDULE_NAMES = {"fixed": "fixed", "linear": "linear-growth", "sine": "sine-growth"}
DECAYS = [0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]
RATIO_MAX = 2.0        # ρ range offered by the controls (Δ)
RATIO_STEP = 1 / 1024  # the replay's ratio grid: what the controls accept is what the replay uses
SETUP_KEYS = ("model", "dataset", "bits", "quantizer", "width", "seed", "epochs", "fp_epochs", "batch_size",
              "max_train", "act_bits", "first_last_bits")
# 20 colours (tab20-like, dark then light of each hue) readable on light and dark backgrounds
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22",
           "#7f7f7f", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#ffbb78", "#9edae5", "#c49c94", "#f7b6d2",
           "#dbdb8d", "#c7c7c7"]
INK = "#888888"        # reference lines and "all layers" curves: visible on white and on near-black
WEIGHT_CLASS_COLORS = {"active": "#1f77b4", "frozen": "#2ca02c", "moved": "#d62728"}
LOOPBACK = ("localhost", "127.0.0.1", "::1")


# ---- where the app listens and what it sends (issue: the app's exposure) ---------------------------------
def exposure_problem() -> str | None:
    """A one-line reason to refuse serving, or None.

    app/.streamlit/config.toml binds localhost and turns usage statistics off whatever the current folder
    (Streamlit reads a config folder beside the main script). This check catches the rest: a Streamlit that
    ignored that file, or statistics switched on elsewhere. An address chosen explicitly (command line or
    STREAMLIT_SERVER_ADDRESS, as the README's "Sharing on a network" does) is the user's decision.
    """
    from streamlit import config as st_config
    if st.get_option("browser.gatherUsageStats"):
        return ("usage statistics are switched on (browser.gatherUsageStats); start the app with "
                "`--browser.gatherUsageStats false`")
    address = st.get_option("server.address")
    if address in LOOPBACK:
        return None
    if address and st_config.get_where_defined("server.address") not in (st_config.ConfigOption.DEFAULT_DEFINITION,):
        return None  # explicitly chosen
    return (f"the app would listen on every network interface (server.address={address!r}); start it with "
            "`streamlit run app/scratchoff_app.py` (it binds localhost) or choose an address explicitly with "
            "`--server.address`")


def refuse_if_exposed() -> None:
    problem = exposure_problem()
    if problem:
        print(f"scratchoff: refusing to serve: {problem}", file=sys.stderr, flush=True)
        st.error(f"scratchoff refuses to serve: {problem}")
        st.stop()


# ---- names from disk are plain text ------------------------------------------------------------------------
_MD_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")   # every ASCII punctuation character


def plain(text: Any) -> str:
    """`text` (a name or message read from disk) made safe inside Streamlit markdown: every ASCII punctuation
    character backslash-escaped (CommonMark), so `![x](http://host/t.png)` shows as typed and fetches nothing;
    line breaks become spaces."""
    return _MD_PUNCT.sub(r"\\\1", " ".join(str(text).split()))


def plot_text(text: Any) -> str:
    """`text` made safe inside Plotly titles, legends and hover labels (which read a little HTML)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---- the runs folder ----------------------------------------------------------------------------------------
def runs_folder() -> Path:
    """$SCRATCHOFF_RUNS, else the engine's default (<data>/runs)."""
    return runs_dir()


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def run_stamp(path: str | Path) -> tuple[int, int]:
    """A cheap version stamp of a run: (manifest mtime, metrics mtime)."""
    p = Path(path)
    return _mtime(p / MANIFEST), _mtime(p / METRICS)


def fingerprint(folder: Path) -> tuple:
    """Changes whenever a run (or a run inside a sweep folder) appears, disappears or writes its
    manifest/metrics."""
    return tuple((str(p),) + run_stamp(p) for pattern in ("*", "*/*") for p in sorted(Path(folder).glob(pattern))
                 if p.is_dir() and not p.name.startswith(".") and not p.parent.name.startswith("."))


def _num(x) -> float | None:
    """A finite real number, else None (strings, lists, booleans, NaN from a hand-edited manifest)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x) -> int | None:
    v = _num(x)
    return int(v) if v is not None and v == int(v) else None


def _str(x) -> str | None:
    return x if isinstance(x, str) else None


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


class BadManifest(ValueError):
    """A manifest that parses but whose fields have the wrong types."""


def _check_manifest_types(manifest: dict) -> None:
    for key in ("config", "rule"):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], dict):
            raise BadManifest(f"manifest field {key!r} is a {type(manifest[key]).__name__}, not an object")
    for key in ("steps_per_epoch", "total_steps", "record_every", "n_weights", "warmup_steps"):
        v = manifest.get(key)
        if v is not None and _int(v) is None:
            raise BadManifest(f"manifest field {key!r} is {v!r}, not a whole number")
    cfg = _dict(manifest.get("config"))
    for key in ("threshold", "decay", "warmup_epochs", "epochs", "bits", "fp_epochs", "seed"):
        v = cfg.get(key)
        if v is not None and _num(v) is None:
            raise BadManifest(f"config field {key!r} is {v!r}, not a number")
    settings = _dict(_dict(manifest.get("rule")).get("settings"))
    for key in ("ratio", "decay", "warmup_steps"):
        v = settings.get(key)
        if v is not None and _num(v) is None:
            raise BadManifest(f"rule setting {key!r} is {v!r}, not a number")


def _display_id(path: Path, folder: Path) -> str:
    """A run is named by its folder (relative to the runs folder, e.g. 'sweep-1/lts-0.1'), never by the
    run id written in its manifest: a copied folder keeps the original's id."""
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return Path(path).name


def _row_for(entry, folder: Path) -> dict:
    """One run as a flat dict of plain values; a run that cannot be described is a broken row with a reason."""
    row: dict[str, Any] = {"path": str(entry.path), "run_id": _display_id(entry.path, folder), "group": entry.group,
                           "ok": bool(entry.ok), "error": entry.error, "status": entry.status,
                           "created": _num(entry.created), "manifest_id": None}
    try:
        _describe_row(row, entry)
    except (BadManifest, RunError, TypeError, ValueError, AttributeError, KeyError) as e:
        where = Path(entry.path) / MANIFEST
        row.update(ok=False, status="broken", error=str(e) if isinstance(e, RunError) else
                   f"{where}: {e}" if isinstance(e, BadManifest) else
                   f"{where}: unreadable field ({type(e).__name__}: {e})")
    return row


def _describe_row(row: dict, entry) -> None:
    manifest = entry.manifest if isinstance(entry.manifest, dict) else {}
    _check_manifest_types(manifest)
    cfg = _dict(manifest.get("config"))
    rule = _dict(manifest.get("rule"))
    settings = _dict(rule.get("settings"))
    mid = manifest.get("run_id")
    row["manifest_id"] = str(mid) if mid is not None and str(mid) != Path(entry.path).name else None
    rule_name = _str(cfg.get("rule")) or _str(rule.get("name")) or ("none" if manifest else None)
    epochs = _int(cfg.get("epochs"))
    spe = _int(manifest.get("steps_per_epoch"))
    warm = _num(cfg.get("warmup_epochs"))
    warm_steps = _num(settings.get("warmup_steps", manifest.get("warmup_steps")))  # the engine's, every rule
    if warm_steps is not None and spe:
        warm = warm_steps / spe
    elif warm is None and epochs:
        warm = 0.2 * epochs
    lts = rule_name == "lts"
    frozen_rule = rule_name in ("lts", "osc")
    schedule = (_str(settings.get("schedule")) or _str(cfg.get("schedule"))) if lts else None
    threshold = _num(settings.get("ratio", cfg.get("threshold"))) if lts else None
    if lts and threshold is None:
        threshold = 0.1 if schedule == "fixed" else 1.0
    row.update(
        label=_str(manifest.get("label")), model=_str(cfg.get("model")), dataset=_str(cfg.get("dataset")),
        bits=_int(cfg.get("bits")), quantizer=_str(cfg.get("quantizer")), rule=rule_name,
        schedule=schedule, threshold=threshold,
        decay=_num(settings.get("decay", cfg.get("decay"))) if lts else None,
        warmup_epochs=warm, epochs=epochs, fp_epochs=_int(cfg.get("fp_epochs")), seed=_int(cfg.get("seed")),
        steps_per_epoch=spe, total_steps=_int(manifest.get("total_steps")),
        record_every=_int(manifest.get("record_every")), n_weights=_int(manifest.get("n_weights")),
        device=_str(manifest.get("device")), fp_acc=_num(manifest.get("fp_test_acc")), reason=None, epochs_done=0,
        test_acc=None, updates_eliminated=None, updates_eliminated_all_params=None, backward_flops_saved=None,
        n_records=0, n_layers=0, preset=_str(cfg.get("preset")), n_trainable=_int(manifest.get("n_trainable_params")),
        granularity=(_str(settings.get("granularity")) or _str(cfg.get("granularity")) or "weight") if lts else None,
        channel_quantile=_num(settings.get("channel_quantile", cfg.get("channel_quantile"))) if lts else None,
        bound_grad=(_str(settings.get("bound_grad")) or _str(cfg.get("bound_grad")) or "all") if frozen_rule else None,
        backward_flops_skippable=None, step_seconds=None, backward_seconds=None,
        setup=tuple(cfg.get(k) if isinstance(cfg.get(k), (str, int, float, type(None))) else str(cfg.get(k))
                    for k in SETUP_KEYS),
    )
    if not entry.ok:
        return
    run = entry.run
    row["reason"] = _str(run.reason) or (None if run.reason is None else str(run.reason))
    row["n_records"] = int(run.n_records)
    row["n_layers"] = len(run.layers)
    m = run.metrics
    if len(m):
        last = m.iloc[-1]
        row.update(epochs_done=int(len(m)), test_acc=_num(last.get("test_acc")),
                   updates_eliminated=_num(last.get("updates_eliminated")),
                   updates_eliminated_all_params=_num(last.get("updates_eliminated_all_params")),
                   backward_flops_saved=_num(last.get("backward_flops_saved")),
                   backward_flops_skippable=_num(last.get("backward_flops_skippable")),
                   step_seconds=_column_sum(m, "step_seconds"), backward_seconds=_column_sum(m, "backward_seconds"))


def _column_sum(m: pd.DataFrame, column: str) -> float | None:
    """Sum of a metrics column over the epochs, or None when a run did not record it (older runs)."""
    if column not in m or m[column].isna().any():
        return None
    return _num(float(m[column].sum()))


@st.cache_data(show_spinner=False, max_entries=16, ttl=5)
def _scan(folder: str, fp: tuple) -> list[dict]:
    rows = [_row_for(e, Path(folder)) for e in list_runs(folder)]
    rows.sort(key=lambda r: (r["created"] if r["created"] is not None else -math.inf, r["run_id"]), reverse=True)
    return rows


def all_runs(folder: Path | None = None) -> list[dict]:
    """One dict per run folder (ok or broken), newest first, cached on the folder's fingerprint."""
    folder = Path(folder or runs_folder())
    return _scan(str(folder), fingerprint(folder))


def ok_runs(folder: Path | None = None, with_records: bool = True) -> list[dict]:
    return [r for r in all_runs(folder) if r["ok"] and (not with_records or r.get("n_records", 0) > 0)]


def refresh_runs() -> None:
    """Forget the cached run list (a new or finished run appears on every page)."""
    _scan.clear()


# ---- warm-up: what later pages import, imported once per server while the first page is looked at -----------
_WARM_UP: list[threading.Thread] = []
_LAST_SCRIPT_ACTIVITY = [0.0]   # time.monotonic() when a run of the main script last started or ended
WARM_UP_QUIET_SECONDS = 3.0


def mark_script_activity() -> None:
    """Note that a run of the main script starts or ends now (the warm-up waits for a quiet server)."""
    _LAST_SCRIPT_ACTIVITY[0] = time.monotonic()


def warm_up() -> None:
    """Import the engine's replays (with torch: 1–3 s) and Plotly in a low-priority background thread, once per
    server, after the first page is served and once no page has run for `WARM_UP_QUIET_SECONDS`. The Runs,
    Settling and Distributions pages need neither (they read cached summaries and counts); a later Threshold
    sweep or Trajectories view then finds them imported instead of paying for them. The wait matters: an import
    holds Python's GIL, so a warm-up during the next page's run slows that page (a Distributions click right
    after the Runs page took 2.1 s instead of 1.6 s, BENCHMARKS.md)."""
    if _WARM_UP:
        return
    _WARM_UP.append(threading.Thread(target=_import_later_pages, name="scratchoff-warm-up", daemon=True))
    _WARM_UP[0].start()


def wait_for_quiet_server(quiet_seconds: float = WARM_UP_QUIET_SECONDS, poll_seconds: float = 0.25) -> None:
    """Return once no run of the main script has started or ended for `quiet_seconds` (seconds)."""
    while (idle := time.monotonic() - _LAST_SCRIPT_ACTIVITY[0]) < quiet_seconds:
        time.sleep(max(poll_seconds, quiet_seconds - idle))


def _import_later_pages() -> None:
    if sys.platform == "linux":   # a thread's own nice value (Linux only: elsewhere it would be the process's)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass
    wait_for_quiet_server()
    import lts_core.analysis.replay  # noqa: F401   (torch: the Sweep and Trajectories pages' replays)
    import plotly.graph_objects  # noqa: F401


# ---- loaders: every engine call of the pages goes through one of these -------------------------------------
@st.cache_resource(show_spinner=False, max_entries=32)
def _open(path: str, stamp: tuple):
    return open_run(path)


def load_run(row_or_path):
    """The engine `Run` of a row/path (shared, cached until its manifest or metrics change)."""
    path = row_or_path["path"] if isinstance(row_or_path, dict) else str(row_or_path)
    return _open(path, run_stamp(path))


@st.cache_resource(show_spinner="Computing when each weight settled…", max_entries=16)
def _settle(path: str, stamp: tuple):
    from lts_core.analysis import cached_settle_summary   # kept beside the run: computed once, then read
    return cached_settle_summary(_open(path, stamp))


def settle(row) -> Any:
    """`SettleSummary` of a run (settle records, curves, histogram, categories)."""
    return _settle(row["path"], run_stamp(row["path"]))


@st.cache_resource(show_spinner="Precomputing the threshold replay (once per schedule, warm-up and decay)…",
                   max_entries=8)
def _replay_index(path: str, stamp: tuple, schedule: str, warmup_steps: int, decay: float):
    from lts_core.analysis import cached_replay_index   # kept beside the run: computed once, then read
    return cached_replay_index(_open(path, stamp), schedule, int(warmup_steps), float(decay))


def replay_index(row, schedule: str, warmup_steps: int, decay: float):
    """`ReplayIndex` for (run, schedule, warm-up, decay): afterwards any threshold is a cheap query."""
    return _replay_index(row["path"], run_stamp(row["path"]), schedule, int(warmup_steps), float(decay))


@st.cache_resource(show_spinner="Replaying oscillation freezing…", max_entries=16)
def _osc(path: str, stamp: tuple):
    from lts_core.analysis import cached_oscillation_summary   # kept beside the run (layers ≤ 4 bits)
    return cached_oscillation_summary(_open(path, stamp))


def osc_replay(row):
    """The ReplayResult of oscillation freezing (Nagel et al. 2022) replayed on the run."""
    return _osc(row["path"], run_stamp(row["path"]))


@st.cache_data(show_spinner="Replaying LTS weight by weight…", max_entries=64)
def _replayed(what: str, path: str, stamp: tuple, schedule: str, ratio: float, warmup_steps: int, decay: float,
              granularity: str, quantile: float):
    import lts_core.analysis as A   # what: "replay_freeze_steps" or "replay_accounting"
    return getattr(A, what)(_open(path, stamp), schedule=schedule, ratio=float(ratio), warmup_steps=int(warmup_steps),
                            decay=float(decay), granularity=granularity, channel_quantile=float(quantile))


def replay_freeze_steps_cached(row, schedule: str, ratio: float, warmup_steps: int, decay: float,
                               granularity: str = "weight", quantile: float = 0.5) -> np.ndarray:
    return _replayed("replay_freeze_steps", row["path"], run_stamp(row["path"]), schedule, float(ratio),
                     int(warmup_steps), float(decay), granularity, float(quantile))


def replay_accounting_cached(row, schedule: str, ratio: float, warmup_steps: int, decay: float,
                             granularity: str = "weight", quantile: float = 0.5):
    """`ReplayResult` of one threshold with the structural share (`lts_core.analysis.replay_accounting`)."""
    return _replayed("replay_accounting", row["path"], run_stamp(row["path"]), schedule, float(ratio),
                     int(warmup_steps), float(decay), granularity, float(quantile))


@st.cache_data(show_spinner=False, max_entries=32)
def _layer_stats(path: str, stamp: tuple, layer: int) -> dict:
    from lts_core.analysis import cached_level_stats   # kept beside the run: no pass over the records
    run = _open(path, stamp)
    stats, sl = cached_level_stats(run), run.layer_slice(layer)
    return {"osc_freq": stats.reversals[sl] / max(run.n_records - 1, 1), "settle_record": stats.settle_record[sl],
            "flips": stats.flips[sl]}


def layer_stats(row, layer: int) -> dict:
    """Per-weight oscillation frequency, settle record and flips of one layer."""
    return _layer_stats(row["path"], run_stamp(row["path"]), int(layer))


@st.cache_resource(show_spinner="Counting the distributions of every record (one pass over the run)…",
                   max_entries=8)
def _distributions(path: str, stamp: tuple, layer: int | None, replay: tuple | None):
    from lts_core.analysis import cached_record_distributions   # kept beside the run: counted once, then read
    run = _open(path, stamp)
    if replay is not None:
        keys = ("schedule", "ratio", "warmup_steps", "decay")
        return cached_record_distributions(run, layer=layer, replay=dict(zip(keys, replay)))
    return cached_record_distributions(run, layer=layer, freeze_steps=run.freeze_steps(layer))


def distributions_of(row, layer: int | None, replay: "ReplaySettings | None" = None):
    """`analysis.RecordDistributions` of a run's layer (None = all layers): the run's own freezing (an LTS run's
    recorded freeze steps), or LTS replayed with `replay` settings."""
    rp = None
    if replay is not None:
        rp = (replay.schedule, float(replay.ratio), epochs_to_steps(row, replay.warmup_epochs), float(replay.decay))
    return _distributions(row["path"], run_stamp(row["path"]), None if layer is None else int(layer), rp)


@st.cache_data(show_spinner=False, max_entries=32)
def _frozen_moved(path: str, stamp: tuple, replay: tuple | None) -> dict:
    """Frozen weights and those among them on another level than the one they froze on, at the last record."""
    d = _distributions(path, stamp, None, replay)
    totals = d.class_totals()[-1]
    return {"frozen": int(totals[1] + totals[2]), "moved": int(totals[2]), "n": int(d.n_weights),
            "moved_curve": d.class_totals()[:, 2].astype(float), "frozen_curve": d.frozen_by.astype(float)}


def frozen_moved(row, replay: "ReplaySettings | None" = None) -> dict:
    """{'frozen', 'moved', 'n', 'moved_curve', 'frozen_curve'}: how many frozen weights sit on another level
    than the one they froze on (the learned bounds moved under them), at the last record and per record."""
    rp = None
    if replay is not None:
        rp = (replay.schedule, float(replay.ratio), epochs_to_steps(row, replay.warmup_epochs), float(replay.decay))
    return _frozen_moved(row["path"], run_stamp(row["path"]), rp)


WEIGHT_RECORDS_AT_ONCE = 20_000_000   # weight × record pairs replayed one by one without asking (≈ 0.3 s)


def weight_by_weight_ok(row, key: str, label: str, container=st) -> bool:
    """Whether a replay that follows every weight through every record (not the cached replay index) may run now.
    Runs of up to `WEIGHT_RECORDS_AT_ONCE` weight-records: at once. Bigger runs: when the reader turns the toggle
    on (10M weights × 100 records take 10–15 s on 2 cores), so that the page's first view does not wait for it;
    the toggle stays on for the session, and each result is cached."""
    size = int(row.get("n_weights") or 0) * int(row.get("n_records") or 0)
    if size <= WEIGHT_RECORDS_AT_ONCE:
        return True
    return container.toggle(label, key=key, help=f"replays LTS weight by weight over {size / 1e6:,.0f}M "
                            "weight-records (about 1.5 s per 100M on 2 cores); the page's other figures come from "
                            "the precomputed replay index and need none of it")


# ---- run facts --------------------------------------------------------------------------------------------
def warmup_epochs_of(row) -> float:
    w = row.get("warmup_epochs")
    if w is None:
        w = 0.2 * (row.get("epochs") or 0)
    return float(w)


def epochs_to_steps(row, epochs: float) -> int:
    return int(round(float(epochs) * (row.get("steps_per_epoch") or 1)))


def steps_to_epochs(row, steps) -> np.ndarray:
    return np.asarray(steps, dtype=np.float64) / float(row.get("steps_per_epoch") or 1)


def is_lts(row) -> bool:
    return row.get("rule") == "lts"


def same_setup(a: dict, b: dict) -> bool:
    """Same model/dataset/bits/seed/epochs… and the same number of recorded weights."""
    return a.get("setup") == b.get("setup") and a.get("n_weights") == b.get("n_weights")


RULE_NAMES = {"none": "baseline QAT", "lts": "LTS", "osc": "oscillation freezing"}


def rule_text(row) -> str:
    rule = row.get("rule") or "none"
    text = RULE_NAMES.get(rule, str(rule))
    if rule == "lts":
        text = f"LTS {SCHEDULE_NAMES.get(row.get('schedule'), row.get('schedule'))} ρ={_g(row.get('threshold'))}"
        if row.get("granularity") == "channel":
            text += f", channels (q={_g(row.get('channel_quantile'))})"
    if row.get("bound_grad") == "active":
        text += ", active bounds"
    return text


def describe(row) -> str:
    """A short config summary: 'mlp · digits · 2 bit · LTS linear-growth ρ=1 · 10 ep' (raw text: pass it
    through `plain` before markdown)."""
    if not row.get("ok") and not row.get("model"):
        return "—"
    bits = f"{row.get('bits')} bit" if row.get("bits") is not None else "? bit"
    ep = f"{row.get('epochs')} ep" if row.get("epochs") else ""
    return " · ".join(str(x) for x in (row.get("model"), row.get("dataset"), bits, rule_text(row), ep) if x)


# ---- what freezing saved: the three figures of every run (Runs and Compare tables) ----------------------------
SAVINGS_HELP = {
    "bwd accounted (%)": "backward FLOPs saved as the paper counts them: the weight-gradient FLOPs "
                                      "of frozen weights, mean over the steps. A dense backward still computes "
                                      "them: this is bookkeeping, not time",
    "bwd skippable (%)": "share of backward FLOPs in output channels (rows, filters) all of whose weights "
                                  "are frozen, mean over the steps: what a planned backward can skip (it does "
                                  "with bound-grad 'active')",
    "bwd s": "measured: wall-clock seconds of the backward passes (loss.backward()), summed over the epochs",
    "step s": "measured: wall-clock seconds of whole training steps (forward, backward, rule, optimizers), "
              "summed over the epochs",
}


def savings_columns(row) -> dict:
    """The accounted and structural shares (%) and the measured seconds of a run; None where not recorded."""
    def p(x):
        return None if x is None else 100.0 * x
    return {"bwd accounted (%)": p(row.get("backward_flops_saved")),
            "bwd skippable (%)": p(row.get("backward_flops_skippable")),
            "bwd s": row.get("backward_seconds"), "step s": row.get("step_seconds")}


def savings_column_config() -> dict:
    num = st.column_config.NumberColumn
    return {k: num(format="%.1f", help=h) for k, h in SAVINGS_HELP.items()}


def _g(x) -> str:
    return "?" if x is None else f"{float(x):g}"


def run_label(row) -> str:
    return f"{row['run_id']}  —  {describe(row)}  [{row['status']}]"


def pct(x, digits: int = 1) -> str:
    x = _num(x)
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def epoch_label(e: float) -> str:
    """Epochs as the app writes them everywhere: optimizer steps taken / steps per epoch, two decimals."""
    return f"{float(e):.2f}"


def record_labels(epochs: np.ndarray, steps: np.ndarray) -> list[str]:
    """Unique, short labels of the records (slider options, URL values): the epoch with as few decimals as
    tell them apart, else with the step."""
    for digits in (2, 3, 4):
        labels = [f"{e:.{digits}f}" for e in epochs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{e:.2f} (step {int(t)})" for e, t in zip(epochs, steps)]


EPOCH_HELP = ("Epoch = optimizer steps taken ÷ steps per epoch, on every chart. Metrics are measured after each "
              "epoch (1, 2, …); a record is taken during a step, before that step's update, so the last record "
              "of a 20-epoch run sits at 19.97 (its last step).")


# ---- URL-bound controls -----------------------------------------------------------------------------------
URL = "query-params"   # bind=URL: the control's value lives in the page's URL (key = parameter name)
# Streamlit leaves a bound control out of the URL while it shows its default. That suits controls whose default
# depends only on the chosen run (layer, record, replay settings). Controls whose default depends on the
# runs folder's content (which run, which run to overlay or compare) are written to the URL always
# (`url_selectbox`), so a shared URL reopens the same view after new runs appear.


def url_selectbox(label: str, options: list, key: str, default, container=st, **kwargs):
    """A selectbox whose value is always in the URL (`?key=value`); a value in the URL wins when a session
    starts (a shared link)."""
    options = list(options)
    _from_url(key, options)
    keep_valid(key, options)
    value = container.selectbox(label, options, index=options.index(default) if default in options else 0,
                                key=key, **kwargs)
    if st.query_params.get(key) != str(value):  # write only changes: a write resends the whole query string
        st.query_params[key] = str(value)
    return value


def url_multiselect(label: str, options: list, key: str, default: list, container=st, **kwargs) -> list:
    """A multiselect whose values are always in the URL (`?key=a&key=b`)."""
    options = list(options)
    if key not in st.session_state and key in st.query_params:
        given = [v for v in st.query_params.get_all(key) if v in options]
        if given:
            st.session_state[key] = given
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]
    value = container.multiselect(label, options, default=[d for d in default if d in options]
                                  if key not in st.session_state else None, key=key, **kwargs)
    if st.query_params.get_all(key) != [str(v) for v in value]:
        st.query_params[key] = [str(v) for v in value]
    return value


def _from_url(key: str, options: list) -> None:
    if key not in st.session_state and st.query_params.get(key) in options:
        st.session_state[key] = st.query_params[key]


# ---- run picker -------------------------------------------------------------------------------------------
def run_picker(label: str, key: str = "run", rows: list[dict] | None = None,
               prefer: Callable[[dict], bool] | None = None, help: str | None = None,
               container=st) -> dict | None:
    """A selectbox of runs by folder name, always in the URL (`?run=<folder>`); returns the chosen row (its
    settings are shown under it)."""
    rows = ok_runs() if rows is None else rows
    if not rows:
        return None
    ids = [r["run_id"] for r in rows]
    by_id = {r["run_id"]: r for r in rows}
    default = next((r["run_id"] for r in rows if prefer(r)), ids[0]) if prefer else ids[0]
    chosen = url_selectbox(label, ids, key, default, container=container, help=help)
    row = by_id.get(chosen, by_id[default])
    container.caption(f"{plain(describe(row))} · {plain(row['status'])}")
    return row


def layer_picker(run, key: str = "layer", all_layers: bool = False, container=st) -> int | None:
    """A selectbox of the run's quantized layers by module path, bound to the URL (`?layer=fc2`);
    returns the layer index (None = all layers when offered)."""
    names = [str(lay["name"]) for lay in run.layers]
    options = (["all layers"] if all_layers else []) + names
    keep_valid(key, options)
    # one layer by default (its weights can be drawn on their grid); "all layers" is the first option
    chosen = container.selectbox("Layer", options, index=1 if all_layers else 0, key=key, bind=URL)
    if chosen == "all layers":
        container.caption(f"{len(names)} quantized layers, {run.n_weights:,} weights")
        return None
    i = names.index(chosen)
    lay = run.layers[i]
    container.caption(f"shape {tuple(lay['shape'])} · {int(lay['numel']):,} weights · {lay.get('bits', '?')} bit "
                      f"· {plain(lay.get('kind', ''))}")
    return i


def keep_valid(key: str, options) -> None:
    """Forget a widget's remembered value when it is not among its current options (e.g. another run)."""
    if key in st.session_state and st.session_state[key] not in list(options):
        del st.session_state[key]


def prefer_baseline(row) -> bool:
    return row.get("rule") == "none" and row.get("status") == "complete"


def page_start(title: str, caption: str, rows: list[dict] | None = None) -> list[dict] | None:
    """A page's title and caption, then the runs it can show (default: every readable run with records);
    None, after saying how to train one, when there is none."""
    st.title(title)
    st.caption(caption)
    rows = ok_runs() if rows is None else rows
    if not rows:
        no_runs_message()
        return None
    return rows


def no_runs_message() -> None:
    folder = runs_folder()
    st.info(
        f"No run in **{plain(folder)}** yet. Train one on the **Train** page, or from a terminal:\n\n"
        f"```\npython -m lts_core train --model mlp --dataset digits --bits 2 --rule lts --epochs 30 "
        f"--out {folder}/my-first-run\n```\n"
        "(`--rule none` records a baseline QAT run that the Sweep page can replay any threshold on). "
        "Set `SCRATCHOFF_RUNS` to read runs from another folder.")


# ---- navigation -------------------------------------------------------------------------------------------
def register_pages(pages: dict) -> None:
    """Called by the entry point: page key -> st.Page, so pages can link to each other."""
    st.session_state["_scratchoff_pages"] = pages


def page_link(key: str, label: str, icon: str | None = None) -> None:
    pages = st.session_state.get("_scratchoff_pages") or {}
    if key in pages:
        st.page_link(pages[key], label=label, icon=icon)
    else:
        st.caption(f"→ open the **{label}** page from the app's navigation")


# ---- errors -----------------------------------------------------------------------------------------------
def guard(body: Callable[[], None]) -> None:
    """Run a page body: engine/run errors become a clear st.error (plain text), never a traceback.

    `lts_core.config` (which imports torch: seconds on a first view) is not imported here: a `ConfigError` can
    only come from a body that imported it already."""
    try:
        body()
    except RunError as e:
        st.error(f"This run cannot be read: {plain(e)}")
    except (ValueError, KeyError, IndexError, OSError) as e:
        config = sys.modules.get("lts_core.config")
        if config is not None and isinstance(e, config.ConfigError):
            st.error(plain(e))
            return
        if os.environ.get("SCRATCHOFF_DEBUG"):
            raise
        st.error(f"Cannot show this view: {plain(e)}")
    except Exception as e:  # last resort: a message, not a traceback
        if os.environ.get("SCRATCHOFF_DEBUG"):
            raise
        st.error(f"Unexpected error ({type(e).__name__}): {plain(e)}")
        with st.expander("details for a bug report"):
            st.code("".join(traceback.format_exception_only(type(e), e)))


# ---- plot helpers -----------------------------------------------------------------------------------------
def figure(title: str | None = None, x: str | None = None, y: str | None = None, height: int = 360,
           hovermode: str = "x unified") -> "go.Figure":
    """A Plotly figure in the app's style (pages other than the first views: see `charts`). Plotly is imported
    here, not when the app starts: the Runs page, the cold start's first view, does not need it."""
    import plotly.graph_objects as go
    fig = go.Figure()
    fig.update_layout(
        title=dict(text=title) if title else None, height=height, hovermode=hovermode,
        margin=dict(l=10, r=10, t=40 if title else 20, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0),
        xaxis_title=dict(text=x, standoff=4) if x else None, yaxis_title=y)
    return fig


def show(fig: "go.Figure", key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def series_controls(key: str, container=st) -> tuple[int, bool]:
    """Smoothing (EMA window in points, 1 = off) and log-scale toggles for a time-series chart."""
    c1, c2 = container.columns([3, 1])
    smooth = c1.select_slider("Smoothing (points)", [1, 2, 3, 5, 8, 13], value=1, key=f"{key}_smooth",
                              help="exponential moving average over about this many points; 1 = raw values")
    log = c2.toggle("log y", key=f"{key}_log")
    return int(smooth), bool(log)


def smoothed(y, window: int) -> np.ndarray:
    """Exponential moving average with span `window` (1 = unchanged); NaNs are carried through."""
    s = pd.Series(np.asarray(y, dtype=float))
    return s.to_numpy() if window <= 1 else s.ewm(span=window, adjust=True, ignore_na=True).mean().to_numpy()


def record_epochs(run) -> np.ndarray:
    return np.asarray(run.epochs, dtype=np.float64)


def download_bytes_parquet(df: pd.DataFrame) -> bytes:
    import io
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def weight_grid_shape(shape: Iterable[int]) -> tuple[int, int]:
    """2-D view of a weight tensor for display: [out, in·k…]; 1-D tensors as a near-square grid."""
    shape = [int(s) for s in shape]
    if len(shape) >= 2:
        return shape[0], int(np.prod(shape[1:]))
    n = shape[0] if shape else 1
    cols = int(math.ceil(math.sqrt(n)))
    return int(math.ceil(n / cols)), cols


def sample_grid(rows: int, cols: int, max_side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced row and column indices (at most max_side each)."""
    r = np.unique(np.linspace(0, rows - 1, min(rows, max_side)).round().astype(int))
    c = np.unique(np.linspace(0, cols - 1, min(cols, max_side)).round().astype(int))
    return r, c


# ---- replay settings shared by the Sweep, Distributions and Trajectories pages ------------------------------
K_SCHED, K_RATIO, K_WARM, K_DECAY = "schedule", "rho", "warmup", "decay"


@dataclass
class ReplaySettings:
    schedule: str
    ratio: float
    warmup_epochs: float
    decay: float

    def text(self) -> str:
        return (f"{SCHEDULE_NAMES.get(self.schedule, self.schedule)}, ρ={self.ratio:.4g}, warm-up "
                f"{self.warmup_epochs:.2f} epochs, m={self.decay:g}")


def own_settings(row) -> ReplaySettings:
    """The settings an LTS run trained with."""
    return ReplaySettings(row.get("schedule") or "linear", float(row.get("threshold") or 1.0),
                          warmup_epochs_of(row), float(row.get("decay") or 0.99))


def snap_ratio(x: float) -> float:
    """ρ on the replay's grid of 1/1024 Δ, within the offered range."""
    return float(min(max(round(float(x) / RATIO_STEP) * RATIO_STEP, 0.0), RATIO_MAX))


def max_warmup(row) -> float:
    return max(float(row.get("epochs") or 1) - 1.0, 0.0)


def snap_warmup(row, epochs: float) -> float:
    """Warm-up in epochs on the run's step grid (what the replay uses), within the offered range."""
    spe = float(row.get("steps_per_epoch") or 1)
    return float(min(max(round(float(epochs) * spe) / spe, 0.0), max_warmup(row)))


def replay_settings(row) -> ReplaySettings:
    """The replay settings last used for this run (Sweep/Distributions controls), else the run's own settings
    for an LTS run, else the LTS paper's defaults (linear growth to ρ = 1, 20% warm-up, m = 0.99)."""
    s = st.session_state.get("_replay_settings")
    if isinstance(s, dict) and s.get("path") == row["path"]:
        return ReplaySettings(s["schedule"], s["ratio"], s["warmup_epochs"], s["decay"])
    if is_lts(row):
        return own_settings(row)
    return ReplaySettings("linear", 1.0, warmup_epochs_of(row), 0.99)


def use_settings(s: ReplaySettings, row: dict) -> None:
    """Set the replay controls (before they are drawn in a run, or from a callback)."""
    ss = st.session_state
    ss[K_SCHED] = s.schedule if s.schedule in SCHEDULE_NAMES else "linear"
    ss[K_RATIO] = snap_ratio(s.ratio)
    ss[K_WARM] = snap_warmup(row, s.warmup_epochs)
    ss[K_DECAY] = float(s.decay) if float(s.decay) in DECAYS else 0.99


def _snap_controls(row: dict) -> None:
    """on_change: typed values go onto the grids the replay uses, so the controls show what is used."""
    ss = st.session_state
    if ss.get(K_RATIO) is not None:
        ss[K_RATIO] = snap_ratio(ss[K_RATIO])
    if ss.get(K_WARM) is not None:
        ss[K_WARM] = snap_warmup(row, ss[K_WARM])


def replay_controls(row: dict, start: ReplaySettings | None = None, container=st) -> ReplaySettings:
    """Schedule, ρ (typed, on the replay's 1/1024 Δ grid), warm-up (on the step grid) and decay, in the URL.

    Defaults: `start` (e.g. the overlaid actual LTS run's settings), else `replay_settings(row)`. Picking
    another run in the session resets the controls to its defaults; a shared URL's values win otherwise.
    """
    ss = st.session_state
    start = start or replay_settings(row)
    start = ReplaySettings(start.schedule if start.schedule in SCHEDULE_NAMES else "linear", snap_ratio(start.ratio),
                           snap_warmup(row, start.warmup_epochs),
                           float(start.decay) if float(start.decay) in DECAYS else 0.99)
    if ss.get("_replay_for") != row["path"]:
        if "_replay_for" in ss:       # another run picked in this session: start from its settings
            use_settings(start, row)
        ss["_replay_for"] = row["path"]
    c = container.columns(4)
    names = list(SCHEDULE_NAMES)
    schedule = c[0].selectbox("Schedule", names, index=names.index(start.schedule), key=K_SCHED, bind=URL,
                              format_func=lambda s: SCHEDULE_NAMES[s],
                              help="fixed: ρ_t = ρ; linear/sine-growth: ρ_t grows from 0 to ρ after warm-up")
    ratio = c[1].number_input("Threshold ratio ρ (Δ)", 0.0, RATIO_MAX, value=start.ratio, step=1 / 64,
                              format="%.4f", key=K_RATIO, bind=URL, on_change=_snap_controls, args=(row,),
                              help="freeze when the EMA distance ≤ ρ_t·Δ; for the growth schedules ρ is the final "
                                   "value (the paper uses 1). Type any value: it snaps to the replay's grid of "
                                   "1/1024 Δ, so this box shows the ρ actually used.")
    spe = float(row.get("steps_per_epoch") or 1)
    warm = c[2].number_input("Warm-up (epochs)", 0.0, max(max_warmup(row), 0.0), value=start.warmup_epochs,
                             step=1.0, format="%.2f", key=K_WARM, bind=URL, on_change=_snap_controls, args=(row,),
                             help=f"no weight freezes during the warm-up; snaps to whole steps ({spe:g} per epoch)")
    decay = c[3].select_slider("EMA decay m", DECAYS, value=start.decay, key=K_DECAY, bind=URL)
    s = ReplaySettings(schedule, snap_ratio(ratio), snap_warmup(row, warm), float(decay))
    ss["_replay_settings"] = {"path": row["path"], "schedule": s.schedule, "ratio": s.ratio,
                              "warmup_epochs": s.warmup_epochs, "decay": s.decay}
    return s
