"""Settling: when do weights reach their final quantization level? Curves, histogram and a scratch-off grid."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import streamlit as st  # noqa: E402

import common as C  # noqa: E402


COATING = "#b9b9b9"


def level_colors(n_levels: int) -> list:
    """A discrete colour scale (dark = lowest level … yellow = highest; never grey, the coating's colour)."""
    import plotly.express as px
    n = max(int(n_levels), 1)
    cols = ["#440154"] if n == 1 else px.colors.sample_colorscale("Viridis", [i / (n - 1) for i in range(n)])
    scale = []
    for i, c in enumerate(cols):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


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
            c = st.columns(4)
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
        fig = C.figure("Weights at their final level (cumulative)", "epoch", "settled weights (%)")
        fig.add_scatter(x=epochs, y=100 * s.curve, name="all layers", mode="lines+markers",
                        line=dict(width=3, color=C.INK), hovertemplate="%{y:.1f}%")
        if len(s.layer_names) > 1:
            for i, name in enumerate(s.layer_names):
                fig.add_scatter(x=epochs, y=100 * s.layer_curves[i], name=C.plot_text(name), mode="lines",
                                line=dict(color=C.color(i)), hovertemplate="%{y:.1f}%")
        fig.add_vline(x=float(epochs[r]), line_dash="dot", line_color=C.INK)
        fig.update_yaxes(range=[0, 101])
        C.show(fig, key="settle_curve")
    with right:
        hist = s.histogram.astype(float)
        if not st.checkbox("include never-moved weights (epoch 0)", value=False, key="settle_hist_never",
                           help=f"{C.pct(fr['never_moved'])} of the weights never changed level"):
            hist[0] = np.nan
        kind = np.array(["converged later"] * R, dtype=object)
        kind[0], kind[-1] = "never moved", "still moving (last record)"
        colors = np.array([C.color(2)] * R, dtype=object)
        colors[0], colors[-1] = C.color(0), C.color(1)
        fig = C.figure("Settle epoch histogram", "settle epoch", "weights (%)", hovermode="closest")
        fig.add_bar(x=epochs, y=100 * hist / max(s.n_weights, 1), marker_color=list(colors),
                    customdata=np.stack([s.histogram, kind], axis=1),
                    hovertemplate="epoch %{x:.2f}<br>%{y:.2f}% of weights (%{customdata[0]:,.0f})"
                                  "<br>%{customdata[1]}<extra></extra>")
        C.show(fig, key="settle_hist")
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
    z = np.where(revealed, final, np.nan)
    coat = np.where(valid & ~revealed, 1.0, np.nan)
    settle_ep = epochs[np.clip(sr, 0, R - 1)]
    text = np.where(revealed,
                    np.char.add(np.char.add("final level ", final.astype(int).astype(str)),
                                np.char.add(" · settled at epoch ", np.char.mod("%.2f", settle_ep))),
                    "not yet settled (scratch-off coating)")
    text = np.where(valid, text, "")
    n_rev, n_cells = int(revealed.sum()), int(valid.sum())
    c = st.columns(3)
    c[0].metric("Revealed cells", f"{n_rev:,} / {n_cells:,}")
    c[1].metric("Revealed in this layer (all weights)",
                C.pct(float(s.layer_curves[li][r])))
    c[2].metric("Shown", f"{len(ri)} × {len(ci)}" + (" (sample)" if len(ri) * len(ci) < n else ""))
    fig = go.Figure()
    fig.add_heatmap(z=coat, x=ci, y=ri, colorscale=[[0, COATING], [1, COATING]], showscale=False,
                    text=text, hovertemplate="row %{y}, col %{x}<br>%{text}<extra></extra>", xgap=1, ygap=1)
    fig.add_heatmap(z=z, x=ci, y=ri, zmin=-0.5, zmax=n_levels - 0.5, colorscale=level_colors(n_levels),
                    text=text, hovertemplate="row %{y}, col %{x}<br>%{text}<extra></extra>", xgap=1, ygap=1,
                    colorbar=dict(title="final level", tickvals=list(range(n_levels))))
    fig.update_layout(height=620, margin=dict(l=10, r=10, t=30, b=10),
                      title=dict(text=f"layer {C.plot_text(lay['name'])} at epoch {labels[r]}"),
                      xaxis_title="input index (sampled)", yaxis_title="output index (sampled)")
    fig.update_xaxes(constrain="domain")
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    C.show(fig, key="settle_grid")


C.guard(body)
