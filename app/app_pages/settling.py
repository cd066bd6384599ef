"""Settling: when do weights reach their final quantization level? Curves, histogram and a scratch-off grid."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

import common as C  # noqa: E402
from charts import Chart  # noqa: E402


COATING = "#b9b9b9"


def level_colors(n_levels: int) -> list[str]:
    """One colour per level (dark = lowest level … yellow = highest; never grey, the coating's colour)."""
    n = max(int(n_levels), 1)
    return [VIRIDIS[0]] if n == 1 else [VIRIDIS[round(i * (len(VIRIDIS) - 1) / (n - 1))] for i in range(n)]


VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
           "#fde725"]


def body() -> None:
    rows = C.page_start("Settling — when do weights reach their final level?",
                        "A weight has *settled* at the first record from which its quantization level equals its "
                        "final level and never changes again. LTS bets that most weights settle early and can be "
                        "frozen.")
    if rows is None:
        return
    row = C.run_picker("Run", rows=rows)
    run = C.load_run(row)
    s = C.settle(row)
    epochs = C.record_epochs(run)
    R = s.n_records
    if R < 2:
        st.warning("This run has a single record so far: settling needs at least two.")
        return

    c = st.columns(4)
    fr = s.fractions
    c[0].metric("Weights", f"{s.n_weights:,}")
    c[1].metric("Never moved", C.pct(fr["never_moved"]), help="same level at every record")
    c[2].metric("Converged later", C.pct(fr["converged_later"]),
                help="moved, then reached the final level before the last record and kept it")
    c[3].metric("Still moving", C.pct(fr["not_settled"]),
                help="level still changed between the last two records")
    if run.freeze_steps() is not None:
        fm = C.frozen_moved(row)
        if fm["frozen"]:
            c = st.columns([1, 1, 2])   # the link's label needs the width of two metrics
            c[0].metric("Frozen at the end", C.pct(fm["frozen"] / max(fm["n"], 1)), help=f"{fm['frozen']:,} weights")
            c[1].metric("Frozen, then on another level", C.pct(fm["moved"] / fm["frozen"]),
                        help=f"{fm['moved']:,} of the {fm['frozen']:,} frozen weights end on another level than the "
                             "one they froze on: a frozen weight keeps its value, but the learned bounds move")
            with c[2]:
                C.page_link("distributions", "See them on the Distributions page", icon=":material/bar_chart:")
    if row.get("record_every") and row.get("steps_per_epoch") and row["record_every"] > 1:
        st.caption(f"Recorded every {row['record_every']} steps ({row['record_every'] / row['steps_per_epoch']:g} "
                   "epoch): level changes between records are not seen.")

    # ---- epoch slider (drives the curve marker and the grid) ----
    labels = C.record_labels(epochs, run.steps)
    early = int(np.argmin(np.abs(epochs - 0.2 * float(row.get("epochs") or epochs[-1])))) or min(1, R - 1)
    C.keep_valid("record", labels)
    r = labels.index(st.select_slider("Record (epoch)", labels, value=labels[early], key="record", bind=C.URL,
                                      help="Scratch the coating off: weights settled by this epoch are revealed. "
                                           + C.EPOCH_HELP))

    left, right = st.columns(2)
    with left:
        fig = Chart("Weights at their final level (cumulative)", "epoch", "settled weights (%)", y_domain=[0, 101])
        fig.line("all layers", epochs, 100 * s.curve, C.INK, width=3)
        if len(s.layer_names) > 1:
            for i, name in enumerate(s.layer_names):
                fig.line(name, epochs, 100 * s.layer_curves[i], C.color(i), points=False)
        fig.vline(float(epochs[r]))
        fig.show("settle_curve")
    with right:
        hist = s.histogram.astype(float)
        if not st.checkbox("include never-moved weights (epoch 0)", value=False, key="settle_hist_never",
                           help=f"{C.pct(fr['never_moved'])} of the weights never changed level"):
            hist[0] = np.nan
        pct = 100 * hist / max(s.n_weights, 1)
        width = float(np.min(np.diff(epochs))) * 0.8 if R > 1 else 1.0
        mid = np.arange(R)
        mid = (mid > 0) & (mid < R - 1)
        Chart("Settle epoch histogram", "settle epoch", "weights (%)").bars(epochs, {
            "never moved (epoch 0)": (np.where(np.arange(R) == 0, pct, np.nan), C.color(0), s.histogram),
            "converged later": (np.where(mid, pct, np.nan), C.color(2), s.histogram),
            "still moving (last record)": (np.where(np.arange(R) == R - 1, pct, np.nan), C.color(1), s.histogram),
        }, width=width).show("settle_hist")
        st.caption("Green: converged later. Red (last record): still changing level at the end of the run. "
                   "Blue (epoch 0, when included): never moved.")

    # ---- scratch-off grid ----
    st.subheader("Scratch-off grid")
    st.caption("Each cell is one weight of the layer. Grey cells are still under the scratch-off coating (not "
               "yet settled at the slider's epoch); a revealed cell shows the weight's final level.")
    li = C.layer_picker(run)
    lay = run.layers[li]
    off, n = int(lay["offset"]), int(lay["numel"])
    rows_, cols_ = C.weight_grid_shape(lay["shape"])
    ri, ci = C.sample_grid(rows_, cols_, 64)
    flat = (ri[:, None] * cols_ + ci[None, :])
    valid = flat < n
    flat_c = np.where(valid, flat, 0)
    sr = s.settle_records[off:off + n][flat_c]
    final = s.final_levels[off:off + n][flat_c].astype(float)
    n_levels = int(lay.get("n_levels") or (int(final.max()) + 1))
    revealed = valid & (sr <= r)
    settle_ep = epochs[np.clip(sr, 0, R - 1)]
    n_rev, n_cells = int(revealed.sum()), int(valid.sum())
    c = st.columns(3)
    c[0].metric("Revealed cells", f"{n_rev:,} / {n_cells:,}")
    c[1].metric("Revealed in this layer (all weights)",
                C.pct(float(s.layer_curves[li][r])))
    c[2].metric("Shown", f"{len(ri)} × {len(ci)}" + (" (sample)" if len(ri) * len(ci) < n else ""))
    scratch_grid(ri, ci, final, revealed, valid, settle_ep, n_levels,
                 f"layer {lay['name']} at epoch {labels[r]}").show("settle_grid", width=620)


