"""Trajectories: distance to the level, its EMA and the level of chosen weights over training."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

import common as C  # noqa: E402
from lts_core import ratio_at  # noqa: E402


MODES = ["random sample", "most oscillating", "latest settling", "by index"]


def choose(row, layer: int, n_layer: int) -> tuple[np.ndarray, str]:
    c = st.columns([2, 1, 2])
    mode = c[0].radio("Which weights", MODES, key="traj_mode", horizontal=True)
    k = c[1].number_input("How many", 1, len(C.PALETTE), 6, key="traj_k",
                          help=f"up to {len(C.PALETTE)}, one colour each")
    if mode == "random sample":
        seed = c[2].number_input("Sample seed", 0, 10_000, 0, key="traj_seed")
        rng = np.random.default_rng(int(seed))
        return np.sort(rng.choice(n_layer, size=min(int(k), n_layer), replace=False)), \
            "a random sample of the layer's weights"
    if mode == "by index":
        text = c[2].text_input("Weight indices in the layer (comma-separated)", "0, 1, 2", key="traj_idx")
        try:
            idx = np.array([int(x) for x in text.replace(";", ",").split(",") if x.strip()], dtype=np.int64)
        except ValueError:
            st.error("Indices must be whole numbers separated by commas, e.g. `0, 17, 4095`.")
            return np.array([], dtype=np.int64), ""
        if idx.size == 0:
            st.info(f"Type the indices of the weights to show, e.g. `0, 17, {n_layer - 1}` "
                    f"(this layer has {n_layer:,} weights, indexed 0 … {n_layer - 1}).")
            return idx, ""
        bad = idx[(idx < 0) | (idx >= n_layer)]
        if bad.size:
            st.error(f"Index {int(bad[0])} is outside the layer (0 … {n_layer - 1}).")
            return np.array([], dtype=np.int64), ""
        if idx.size > len(C.PALETTE):
            st.caption(f"Showing the first {len(C.PALETTE)} of the {idx.size} indices (one colour each).")
        return idx[:len(C.PALETTE)], "the weights you picked"
    stats = C.layer_stats(row, layer)
    if mode == "most oscillating":
        order = np.argsort(-stats["osc_freq"], kind="stable")[:int(k)]
        return order, "the weights whose level reversed direction most often (oscillation frequency)"
    order = np.argsort(-stats["settle_record"], kind="stable")[:int(k)]
    return order, "the weights that reached their final level last"


def body() -> None:
    rows = C.page_start("Trajectories — one weight at a time",
                        "The distance of a weight to its nearest quantization level (in Δ, one quantization step), "
                        "the EMA of that distance that LTS watches, and the threshold band it must enter to be "
                        "frozen.")
    if rows is None:
        return
    c1, c2 = st.columns([3, 2])
    row = C.run_picker("Run", rows=rows, container=c1)
    run = C.load_run(row)
    if run.n_records < 2:
        st.warning("This run has fewer than two records so far.")
        return
    layer = C.layer_picker(run, container=c2)
    n_layer = int(run.layers[layer]["numel"])
    idx, why = choose(row, layer, n_layer)
    if idx.size == 0:
        return

    w = run.weights(idx, layer=layer)
    epochs = np.asarray(w["epoch"], dtype=float)
    steps = np.asarray(w["step"])
    total = int(row.get("total_steps") or steps[-1] + 1)
    is_actual = C.is_lts(row) and "freeze_step" in w
    if is_actual:
        s = C.ReplaySettings(row.get("schedule") or "linear", float(row.get("threshold") or 1.0),
                             C.warmup_epochs_of(row), float(row.get("decay") or 0.99))
        fs = np.asarray(w["freeze_step"])
        source = f"actual freeze steps of this LTS run ({C.plain(s.text())})"
    else:
        s = C.replay_settings(row)
        from lts_core.analysis import replay_freeze_steps
        W = C.epochs_to_steps(row, s.warmup_epochs)
        fs = replay_freeze_steps(steps, w["level"], w["dist_code"], schedule=s.schedule, ratio=s.ratio,
                                 warmup_steps=W, total_steps=total, decay=s.decay)
        source = f"replayed with the Sweep page's settings: {C.plain(s.text())}"
    W = C.epochs_to_steps(row, s.warmup_epochs)
    if "ema" in w:
        from lts_core.store import decode_codes
        ema, ema_src = decode_codes(w["ema"]), "recorded EMA"
    else:
        from lts_core.analysis import ema_trace
        ema, ema_src = ema_trace(steps, w["level"], w["dist_code"], s.decay), "replayed EMA"
    st.caption(f"Showing {why}. Freeze steps: {source}. EMA: {ema_src}.")
    if not is_actual:
        C.page_link("sweep", "Change the replay settings on the Threshold sweep page", icon=":material/tune:")

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.07, row_heights=[0.6, 0.4],
                        subplot_titles=("distance to the level and its EMA", "quantization level"))
    # threshold band (absolute threshold ρ_t in Δ)
    grid_steps = np.unique(np.concatenate([np.linspace(0, total - 1, 200).round(), steps])).astype(int)
    rho = np.array([ratio_at(int(t), s.schedule, s.ratio, W, total) for t in grid_steps])
    band = np.where(rho >= 0, rho, np.nan)
    g_ep = C.steps_to_epochs(row, grid_steps)
    fig.add_scatter(x=g_ep, y=np.zeros_like(band) + np.where(np.isnan(band), np.nan, 0.0), mode="lines",
                    line=dict(width=0), showlegend=False, hoverinfo="skip", row=1, col=1)
    fig.add_scatter(x=g_ep, y=band, mode="lines", fill="tonexty", fillcolor="rgba(46,160,44,0.18)",
                    line=dict(color="rgba(46,160,44,0.9)", dash="dot"), name="threshold ρ_t·Δ (freeze below)",
                    legendgroup="_key", hovertemplate="ρ_t = %{y:.3f} Δ", row=1, col=1)
    # the line styles, explained once in the legend
    fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(color=C.INK, width=1, dash="dot"),
                    name="dotted: distance to the level", legendgroup="_key", row=1, col=1)
    fig.add_scatter(x=[None], y=[None], mode="lines+markers", line=dict(color=C.INK, width=2.5),
                    marker=dict(size=4), name="solid: its EMA (LTS watches this)", legendgroup="_key", row=1, col=1)
    fig.add_scatter(x=[None], y=[None], mode="markers", marker=dict(symbol="x", size=11, color=C.INK),
                    name="✕: freeze step", legendgroup="_key", row=1, col=1)
    dist = np.asarray(w["dist"], dtype=float)
    lev = np.asarray(w["level"], dtype=int)
    for j, wi in enumerate(idx):
        col = C.color(j)
        name = f"w{int(wi)}"
        fig.add_scatter(x=epochs, y=dist[:, j], mode="lines", line=dict(color=col, width=1, dash="dot"),
                        name=f"{name} distance", legendgroup=name, showlegend=False,
                        hovertemplate=f"{name} distance %{{y:.3f}} Δ", row=1, col=1)
        fig.add_scatter(x=epochs, y=ema[:, j], mode="lines+markers", line=dict(color=col, width=2.5),
                        marker=dict(size=4), name=name, legendgroup=name,
                        hovertemplate=f"{name} EMA %{{y:.3f}} Δ", row=1, col=1)
        fig.add_scatter(x=epochs, y=lev[:, j], mode="lines+markers", line=dict(color=col, shape="hv"),
                        marker=dict(size=4), legendgroup=name, showlegend=False,
                        hovertemplate=f"{name} level %{{y}}", row=2, col=1)
        if fs[j] >= 0:
            fe = float(C.steps_to_epochs(row, fs[j]))
            r = min(int(np.searchsorted(steps, fs[j], side="right")) - 1, len(steps) - 1)
            fig.add_scatter(x=[fe], y=[ema[max(r, 0), j]], mode="markers",
                            marker=dict(symbol="x", size=13, color=col, line=dict(width=2)),
                            legendgroup=name, showlegend=False,
                            hovertemplate=f"{name} frozen at epoch {fe:.2f}<extra></extra>", row=1, col=1)
            fig.add_vline(x=fe, line_color=col, line_dash="dash", opacity=0.5, row=2, col=1)
    if W > 0:
        fig.add_vrect(x0=0, x1=C.steps_to_epochs(row, W), fillcolor="grey", opacity=0.1, line_width=0,
                      annotation_text="warm-up", annotation_position="top left", row=1, col=1)
    n_levels = int(run.layers[layer].get("n_levels") or lev.max() + 1)
    fig.update_yaxes(title_text="Δ steps", range=[0, max(1.05, float(np.nanmax(dist)) * 1.05)], row=1, col=1)
    fig.update_yaxes(title_text="level index", tickvals=list(range(n_levels)), range=[-0.3, n_levels - 0.7],
                     row=2, col=1)
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    fig.update_layout(height=680, hovermode="x unified", margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.08, xanchor="left", x=0))
    C.show(fig, key="traj_fig")
    frozen = int((fs >= 0).sum())
    st.caption(f"✕ marks the freeze step ({frozen} of {len(idx)} shown weights freeze; dashed lines in the level "
               "panel). A frozen weight keeps its value, but its level can still move if the layer's bounds move.")


C.guard(body)
