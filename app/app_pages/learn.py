"""Learn: a short guided walk through quantization levels, settling and the Lottery Ticket Scratcher."""
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
from lts_core import ratio_at  # noqa: E402


START_POS = {1: 0.35, 2: 1.3, 3: 4.6}  # Learn step 1: the slider's first position per bit width (Δ)
T_STEPS = 300          # steps of the toy weight's training
STEPS_PER_EPOCH = 10   # the toy's "epochs"


@st.cache_data(show_spinner=False)
def toy_weight(seed: int = 3) -> dict:
    """A synthetic weight position (in Δ steps, level 0 at 0) that wanders, oscillates and settles near 1.1."""
    rng = np.random.default_rng(seed)
    t = np.arange(T_STEPS)
    pos = 1.1 + 1.1 * np.exp(-t / 70) * np.cos(t / 11) + 0.05 * rng.standard_normal(T_STEPS) * np.exp(-t / 200)
    pos = np.clip(pos, 0, 3)
    level = np.clip(np.round(pos), 0, 3).astype(np.uint8)
    dist = np.abs(pos - level)
    return {"step": t, "pos": pos, "level": level, "dist": dist,
            "code": np.clip(np.round(dist * 128), 0, 255).astype(np.uint8)}


def number_line(bits: int, pos: float, trail: np.ndarray | None = None) -> go.Figure:
    L = 2 ** bits
    fig = go.Figure()
    fig.add_scatter(x=list(range(L)), y=[0] * L, mode="markers+text", marker=dict(size=18, symbol="line-ns",
                    line=dict(width=3, color=C.INK)), text=[f"level {k}" for k in range(L)],
                    textposition="bottom center", name="levels", hovertemplate="level %{x}<extra></extra>")
    if trail is not None and len(trail):
        fig.add_scatter(x=trail, y=np.linspace(0.6, 0.1, len(trail)), mode="lines", name="path so far",
                        line=dict(color="rgba(192,57,43,0.35)"), hoverinfo="skip")
    k = int(np.clip(round(pos), 0, L - 1))
    fig.add_scatter(x=[pos], y=[0.1], mode="markers", marker=dict(size=16, color="#c0392b"), name="the weight",
                    hovertemplate=f"position %{{x:.2f}} Δ<br>nearest level {k}<br>distance {abs(pos - k):.2f} Δ"
                                  "<extra></extra>")
    fig.add_annotation(x=k, y=0.02, ax=pos, ay=0.1, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                       arrowhead=2, arrowcolor="#c0392b")
    fig.update_layout(height=230, margin=dict(l=10, r=10, t=10, b=10), showlegend=False,
                      xaxis=dict(title="position (Δ steps; one step between neighbouring levels)",
                                 range=[-0.5, L - 0.5], dtick=0.5),
                      yaxis=dict(visible=False, range=[-0.35, 0.7]))
    return fig


def step_levels() -> None:
    st.markdown("**1 · Quantization levels.** A *b*-bit weight can only take 2ᵇ values — its *levels*. During "
                "quantization-aware training (QAT) every weight keeps a full-precision value, and the forward "
                "pass rounds it to the nearest level. We measure positions in **Δ**, the step between two "
                "neighbouring levels, so the distance to the nearest level is always between 0 and ½ Δ.")
    c1, c2 = st.columns([1, 3])
    bits = c1.radio("Bits", [1, 2, 3], index=1, key="learn_bits", horizontal=True)
    L = 2 ** bits
    # one slider per bit width: its range is 0 … L−1, so a position never outlives a narrower range
    pos = c1.slider("Weight position (Δ)", 0.0, float(L - 1), START_POS[bits], 0.01, key=f"learn_pos_{bits}")
    k = int(np.clip(round(pos), 0, L - 1))
    c1.metric("Rounded to level", k)
    c1.metric("Distance to its level", f"{abs(pos - k):.2f} Δ")
    with c2:
        C.show(number_line(bits, pos), key="learn_line")


