"""Shared helpers of the scratchoff app: runs-folder discovery, cached loaders, plot helpers, run picker.

Everything here is glue between Streamlit and the engine's public API (`lts_core.store`,
`lts_core.analysis`, `lts_core.schedules`, `lts_core.config`); no training or analysis logic lives here.
"""
from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from lts_core.store import RunError, list_runs, open_run, runs_dir

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
METRICS = "metrics.parquet"
SCHEDULE_NAMES = {"fixed": "fixed", "linear": "linear-growth", "sine": "sine-growth"}
DECAYS = [0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]
SETUP_KEYS = ("model", "dataset", "bits", "quantizer", "width", "seed", "epochs", "fp_epochs", "batch_size",
              "max_train", "act_bits", "first_last_bits")
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22"]


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


def _fmt_float(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _row_for(entry, group: str | None) -> dict:
    display = f"{group}/{entry.run_id}" if group else entry.run_id
    row: dict[str, Any] = {"path": str(entry.path), "run_id": display, "group": group, "ok": entry.ok,
                           "error": entry.error, "status": entry.status, "created": entry.created}
    manifest = entry.manifest or {}
    cfg = manifest.get("config") or {}
    rule = manifest.get("rule") or {}
    settings = rule.get("settings") or {} if isinstance(rule, dict) else {}
    rule_name = cfg.get("rule") or (rule.get("name") if isinstance(rule, dict) else None) or \
        ("none" if manifest else None)
    epochs = cfg.get("epochs")
    spe = manifest.get("steps_per_epoch")
    warm = cfg.get("warmup_epochs")
    warm_steps = settings.get("warmup_steps", manifest.get("warmup_steps"))  # the engine's, for every rule
    if warm_steps is not None and spe:
        warm = warm_steps / spe
    elif warm is None and epochs:
        warm = 0.2 * epochs
    threshold = settings.get("ratio", cfg.get("threshold"))
    if threshold is None and rule_name == "lts":
        threshold = 0.1 if cfg.get("schedule") == "fixed" else 1.0
    row.update(
        label=manifest.get("label"), model=cfg.get("model"), dataset=cfg.get("dataset"), bits=cfg.get("bits"),
        quantizer=cfg.get("quantizer"), rule=rule_name,
        schedule=(settings.get("schedule") or cfg.get("schedule")) if rule_name == "lts" else None,
        threshold=threshold if rule_name == "lts" else None,
        decay=(settings.get("decay", cfg.get("decay")) if rule_name == "lts" else None),
        warmup_epochs=warm, epochs=epochs, fp_epochs=cfg.get("fp_epochs"), seed=cfg.get("seed"),
        steps_per_epoch=spe, total_steps=manifest.get("total_steps"), record_every=manifest.get("record_every"),
        n_weights=manifest.get("n_weights"), device=manifest.get("device"),
        fp_acc=_fmt_float(manifest.get("fp_test_acc")), reason=None, epochs_done=0, test_acc=None,
        updates_eliminated=None, backward_flops_saved=None, setup=tuple(cfg.get(k) for k in SETUP_KEYS),
    )
    if entry.ok:
        run = entry.run
        row["reason"] = run.reason
        row["n_records"] = run.n_records
        try:
            m = run.metrics
        except RunError as e:
            row.update(ok=False, status="broken", error=str(e))
            return row
        if len(m):
            last = m.iloc[-1]
            row.update(epochs_done=int(len(m)), test_acc=_fmt_float(last.get("test_acc")),
                       updates_eliminated=_fmt_float(last.get("updates_eliminated")),
                       backward_flops_saved=_fmt_float(last.get("backward_flops_saved")))
    return row


@st.cache_data(show_spinner=False, max_entries=16, ttl=5)
def _scan(folder: str, fp: tuple) -> list[dict]:
    rows = [_row_for(e, e.group) for e in list_runs(folder)]
    rows.sort(key=lambda r: (r["created"] if r["created"] is not None else -math.inf, r["run_id"]),
              reverse=True)
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


# ---- cached loaders ---------------------------------------------------------------------------------------
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
    """(ReplayResult, OscReplay) of oscillation freezing (Nagel et al. 2022) replayed on the run."""
    return _osc(row["path"], run_stamp(row["path"]))


@st.cache_data(show_spinner="Replaying LTS weight by weight…", max_entries=32)
def _freeze_steps(path: str, stamp: tuple, schedule: str, ratio: float, warmup_steps: int, decay: float):
    from lts_core.analysis import replay_freeze_steps
    return replay_freeze_steps(_open(path, stamp), schedule=schedule, ratio=float(ratio),
                               warmup_steps=int(warmup_steps), decay=float(decay))


def replay_freeze_steps_cached(row, schedule: str, ratio: float, warmup_steps: int, decay: float) -> np.ndarray:
    return _freeze_steps(row["path"], run_stamp(row["path"]), schedule, float(ratio), int(warmup_steps),
                         float(decay))


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


def describe(row) -> str:
    """A short config summary: 'mlp · digits · 2 bit · LTS linear-growth ρ=1 · 10 ep'."""
    if not row.get("ok") and not row.get("model"):
        return "—"
    rule = row.get("rule") or "none"
    if rule == "lts":
        r = f"LTS {SCHEDULE_NAMES.get(row.get('schedule'), row.get('schedule'))} ρ={_g(row.get('threshold'))}"
    elif rule == "osc":
        r = "oscillation freezing"
    else:
        r = "baseline QAT"
    bits = f"{row.get('bits')} bit" if row.get("bits") is not None else "? bit"
    ep = f"{row.get('epochs')} ep" if row.get("epochs") else ""
    return " · ".join(x for x in (row.get("model"), row.get("dataset"), bits, r, ep) if x)


def _g(x) -> str:
    return "?" if x is None else f"{float(x):g}"


def run_label(row) -> str:
    return f"{row['run_id']}  —  {describe(row)}  [{row['status']}]"


def pct(x, digits: int = 1) -> str:
    x = _fmt_float(x)
    return "—" if x is None else f"{100 * x:.{digits}f}%"


# ---- run picker -------------------------------------------------------------------------------------------
def run_picker(label: str, key: str, rows: list[dict] | None = None, prefer: Callable[[dict], bool] | None = None,
               help: str | None = None, container=st) -> dict | None:
    """A selectbox of runs (kept across pages); returns the chosen row or None when there is none."""
    rows = ok_runs() if rows is None else rows
    if not rows:
        return None
    paths = [r["path"] for r in rows]
    by_path = {r["path"]: r for r in rows}
    if key in st.session_state and st.session_state[key] not in by_path:
        del st.session_state[key]
    index = 0
    if prefer is not None:
        index = next((i for i, r in enumerate(rows) if prefer(r)), 0)
    if key in st.session_state:
        index = paths.index(st.session_state[key])
    chosen = container.selectbox(label, paths, index=index, key=key, help=help,
                                 format_func=lambda p: run_label(by_path[p]) if p in by_path else p)
    return by_path.get(chosen)


def run_key(prefix: str, row: dict) -> str:
    """A widget key tied to one run, so that a widget whose options depend on the run (epochs, layers,
    matching runs) is created afresh when another run is picked instead of showing a stale choice."""
    return f"{prefix}@{row['path']}"


def keep_valid(key: str, options) -> None:
    """Forget a widget's remembered value when it is not among its current options (e.g. another run)."""
    if key in st.session_state and st.session_state[key] not in list(options):
        del st.session_state[key]


def prefer_baseline(row) -> bool:
    return row.get("rule") == "none" and row.get("status") == "complete"


def no_runs_message() -> None:
    folder = runs_folder()
    st.info(
        f"No run in **{folder}** yet. Train one on the **Train** page, or from a terminal:\n\n"
        f"```\npython -m lts_core train --model mlp --dataset digits --bits 2 --rule lts --epochs 30 "
        f"--out {folder}/my-first-run\n```\n"
        "(`--rule none` records a baseline QAT run that the Sweep page can replay any threshold on). "
        "Set `SCRATCHOFF_RUNS` to read runs from another folder.")


# ---- navigation -------------------------------------------------------------------------------------------
def leave_mpa_v1() -> None:
    """Make sure the entry point's st.navigation is in charge.

    Streamlit still treats `app/pages/` as a v1 "pages directory" on a fresh server until the entry point has
    called st.navigation once, so a first visit straight to e.g. /sweep would run the page without the app's
    navigation. Switching that flag off and rerunning runs the entry point (v2), which then shows the
    requested page. Harmless (a no-op) when the page runs standalone or under st.navigation already.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - other Streamlit versions
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


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
    """Run a page body: engine/run errors become a clear st.error, never a traceback."""
    from lts_core.config import ConfigError
    try:
        body()
    except RunError as e:
        st.error(f"This run cannot be read: {e}")
    except ConfigError as e:
        st.error(str(e))
    except (ValueError, KeyError, IndexError, OSError) as e:
        if os.environ.get("SCRATCHOFF_DEBUG"):
            raise
        st.error(f"Cannot show this view: {e}")
    except Exception as e:  # last resort: a message, not a traceback
        if os.environ.get("SCRATCHOFF_DEBUG"):
            raise
        st.error(f"Unexpected error ({type(e).__name__}): {e}")
        with st.expander("details for a bug report"):
            st.code("".join(traceback.format_exception_only(type(e), e)))


# ---- plot helpers -----------------------------------------------------------------------------------------
def figure(title: str | None = None, x: str | None = None, y: str | None = None, height: int = 360,
           hovermode: str = "x unified") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=dict(text=title) if title else None, height=height, hovermode=hovermode,
        margin=dict(l=10, r=10, t=40 if title else 20, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
        xaxis_title=x, yaxis_title=y)
    return fig


def show(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


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


@dataclass
class ReplaySettings:
    schedule: str
    ratio: float
    warmup_epochs: float
    decay: float


def replay_settings(row) -> ReplaySettings:
    """The sweep page's current settings (shared with Trajectories), else the run's own/default settings."""
    s = st.session_state.get("replay_settings")
    if isinstance(s, dict) and s.get("path") == row["path"]:
        return ReplaySettings(s["schedule"], s["ratio"], s["warmup_epochs"], s["decay"])
    if is_lts(row):
        return ReplaySettings(row.get("schedule") or "linear", float(row.get("threshold") or 1.0),
                              warmup_epochs_of(row), float(row.get("decay") or 0.99))
    if isinstance(s, dict):
        return ReplaySettings(s["schedule"], s["ratio"], min(s["warmup_epochs"], float(row.get("epochs") or 1)),
                              s["decay"])
    return ReplaySettings("linear", 1.0, warmup_epochs_of(row), 0.99)
