"""Compare: two or more runs side by side — figures, accuracy, train loss, frozen fraction and settle curves."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common as C  # noqa: E402


def default_pair(rows: list[dict]) -> list[str]:
    """The newest baseline and the newest LTS run with the same setup, else the two newest runs."""
    base = next((r for r in rows if C.prefer_baseline(r)), rows[0])
    mate = next((r for r in rows if C.is_lts(r) and C.same_setup(r, base)), None)
    ids = [r["run_id"] for r in rows]
    return [base["run_id"]] + ([mate["run_id"]] if mate else [i for i in ids if i != base["run_id"]][:1])


def body() -> None:
    st.title("Compare runs")
    rows = C.ok_runs(with_records=False)
    if not rows:
        C.no_runs_message()
        return
    by = {r["run_id"]: r for r in rows}
    ids = list(by)
    chosen = C.url_multiselect("Runs to compare (two or more)", ids, "cmp", default_pair(rows))
    if len(chosen) < 2:
        st.info("Pick at least two runs.")
        if not chosen:
            return
    sel = [by[i] for i in chosen]

    st.dataframe(pd.DataFrame([{
        "run": r["run_id"], "setup": C.describe(r), "status": r["status"],
        "test acc (%)": r["test_acc"], "FP acc (%)": r["fp_acc"],
        "upd. elim., q-weights (%)": None if r["updates_eliminated"] is None else 100 * r["updates_eliminated"],
        "upd. elim., all params (%)": None if r.get("updates_eliminated_all_params") is None
        else 100 * r["updates_eliminated_all_params"],
        **C.savings_columns(r),
        "backward ÷ first run": ratio(r.get("backward_seconds"), sel[0].get("backward_seconds")),
        "step ÷ first run": ratio(r.get("step_seconds"), sel[0].get("step_seconds")),
        "epochs": r.get("epochs_done"),
    } for r in sel]), hide_index=True, width="stretch", placeholder="—", column_config={
        "run": st.column_config.TextColumn(pinned=True),   # stays while scrolling sideways
        "setup": st.column_config.TextColumn(width="large"),
        "test acc (%)": st.column_config.NumberColumn(format="%.2f"),
        "FP acc (%)": st.column_config.NumberColumn(format="%.2f"),
        "upd. elim., q-weights (%)": st.column_config.NumberColumn(
            format="%.1f", help="weight updates eliminated, over the watched quantized weights"),
        "upd. elim., all params (%)": st.column_config.NumberColumn(
            format="%.1f", help="the same frozen weight-steps over all trainable parameters (the paper's "
                                "denominator); empty for runs recorded before it was stored"),
        **C.savings_column_config(),
        "backward ÷ first run": st.column_config.NumberColumn(
            format="%.2f", help=f"measured backward seconds ÷ those of the first run listed "
                                f"({sel[0]['run_id']}); same epochs and machine load needed for a fair ratio"),
        "step ÷ first run": st.column_config.NumberColumn(
            format="%.2f", help=f"measured step seconds ÷ those of the first run listed ({sel[0]['run_id']})")})
    st.caption("Accounted FLOPs are the paper's bookkeeping; structurally skippable FLOPs lie in fully frozen "
               "channels; bwd s and step s are measured wall-clock (sums over the epochs). Timings depend on "
               "the machine and its load while each run trained: compare runs trained side by side.")

    s, log = C.series_controls("cmp_curves")
    acc = C.figure("Test accuracy", "epoch", "test accuracy (%)")
    loss = C.figure("Train loss", "epoch", "cross-entropy (mean over the epoch)")
    frz = C.figure("Frozen fraction", "epoch", "frozen weights (%)")
    stl = C.figure("Weights at their final level (cumulative)", "epoch", "settled weights (%)")
    bwd = C.figure("Measured backward seconds per epoch", "epoch", "seconds (sum over the epoch's steps)")
    stp = C.figure("Measured step seconds per epoch", "epoch", "seconds (sum over the epoch's steps)")
    timed = False
    for i, r in enumerate(sel):
        run = C.load_run(r)
        m = run.metrics
        col = C.color(i)
        name = C.plot_text(r["run_id"])
        if len(m):
            acc.add_scatter(x=m["epoch"], y=C.smoothed(m["test_acc"], s), name=name, line=dict(color=col),
                            hovertemplate="%{y:.2f}%")
            if "train_loss" in m:
                loss.add_scatter(x=m["epoch"], y=C.smoothed(m["train_loss"], s), name=name, line=dict(color=col),
                                 hovertemplate="%{y:.4f}")
            frz.add_scatter(x=m["epoch"], y=C.smoothed(100 * m["frozen_fraction"], s), name=name,
                            line=dict(color=col), hovertemplate="%{y:.1f}%")
            if "backward_seconds" in m and "step_seconds" in m:
                timed = True
                bwd.add_scatter(x=m["epoch"], y=m["backward_seconds"], name=name, line=dict(color=col),
                                hovertemplate="%{y:.2f} s")
                stp.add_scatter(x=m["epoch"], y=m["step_seconds"], name=name, line=dict(color=col),
                                hovertemplate="%{y:.2f} s")
        if run.n_records >= 2:
            st_ = C.settle(r)
            stl.add_scatter(x=C.record_epochs(run), y=100 * st_.curve, name=name, line=dict(color=col),
                            hovertemplate="%{y:.1f}%")
    if log:
        for f in (acc, loss):
            f.update_yaxes(type="log")
    left, right = [(acc, "cmp_acc"), (frz, "cmp_frozen")], [(loss, "cmp_loss"), (stl, "cmp_settle")]
    if timed:
        for f in (bwd, stp):
            f.update_yaxes(rangemode="tozero")
        left.append((bwd, "cmp_backward_s"))
        right.append((stp, "cmp_step_s"))
    for col, figs in zip(st.columns(2), (left, right)):
        with col:
            for f, key in figs:
                C.show(f, key=key)
    st.caption("Settle curves are computed from each run's own records (the level a weight ends at, and the first "
               "record from which it stays there). " + C.EPOCH_HELP
               + ("" if timed else " None of these runs recorded step and backward seconds (recorded since "
                                   "issue 10)."))


def ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


C.guard(body)