def step_one_weight() -> None:
    st.markdown("**2 · One weight during training.** Gradient steps push the full-precision value around. "
                "Early on it may cross between levels; later it *settles*: its rounded level stops changing, "
                "even though the value itself keeps moving a little.")
    w = toy_weight()
    t = st.slider("Training step", 0, T_STEPS - 1, 40, key="learn_step")
    c1, c2 = st.columns([3, 2])
    with c1:
        C.show(number_line(2, float(w["pos"][t]), w["pos"][max(0, t - 30):t + 1]), key="learn_line2")
    with c2:
        fig = C.figure(None, "step", "level index", height=230)
        fig.add_scatter(x=w["step"][:t + 1], y=w["level"][:t + 1], line=dict(shape="hv"), name="level")
        fig.update_xaxes(range=[0, T_STEPS])
        fig.update_yaxes(range=[-0.3, 3.3], dtick=1)
        C.show(fig, key="learn_level")
    changes = np.flatnonzero(np.diff(w["level"].astype(int)))
    last = int(changes[-1]) + 1 if changes.size else 0
    st.caption(f"This weight changes level {changes.size} times; from step {last} on it stays at level "
               f"{int(w['level'][-1])} — it has settled.")


def step_ema() -> None:
    st.markdown("**3 · Distance, its EMA and the threshold.** LTS watches each weight's distance to its level. "
                "A single small distance could be luck, so it keeps an exponential moving average (EMA, decay m); "
                "whenever the level changes, the EMA is reset to a full step (1 Δ). Strictly after the warm-up, "
                "a weight whose EMA is at or under the threshold ρ·Δ is **frozen**, in the same step, before the "
                "optimizer moves it: no more updates, no weight gradient, and it keeps the value it had. "
                "Try a fixed ρ = 0.5 with a short warm-up: the weight is frozen before it has settled.")
    with st.expander("The rule exactly as the paper's code runs it"):
        st.markdown("Per weight, with r the exact distance to the level at step t (0, 1, 2, …):\n"
                    "- step 0 only remembers the level (the reference's step counter starts at −1);\n"
                    "- step 1 starts the EMA: d = r (no reset, even if the level changed);\n"
                    "- later steps: d ← (1 − m)·r + m·d, then d = 1 Δ where the level changed;\n"
                    "- a weight may freeze only at steps t > W (W = warm-up steps), when d ≤ ρ_t·Δ, with "
                    "ρ_t = ρ (fixed, default 0.1), (t − W)/(T − W) (linear growth) or sin((t − W)/(T − W)·π/2) "
                    "(sine growth).\n\n"
                    "scratchoff's rule reproduces the reference code's freeze step for every weight of its own "
                    "test traces (README, BENCHMARKS).")
    w = toy_weight()
    c = st.columns(4)
    schedule = c[0].selectbox("Schedule", ["fixed", "linear", "sine"], key="learn_sched",
                              format_func=C.SCHEDULE_NAMES.get)
    ratio = c[1].slider("Threshold ρ (Δ)", 0.0, 1.0, 0.15 if schedule == "fixed" else 1.0, 0.01,
                        key=f"learn_ratio_{schedule}")
    decay = c[2].select_slider("EMA decay m", [0.8, 0.9, 0.95, 0.98, 0.99], value=0.95, key="learn_decay")
    warm = c[3].slider("Warm-up (steps)", 0, T_STEPS - 10, 60, 10, key="learn_warm")
    from lts_core.analysis import ema_trace, replay_freeze_steps
    levels, codes = w["level"][:, None], w["code"][:, None]
    ema = ema_trace(w["step"], levels, codes, decay)[:, 0]
    fs = int(replay_freeze_steps(w["step"], levels, codes, schedule=schedule, ratio=ratio, warmup_steps=warm,
                                 total_steps=T_STEPS, decay=decay)[0])
    rho = np.array([ratio_at(int(s), schedule, ratio, warm, T_STEPS) for s in w["step"]])
    band = np.where(rho >= 0, rho, np.nan)
    fig = C.figure(None, "step", "Δ steps", height=330)
    fig.add_scatter(x=w["step"], y=np.where(np.isnan(band), np.nan, 0.0), mode="lines", line=dict(width=0),
                    showlegend=False, hoverinfo="skip")
    fig.add_scatter(x=w["step"], y=band, fill="tonexty", fillcolor="rgba(46,160,44,0.18)", name="threshold ρ_t·Δ",
                    line=dict(color="rgba(46,160,44,0.9)", dash="dot"), hovertemplate="%{y:.2f} Δ")
    fig.add_scatter(x=w["step"], y=w["dist"], name="distance to level", line=dict(color=C.INK, width=1),
                    hovertemplate="%{y:.2f} Δ")
    fig.add_scatter(x=w["step"], y=ema, name="EMA of the distance", line=dict(color="#c0392b", width=3),
                    hovertemplate="%{y:.2f} Δ")
    if warm:
        fig.add_vrect(x0=0, x1=warm, fillcolor="grey", opacity=0.1, line_width=0, annotation_text="warm-up",
                      annotation_position="bottom left")
    if fs >= 0:
        fig.add_vline(x=fs, line_color=C.INK, line_dash="dash", annotation_text=f"frozen at step {fs}")
    fig.update_yaxes(range=[0, 1.05])
    C.show(fig, key="learn_ema")
    settled_at = int(np.flatnonzero(np.diff(w["level"].astype(int)))[-1]) + 1
    if fs < 0:
        st.info("With these settings the weight never freezes: it keeps being updated to the end.")
    elif fs >= settled_at:
        st.success(f"Frozen at step {fs}, after it settled (step {settled_at}): a correct *ticket* — it would have "
                   "ended at this level anyway, and every later update is saved.")
    else:
        st.warning(f"Frozen at step {fs}, before it settled (step {settled_at}): too early — its level would "
                   "still have changed. A lower threshold or a longer warm-up avoids this.")


