"""Runs: every run of the runs folder with its status, settings and key figures; downloads."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common as C  # noqa: E402

C.leave_mpa_v1()

STATUS_ICON = {"complete": "✓ complete", "running": "running…", "interrupted": "interrupted",
               "failed": "✗ failed", "broken": "⚠ broken"}


def table(rows: list[dict]) -> pd.DataFrame:
    def p(x):
        return None if x is None else 100.0 * x

    return pd.DataFrame([{
        "run": r["run_id"], "status": STATUS_ICON.get(r["status"], r["status"]),
        "model": r.get("model"), "dataset": r.get("dataset"), "bits": r.get("bits"),
        "rule": r.get("rule"), "schedule": C.SCHEDULE_NAMES.get(r.get("schedule"), r.get("schedule")) if r.get("schedule") else "—",
        "threshold ρ (Δ)": r.get("threshold"), "epochs": f"{r.get('epochs_done', 0)}/{r.get('epochs') or '?'}",
        "test acc (%)": r.get("test_acc"), "FP acc (%)": r.get("fp_acc"),
        "updates eliminated (%)": p(r.get("updates_eliminated")),
        "backward FLOPs saved (%)": p(r.get("backward_flops_saved")),
    } for r in rows])


def overview(good: list[dict]) -> None:
    """The trade-off at a glance: final test accuracy against updates eliminated, one point per run."""
    pts = [r for r in good if r.get("test_acc") is not None]
    if not pts:
        return
    df = pd.DataFrame({"run": [r["run_id"] for r in pts], "rule": [r.get("rule") or "?" for r in pts],
                       "dataset": [r.get("dataset") or "?" for r in pts],
                       "updates eliminated (%)": [100 * (r.get("updates_eliminated") or 0) for r in pts],
                       "final test accuracy (%)": [r["test_acc"] for r in pts]})
    st.markdown("**Accuracy vs updates eliminated** (one point per run)")
    st.scatter_chart(df, x="updates eliminated (%)", y="final test accuracy (%)", color="dataset", size=120,
                     height=280)


def body() -> None:
    st.title("Runs")
    folder = C.runs_folder()
    st.caption(f"Every run under `{folder}` (and one level down, e.g. sweep folders). New runs appear by "
               "themselves; shipped examples and your own runs are listed together.")
    rows = C.all_runs()
    if not rows:
        C.no_runs_message()
        return

    broken = [r for r in rows if not r["ok"]]
    good = [r for r in rows if r["ok"]]
    c1, c2, c3 = st.columns(3)
    c1.metric("Runs", len(rows))
    c2.metric("Complete", sum(r["status"] == "complete" for r in good))
    c3.metric("Broken", len(broken))

    overview(good)
    num = st.column_config.NumberColumn
    st.dataframe(table(rows), hide_index=True, width="stretch", column_config={
        "test acc (%)": num(format="%.2f"), "FP acc (%)": num(format="%.2f"),
        "updates eliminated (%)": num(format="%.1f"), "backward FLOPs saved (%)": num(format="%.1f"),
        "threshold ρ (Δ)": num(format="%g")})

    for r in broken:
        st.error(f"**{r['run_id']}** is broken and cannot be opened: {r['error']}")
    for r in good:
        if r["status"] == "failed":
            st.warning(f"**{r['run_id']}** failed: {r.get('reason') or 'no reason recorded'}")

    if not good:
        return
    st.subheader("One run")
    row = C.run_picker("Run", key="runs_run", rows=good)
    run = C.load_run(row)
    st.markdown(f"**{row['run_id']}** — {C.describe(row)}")
    if row["status"] in ("interrupted", "failed") and row.get("reason"):
        st.caption(f"Status {row['status']}: {row['reason']}")
    c = st.columns(5)
    c[0].metric("Final test accuracy", "—" if row["test_acc"] is None else f"{row['test_acc']:.2f}%")
    c[1].metric("FP accuracy", "—" if row["fp_acc"] is None else f"{row['fp_acc']:.2f}%")
    c[2].metric("Updates eliminated", C.pct(row["updates_eliminated"]))
    c[3].metric("Backward FLOPs saved", C.pct(row["backward_flops_saved"]))
    c[4].metric("Records × weights", f"{row.get('n_records', 0)} × {row.get('n_weights') or 0:,}")

    m = run.metrics
    if len(m):
        fig = C.figure("Test accuracy and frozen fraction", "epoch", "%")
        fig.add_scatter(x=m["epoch"], y=m["test_acc"], name="test accuracy (%)", mode="lines+markers",
                        hovertemplate="%{y:.2f}%")
        if row.get("rule") != "none":
            fig.add_scatter(x=m["epoch"], y=100 * m["frozen_fraction"], name="frozen fraction (%)",
                            mode="lines+markers", hovertemplate="%{y:.1f}%")
        C.show(fig, key="runs_fig")
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
