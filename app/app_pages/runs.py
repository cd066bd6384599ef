"""Runs: every run of the runs folder with its status, settings and key figures; curves; downloads."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common as C  # noqa: E402
from charts import Chart  # noqa: E402

STATUS_TEXT = {"complete": "✓ complete", "running": "running…", "interrupted": "interrupted",
               "failed": "✗ failed", "broken": "⚠ broken"}
POLL_SECONDS = 3.0


def table(rows: list[dict]) -> pd.DataFrame:
    def p(x):
        return None if x is None else 100.0 * x

    def setup(r):
        parts = [r.get("model"), r.get("dataset"), f"{r['bits']} bit" if r.get("bits") is not None else None,
                 C.rule_text(r) if r.get("ok") else None]
        return " · ".join(str(x) for x in parts if x) or "—"

    return pd.DataFrame([{
        "run": r["run_id"], "status": STATUS_TEXT.get(r["status"], str(r["status"])), "setup": setup(r),
        "epochs": f"{r.get('epochs_done', 0)}/{r.get('epochs') or '?'}",
        "test acc (%)": r.get("test_acc"), "FP acc (%)": r.get("fp_acc"),
        "upd. elim., q-weights (%)": p(r.get("updates_eliminated")),
        "upd. elim., all params (%)": p(r.get("updates_eliminated_all_params")),
        **C.savings_columns(r),
    } for r in rows])


def overview(good: list[dict]) -> None:
    """The trade-off at a glance: final test accuracy against updates eliminated, one point per run; colour by
    rule, another shape for runs that did not complete. A Vega-Lite chart: it draws about 1 s sooner than the
    first Plotly chart of a fresh page (cold start, BENCHMARKS.md)."""
    pts = [r for r in good if r.get("test_acc") is not None]
    if not pts:
        return
    df = pd.DataFrame({
        "run": [r["run_id"] for r in pts], "rule": [C.RULE_NAMES.get(r.get("rule"), str(r.get("rule"))) for r in pts],
        "setup": [C.describe(r) for r in pts],
        "finished": ["complete" if r["status"] == "complete" else f"not complete ({r['status']})" for r in pts],
        "updates eliminated (%)": [100 * (r.get("updates_eliminated") or 0) for r in pts],
        "final test accuracy (%)": [r["test_acc"] for r in pts]})
    xmax = max(10.0, float(df["updates eliminated (%)"].max()) * 1.08)
    st.markdown("**Accuracy vs updates eliminated** (one point per run; updates over the quantized weights)")
    st.vega_lite_chart(df, {
        "height": 280,
        "mark": {"type": "point", "filled": True, "size": 140, "opacity": 0.9},
        "encoding": {
            "x": {"field": "updates eliminated (%)", "type": "quantitative", "scale": {"domain": [-4, xmax]}},
            "y": {"field": "final test accuracy (%)", "type": "quantitative", "scale": {"zero": False}},
            "color": {"field": "rule", "type": "nominal", "legend": {"orient": "bottom"},
                      "scale": {"domain": list(C.RULE_NAMES.values()), "range": C.PALETTE[:len(C.RULE_NAMES)]}},
            "shape": {"field": "finished", "type": "nominal", "legend": {"orient": "bottom"}},
            "tooltip": [{"field": "run"}, {"field": "setup"}, {"field": "finished"},
                        {"field": "updates eliminated (%)", "format": ".1f"},
                        {"field": "final test accuracy (%)", "format": ".2f"}],
        }}, width="stretch", key="runs_overview")


@st.fragment(run_every=POLL_SECONDS)
def run_list() -> None:
    """The table, polled: a new, finished or broken run shows up while the page stays open."""
    folder = C.runs_folder()
    fp = C.fingerprint(folder)
    if st.session_state.get("_runs_fp") not in (None, fp):
        st.session_state["_runs_fp"] = fp
        C.refresh_runs()
        st.rerun()  # the whole page: the run picker below gets the new run too
    st.session_state["_runs_fp"] = fp
    rows = C.all_runs()
    if not rows:
        C.no_runs_message()
        return
    broken = [r for r in rows if not r["ok"]]
    good = [r for r in rows if r["ok"]]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Runs", len(rows))
    c2.metric("Complete", sum(r["status"] == "complete" for r in good))
    c3.metric("Running", sum(r["status"] == "running" for r in good))
    c4.metric("Broken", len(broken))
    overview(good)
    num = st.column_config.NumberColumn
    st.dataframe(table(rows), hide_index=True, width="stretch", placeholder="—", column_config={
        "run": st.column_config.TextColumn(width="medium", pinned=True),   # stays while scrolling sideways
        "status": st.column_config.TextColumn(width="small"),
        "setup": st.column_config.TextColumn(width="medium"),
        "epochs": st.column_config.TextColumn(width="small"),
        "test acc (%)": num(format="%.2f", width="small"), "FP acc (%)": num(format="%.2f", width="small"),
        "upd. elim., q-weights (%)": num(format="%.1f", width="small",
                                         help="weight updates eliminated, over the watched quantized weights"),
        "upd. elim., all params (%)": num(format="%.1f", width="small",
                                          help="the same, over all trainable parameters (the paper's denominator)"),
        **C.savings_column_config()})
    st.caption("*bwd accounted*: backward FLOPs saved as the paper reports them (a dense backward still computes "
               "them). *bwd skippable*: the structural share, in fully frozen channels, which a planned backward "
               "skips with `--bound-grad active`. *bwd s* and *step s*: measured wall-clock, summed over the "
               "epochs (compare runs trained on the same machine under the same load). '—': not recorded by that "
               "run. Scroll the table sideways for every column.")
    for r in broken:
        st.error(f"**{C.plain(r['run_id'])}** is broken and cannot be opened: {C.plain(r['error'])}")
    for r in good:
        if r["status"] == "failed":
            st.warning(f"**{C.plain(r['run_id'])}** failed: {C.plain(r.get('reason') or 'no reason recorded')}")


def seconds(x) -> str:
    return "—" if x is None else f"{x:,.1f} s"


def savings_metrics(row: dict) -> None:
    """Structural share and measured seconds of one run, beside the accounted figure."""
    c = st.columns(6)
    c[0].metric("Structurally skippable", C.pct(row.get("backward_flops_skippable")),
                help=C.SAVINGS_HELP["bwd skippable (%)"])
    c[1].metric("Backward seconds (measured)", seconds(row.get("backward_seconds")), help=C.SAVINGS_HELP["bwd s"])
    c[2].metric("Step seconds (measured)", seconds(row.get("step_seconds")), help=C.SAVINGS_HELP["step s"])
    how = row.get("granularity") or "weight"
    text = {"weight": "single weights", "channel": "whole output channels"}.get(how, how)
    if row.get("rule") == "lts":
        c[3].metric("LTS freezes", text, help="granularity: single weights (the paper) or whole output channels")
    if row.get("bound_grad"):
        c[4].metric("Bounds learn from", {"all": "all weights", "active": "unfrozen weights"}.get(
            row["bound_grad"], row["bound_grad"]), help="bound-grad: 'all' (the reference) keeps every weight in "
                                                        "the quantizer bounds' gradient, so frozen weights still "
                                                        "cost their weight-gradient GEMM; 'active' skips frozen "
                                                        "channels")


def time_curves(m: pd.DataFrame) -> None:
    """Measured seconds per epoch (whole steps and their backward passes), when the run recorded them."""
    if "step_seconds" not in m or "backward_seconds" not in m:
        st.caption("This run did not record its step and backward seconds (recorded since issue 10).")
        return
    top = float(np.nanmax(m[["step_seconds", "backward_seconds"]].to_numpy(dtype=float), initial=0.0))
    (Chart("Measured time per epoch", "epoch", "seconds (sum over its steps)", height=240,
           y_domain=[0, top * 1.05 or 1.0])
     .line("whole steps", m["epoch"], m["step_seconds"], C.color(0), fmt=".2f")
     .line("backward passes", m["epoch"], m["backward_seconds"], C.color(1), fmt=".2f")
     .show("runs_time"))


def curves(row: dict, m: pd.DataFrame) -> None:
    s, log = C.series_controls("runs_curves")
    left, right = st.columns(2)
    with left:
        fig = Chart("Test accuracy and frozen fraction", "epoch", "%", y_log=log)
        fig.line("test accuracy (%)", m["epoch"], C.smoothed(m["test_acc"], s), C.color(0), fmt=".2f")
        if row.get("rule") != "none":
            fig.line("frozen fraction (%)", m["epoch"], C.smoothed(100 * m["frozen_fraction"], s), C.color(1))
            fig.line("updates eliminated so far, over quantized weights (%)", m["epoch"],
                     C.smoothed(100 * m["updates_eliminated"], s), C.color(2), dash=[2, 3], points=False)
        fig.show("runs_fig")
    with right:
        fig = Chart("Train loss", "epoch", "cross-entropy (mean over the epoch)", y_log=log)
        if "train_loss" in m:
            fig.line("train loss", m["epoch"], C.smoothed(m["train_loss"], s), C.color(1), fmt=".4f")
        fig.show("runs_loss")


def body() -> None:
    st.title("Runs")
    folder = C.runs_folder()
    st.caption(f"Every run under {C.plain(folder)} (and one level down, e.g. sweep folders), named by its folder. "
               f"The list is re-read every {POLL_SECONDS:g} s: new, finished and broken runs appear by themselves.")
    run_list()
    good = [r for r in C.all_runs() if r["ok"]]
    if not good:
        return
    st.subheader("One run")
    row = C.run_picker("Run", rows=good)
    run = C.load_run(row)
    st.markdown(f"**{C.plain(row['run_id'])}** — {C.plain(C.describe(row))}")
    if row.get("manifest_id"):
        st.caption(f"Its manifest names it {C.plain(row['manifest_id'])} (a copied or renamed folder); the app "
                   "names runs by their folder.")
    if row["status"] in ("interrupted", "failed") and row.get("reason"):
        st.caption(f"Status {row['status']}: {C.plain(row['reason'])}")
    c = st.columns(6)
    c[0].metric("Final test accuracy", "—" if row["test_acc"] is None else f"{row['test_acc']:.2f}%")
    c[1].metric("FP accuracy", "—" if row["fp_acc"] is None else f"{row['fp_acc']:.2f}%")
    c[2].metric("Updates eliminated, of quantized weights", C.pct(row["updates_eliminated"]),
                help="share of weight updates skipped over the whole run, over the watched quantized weights "
                     "(the product's figure)")
    c[3].metric("… of all trainable params", C.pct(row.get("updates_eliminated_all_params")),
                help="the same frozen weight-steps over all trainable parameters (weights, biases, BatchNorm, "
                     "quantizer bounds): the paper's and the reference code's denominator. Compare this one with "
                     "the paper's 50–70%. '—' for runs recorded before both were stored.")
    c[4].metric("Backward FLOPs saved (accounted)", C.pct(row["backward_flops_saved"]),
                help="accounted as the paper does: the weight-gradient FLOPs of frozen weights")
    c[5].metric("Records × weights", f"{row.get('n_records', 0)} × {row.get('n_weights') or 0:,}")
    savings_metrics(row)
    if row.get("preset") == "reference":
        st.caption("Trained with the **reference preset** (every layer quantized, 2q − 1 output, the reference "
                   "code's optimizers and epoch length).")

    m = run.metrics
    if len(m):
        curves(row, m)
        time_curves(m)
    else:
        st.info("This run has not finished an epoch yet.")

    base = row["run_id"].replace("/", "_")
    d1, d2, _ = st.columns([1, 1, 3])
    d1.download_button("Metrics as CSV", m.to_csv(index=False).encode(), file_name=f"{base}-metrics.csv",
                       mime="text/csv", on_click="ignore", disabled=not len(m))
    d2.download_button("Metrics as Parquet", C.download_bytes_parquet(m), file_name=f"{base}-metrics.parquet",
                       mime="application/vnd.apache.parquet", on_click="ignore", disabled=not len(m))
    with st.expander("Manifest (settings, layers, device)"):
        st.json(run.manifest, expanded=False)


C.guard(body)