def step_scratch() -> None:
    st.markdown("**4 · The scratch-off picture.** Think of a layer as a scratch-off lottery ticket: every weight is "
                "a cell whose final level is hidden under a coating. As training goes on, cells get *revealed* "
                "one by one — the weight has reached its final level. The paper's observation: most cells are "
                "revealed early. LTS scratches those cells off and stops paying for their updates.")
    rng = np.random.default_rng(0)
    n = 16
    settle = np.minimum(rng.exponential(4.0, (n, n)), 29.5)
    final = rng.integers(0, 4, (n, n))
    ep = st.slider("Epoch", 0, 30, 3, key="learn_scratch_epoch")
    shown = settle <= ep
    fig = go.Figure()
    fig.add_heatmap(z=np.where(shown, np.nan, 1.0), colorscale=[[0, "#b9b9b9"], [1, "#b9b9b9"]], showscale=False,
                    xgap=2, ygap=2, hovertemplate="not yet settled (coating)<extra></extra>")
    fig.add_heatmap(z=np.where(shown, final, np.nan), zmin=-0.5, zmax=3.5, xgap=2, ygap=2,
                    colorscale=[[0, "#440154"], [0.25, "#440154"], [0.25, "#31688e"], [0.5, "#31688e"],
                                [0.5, "#35b779"], [0.75, "#35b779"], [0.75, "#fde725"], [1, "#fde725"]],
                    colorbar=dict(title="level", tickvals=[0, 1, 2, 3]),
                    hovertemplate="final level %{z}<extra></extra>")
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=10, b=10), xaxis=dict(visible=False),
                      yaxis=dict(visible=False, scaleanchor="x"))
    c1, c2 = st.columns([2, 1])
    with c1:
        C.show(fig, key="learn_grid")
    c2.metric("Revealed", f"{int(shown.sum())} / {n * n}")
    c2.caption("A toy layer: each weight's settle epoch is drawn at random, most of them early.")


def step_flops() -> None:
    st.markdown(
        "**5 · Why freezing saves backward FLOPs — about half as much as it saves updates.** Take one layer "
        "`Y = X·Wᵀ` on a batch. The forward pass is one matrix product, F multiply-adds. The backward pass is "
        "*two* products of the same size: **dX = dY·W** (the gradient passed on to the layers below) and "
        "**dW = dYᵀ·X** (the gradient of the weights, used by the optimizer). A frozen weight needs no entry of "
        "dW and no update, but every layer below still needs the whole dX, frozen weights included. So "
        "freezing a fraction f of the weights saves f of the dW product: f·F out of the 2F of the backward pass, "
        "**f/2**. That is why a run that eliminates 60% of the weight updates saves about 30% of its backward "
        "FLOPs (the app weights each layer by its own F).")
    f = st.slider("Frozen fraction of the layer's weights", 0.0, 1.0, 0.6, 0.05, key="learn_flops_f")
    parts = [("forward  Y = X·Wᵀ", 1.0, 0.0), ("backward dX = dY·W", 1.0, 0.0), ("backward dW = dYᵀ·X", 1 - f, f)]
    fig = go.Figure()
    fig.add_bar(y=[p[0] for p in parts], x=[p[1] for p in parts], orientation="h", name="computed",
                marker_color=C.color(0), hovertemplate="%{x:.2f} F<extra>computed</extra>")
    fig.add_bar(y=[p[0] for p in parts], x=[p[2] for p in parts], orientation="h", name="saved by freezing",
                marker=dict(color="rgba(44,160,44,0.35)", line=dict(color=C.color(2), width=2),
                            pattern=dict(shape="/", fgcolor=C.color(2))),
                hovertemplate="%{x:.2f} F<extra>saved</extra>")
    fig.update_layout(barmode="stack", height=260, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis=dict(title="multiply-adds, in units of F (one forward product)", range=[0, 1.05]),
                      yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.3))
    C.show(fig, key="learn_flops")
    c = st.columns(3)
    c[0].metric("Weight updates eliminated", f"{100 * f:.0f}%")
    c[1].metric("Backward FLOPs saved", f"{100 * f / 2:.0f}%", help="f·F saved of the 2F of the backward pass")
    c[2].metric("Training FLOPs saved", f"{100 * f / 3:.0f}%", help="f·F of forward + backward = 3F")
    st.caption("These are the multiply-adds that frozen weights no longer need. An ordinary dense matrix product "
               "still computes them; turning them into time saved needs kernels that skip the frozen entries "
               "(e.g. whole frozen rows).")


