"""Compare: two or more runs side by side — figures, accuracy, frozen fraction and settle curves."""
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


def body() -> None:
    st.title("Compare runs")
    rows = C.ok_runs(with_records=False)
    if not rows:
        C.no_runs_message()
        return
    by = {r["path"]: r for r in rows}
    paths = list(by)
    if "cmp_runs" in st.session_state:
        st.session_state["cmp_runs"] = [p for p in st.session_state["cmp_runs"] if p in by]
    else:
        # default: the newest baseline and the newest LTS run with the same setup, else the two newest runs
        base = next((r for r in rows if C.prefer_baseline(r)), rows[0])
        mate = next((r for r in rows if C.is_lts(r) and C.same_setup(r, base)), None)
        st.session_state["cmp_runs"] = [base["path"]] + ([mate["path"]] if mate else
                                                          [p for p in paths if p != base["path"]][:1])
    chosen = st.multiselect("Runs to compare (two or more)", paths, key="cmp_runs",
                            format_func=lambda p: C.run_label(by[p]))
    if len(chosen) < 2:
        st.info("Pick at least two runs.")
        if not chosen:
            return
    sel = [by[p] for p in chosen]

    st.dataframe(pd.DataFrame([{
        "run": r["run_id"], "setup": C.describe(r), "status": r["status"],
        "test acc (%)": r["test_acc"], "FP acc (%)": r["fp_acc"],
        "updates elim. (%)": None if r["updates_eliminated"] is None else 100 * r["updates_eliminated"],
        "bwd FLOPs saved (%)": None if r["backward_flops_saved"] is None else 100 * r["backward_flops_saved"],
        "epochs": r.get("epochs_done"),
    } for r in sel]), hide_index=True, width="stretch", column_config={
        "test acc (%)": st.column_config.NumberColumn(format="%.2f"),
        "FP acc (%)": st.column_config.NumberColumn(format="%.2f"),
        "updates elim. (%)": st.column_config.NumberColumn(format="%.1f", help="weight updates eliminated"),
        "bwd FLOPs saved (%)": st.column_config.NumberColumn(format="%.1f", help="backward-pass FLOPs saved")})

    acc = C.figure("Test accuracy", "epoch", "test accuracy (%)")
    frz = C.figure("Frozen fraction", "epoch", "frozen weights (%)")
    stl = C.figure("Weights at their final level (cumulative)", "epoch", "settled weights (%)")
    for i, r in enumerate(sel):
        run = C.load_run(r)
        m = run.metrics
        col = C.color(i)
        name = r["run_id"]
        if len(m):
            acc.add_scatter(x=m["epoch"], y=m["test_acc"], name=name, line=dict(color=col),
                            hovertemplate="%{y:.2f}%")
            frz.add_scatter(x=m["epoch"], y=100 * m["frozen_fraction"], name=name, line=dict(color=col),
                            hovertemplate="%{y:.1f}%")
        if run.n_records >= 2:
            s = C.settle(r)
            stl.add_scatter(x=C.record_epochs(run), y=100 * s.curve, name=name, line=dict(color=col),
                            hovertemplate="%{y:.1f}%")
    c1, c2 = st.columns(2)
    with c1:
        C.show(acc, key="cmp_acc")
    with c2:
        C.show(frz, key="cmp_frozen")
    C.show(stl, key="cmp_settle")
    st.caption("Settle curves are computed from each run's own records (the level a weight ends at, and the first "
               "record from which it stays there).")


C.guard(body)