def scratch_grid(ri, ci, final, revealed, valid, settle_ep, n_levels: int, title: str) -> Chart:
    """The sampled weights of a layer as square cells: grey (the coating) until settled, then the final level's
    colour; hovering a cell gives its row, column, final level and settle epoch."""
    state = np.where(revealed, np.char.add("level ", final.astype(int).astype(str)), "not yet settled")
    rows, cols = np.meshgrid(ri, ci, indexing="ij")
    frame = {"row": rows[valid], "col": cols[valid], "state": state[valid],
             "settle epoch": np.where(revealed, settle_ep, np.nan)[valid]}
    domain = ["not yet settled"] + [f"level {k}" for k in range(n_levels)]
    chart = Chart(title, "input index (sampled)", "output index (sampled)", height=520, zoom=False, legend=False)
    return chart.custom(frame, {
        "mark": {"type": "rect", "stroke": None},
        "encoding": {
            "x": {"field": "col", "type": "ordinal", "axis": {"title": chart.x_title, "labelOverlap": "greedy"}},
            "y": {"field": "row", "type": "ordinal", "axis": {"title": chart.y_title, "labelOverlap": "greedy"}},
            "color": {"field": "state", "type": "nominal", "title": "final level",
                      "scale": {"domain": domain, "range": [COATING] + level_colors(n_levels)},
                      "legend": {"orient": "right"}},
            "tooltip": [{"field": "row"}, {"field": "col"}, {"field": "state", "title": "state"},
                        {"field": "settle epoch", "format": ".2f"}]}})


C.guard(body)