SAVE_CHANNELS, SAVE_WIDTH = 12, 24   # Learn step 6: the toy layer's output channels × weights per channel


def toy_frozen(f: float, granularity: str, seed: int = 0) -> np.ndarray:
    """bool [channels, weights]: a share f of a toy layer frozen, weight by weight (weights picked at random
    over the whole layer) or channel by channel (whole rows picked at random)."""
    rng = np.random.default_rng(seed)
    if granularity == "channel":
        out = np.zeros((SAVE_CHANNELS, SAVE_WIDTH), dtype=bool)
        out[rng.permutation(SAVE_CHANNELS)[:int(round(f * SAVE_CHANNELS))]] = True
        return out
    n = SAVE_CHANNELS * SAVE_WIDTH
    out = np.zeros(n, dtype=bool)
    out[rng.permutation(n)[:int(round(f * n))]] = True
    return out.reshape(SAVE_CHANNELS, SAVE_WIDTH)


def step_savings() -> None:
    st.markdown(
        "**6 · Accounted, structural, measured: is anything saved for real?** Step 5 counts the multiply-adds of "
        "frozen weights: that is the *accounted* saving the paper reports. But **dW = dYᵀ·X** is one matrix "
        "product: each output channel (a row of W, a filter of a convolution) is one row of it. A kernel can "
        "leave out whole rows; it cannot leave out single entries scattered across rows. So only channels "
        "whose **every** weight is frozen can be skipped: the *structurally skippable* share. And even those are "
        "computed when the quantizer's learned bounds take their gradient from all of the layer's weights "
        "(the reference, bound-grad 'all'): the bounds' gradient is a sum over the whole dW. Only when the "
        "bounds learn from the unfrozen weights alone (bound-grad 'active') does the backward run a smaller "
        "product: the *measured* seconds drop.")
    c = st.columns([2, 2, 2])
    f = c[0].slider("Frozen fraction of the layer's weights", 0.0, 1.0, 0.6, 0.05, key="learn_save_f")
    gran = c[1].radio("LTS freezes", ["weight", "channel"], key="learn_save_gran", horizontal=True,
                      format_func={"weight": "single weights", "channel": "whole channels"}.get)
    bounds = c[2].radio("Bounds learn from", ["all", "active"], key="learn_save_bounds", horizontal=True,
                        format_func={"all": "all weights", "active": "unfrozen only"}.get)
    frozen = toy_frozen(f, gran)
    full = frozen.all(axis=1)
    z = np.where(frozen, 1.0, 0.0)
    z[full] = 2.0
    fig = go.Figure()
    fig.add_heatmap(z=z, zmin=0, zmax=2, xgap=1, ygap=1, showscale=False,
                    colorscale=[[0, C.color(0)], [0.33, C.color(0)], [0.33, "#b9b9b9"], [0.66, "#b9b9b9"],
                                [0.66, C.color(2)], [1, C.color(2)]],
                    customdata=np.where(full[:, None], "whole channel frozen: skippable",
                                        np.where(frozen, "frozen (accounted only)", "updated")),
                    hovertemplate="channel %{y}, weight %{x}: %{customdata}<extra></extra>")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis=dict(title="weights of a channel", showticklabels=False),
                      yaxis=dict(title="output channels", showticklabels=False, autorange="reversed"))
    left, right = st.columns([2, 1])
    with left:
        C.show(fig, key="learn_save_grid")
        st.caption("Blue: updated. Grey: frozen, counted but still computed. Green: a whole channel frozen — "
                   "its row of dW can be left out.")
    accounted = float(frozen.mean()) / 2
    structural = float(full.mean()) / 2
    right.metric("Accounted", f"{100 * accounted:.0f}%", help="frozen share of dW, over the 2F of the backward pass")
    right.metric("Structurally skippable", f"{100 * structural:.0f}%",
                 help="share of dW in whole frozen channels, over the 2F of the backward pass")
    right.metric("Skipped in time (at best)", f"{100 * (structural if bounds == 'active' else 0.0):.0f}%",
                 help="what a planned backward leaves out: the structural share with bound-grad 'active', nothing "
                      "with 'all'. The clock shows less saved than this: the rule itself costs time every step, "
                      "and a CPU's convolution kernel computes filters in blocks of 16, so a partly frozen "
                      "convolution saves time only once a whole block of its filters is frozen")
    if gran == "weight" and f < 1:
        st.info("Single weights freeze at their own times, scattered over every channel: a channel is complete "
                f"only when all {SAVE_WIDTH} of its weights are frozen, which at {100 * f:.0f}% per weight practically "
                "does not happen. That is why the paper's per-weight freezing saves FLOPs on paper and no time on "
                "the clock (BENCHMARKS.md measures it).")
    elif bounds == "all" and structural > 0:
        st.warning("Whole channels are frozen, but the bounds still learn from every weight: dW is computed in "
                   "full for their gradient, so no time is saved. Bound-grad 'active' turns the structural share "
                   "into seconds.")
    st.caption("In a run these three are columns of the Runs and Compare pages (backward FLOPs saved, accounted; "
                "structurally skippable; backward and step seconds, measured), and the Threshold sweep page "
                "predicts the structural share for any threshold. Train with --granularity channel --bound-grad "
                "active to save time. A channel freezes when a quantile of its weights' EMA distances passes the "
                "threshold (--channel-quantile, default 0.25: a quarter of them settled): a lower quantile "
                "freezes channels earlier and saves more; BENCHMARKS.md tables quantile against accuracy and time.")


def step_real() -> None:
    st.markdown("**7 · The same idea on a real run.** Below is the share of weights at their final level in a "
                "recorded run. The Settling page shows the scratch-off grid of a real layer; the Threshold sweep "
                "page replays LTS on it for any threshold.")
    rows = C.ok_runs()
    if not rows:
        C.no_runs_message()
        return
    row = next((r for r in rows if "example" in r["run_id"] and r.get("rule") == "none"),
               next((r for r in rows if "example" in r["run_id"]), rows[0]))
    run = C.load_run(row)
    if run.n_records >= 2:
        s = C.settle(row)
        fig = C.figure(f"{C.plot_text(row['run_id'])} — weights at their final level", "epoch", "settled weights (%)",
                       height=300)
        fig.add_scatter(x=C.record_epochs(run), y=100 * s.curve, mode="lines+markers", hovertemplate="%{y:.1f}%",
                        name="settled")
        fig.update_yaxes(range=[0, 101])
        C.show(fig, key="learn_real")
        i = min(int(np.searchsorted(C.record_epochs(run), 0.2 * float(row.get("epochs") or 1))), s.n_records - 1)
        st.caption(f"{C.plain(C.describe(row))}: {100 * s.curve[i]:.0f}% of the weights already sit at their final level "
                   f"after {C.record_epochs(run)[i]:.1f} epochs.")
    c1, c2 = st.columns(2)
    with c1:
        C.page_link("settling", "Scratch-off grid on the Settling page", icon=":material/grid_view:")
    with c2:
        C.page_link("sweep", "Try thresholds on the Threshold sweep page", icon=":material/tune:")


def body() -> None:
    st.title("Learn — the partly scratch-off lottery ticket")
    st.caption("Seven short steps, from a single weight to a real network. Based on Zhong et al., *Exploiting the "
               "Partly Scratch-off Lottery Ticket for Quantization-Aware Training* (arXiv 2211.08544).")
    tabs = st.tabs(["1 · Levels", "2 · One weight", "3 · EMA & threshold", "4 · Scratch-off", "5 · Backward FLOPs",
                    "6 · Saved for real?", "7 · Real run"])
    for tab, step in zip(tabs, (step_levels, step_one_weight, step_ema, step_scratch, step_flops, step_savings,
                                step_real)):
        with tab:
            C.guard(step)


C.guard(body)
