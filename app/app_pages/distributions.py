"""Distributions: how distances to the level, full-precision weights and LTS EMAs spread at every record, with
the freezing on top. Counted on the server in one pass over the run; only binned counts reach the browser."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

import common as C  # noqa: E402
from charts import Chart, edges_from_centers  # noqa: E402
from lts_core.analysis import common_weight_edges, rebin_codes, weight_axis, weight_histogram  # noqa: E402

CLASS_NAMES = {"active": "not frozen", "frozen": "frozen, on the level it froze on",
               "moved": "frozen, but on another level (bounds moved)"}
BIN_CODES = {"1/128 Δ": 1, "1/64 Δ": 2, "1/32 Δ": 4, "1/16 Δ": 8}
WEIGHT_BINS = 120


def freezing_of(row: dict):
    """(replay settings or None, a sentence saying where the freezing shown comes from)."""
    if row.get("rule") == "none":
        return "replay", None
    if C.is_lts(row):
        return None, f"frozen weights: this LTS run's own freezing ({C.plain(C.own_settings(row).text())}); " \
                     "EMA: as recorded."
    return None, f"frozen weights: this run's own freezing ({C.plain(C.rule_text(row))}); no EMA recorded."


def body() -> None:
    rows = C.page_start("Distributions — every record, nothing down-sampled",
                        "How the distances to the nearest quantization level, the full-precision weights and the "
                        "LTS EMA are distributed at every record of a run, with freezing on top. Distances are in Δ "
                        "(one quantization step); counts are exact on the recorder's grid of 1/128 Δ.")
    if rows is None:
        return
    c1, c2 = st.columns([3, 2])
    row = C.run_picker("Run", rows=rows, container=c1)
    run = C.load_run(row)
    layer = C.layer_picker(run, all_layers=True, container=c2)
    if run.n_records < 1:
        st.warning("This run has no record yet.")
        return
    mode, source = freezing_of(row)
    settings = None
    if mode == "replay":
        st.markdown("**Freezing replayed on this baseline run** (LTS at record resolution; the same controls as "
                    "the Threshold sweep page):")
        settings = C.replay_controls(row)
        source = f"frozen weights and EMA: LTS replayed with {C.plain(settings.text())}."
    st.caption(source)
    d = C.distributions_of(row, layer, settings)
    overlay = overlay_picker(row)
    record_view(row, layer, d, overlay)


@st.fragment
def record_view(row: dict, layer: int | None, d, overlay: dict | None) -> None:
    """The record slider and everything drawn at one record: a record move reruns only this."""
    C.guard(lambda: _record_view(row, layer, d, overlay))


def _record_view(row: dict, layer: int | None, d, overlay: dict | None) -> None:
    R = d.n_records
    epochs = C.steps_to_epochs(row, d.steps)
    labels = C.record_labels(epochs, d.steps)
    default = labels[int(np.argmin(np.abs(epochs - 0.25 * epochs[-1])))]
    C.keep_valid("record", labels)
    lab = st.select_slider("Record (epoch)", labels, value=default, key="record", bind=C.URL, help=C.EPOCH_HELP)
    r = labels.index(lab)
    tot = d.class_totals()[r]
    n = max(d.n_weights, 1)
    c = st.columns(4)
    c[0].metric("Weights", f"{d.n_weights:,}")
    c[1].metric("Frozen", C.pct((tot[1] + tot[2]) / n), help=f"{int(tot[1] + tot[2]):,} weights at this record")
    c[2].metric("Frozen but on another level", C.pct(tot[2] / n),
                help=f"{int(tot[2]):,} frozen weights whose level is no longer the one they froze on: the weight "
                     "kept its value, the learned bounds moved")
    c[3].metric("Outside the range (> ½ Δ)", C.pct(d.dist[r][:, C_INSIDE:].sum() / n),
                help="weights beyond the lowest or highest level, clamped onto it")

    b1, b2 = st.columns([2, 1])
    bin_name = b1.radio("Distance bins", list(BIN_CODES), index=1, horizontal=True, key="dbins")
    log = b2.toggle("log colour scale", key="dlog")
    k = BIN_CODES[bin_name]

    left, right = st.columns([3, 2])
    with left:
        distance_heatmap(d, epochs, r, k, log)
    with right:
        class_histogram(d.dist[r], k, f"Distance to the level at epoch {labels[r]}", "distance to the nearest "
                        "level (Δ)", key="dist_hist")

    if d.positions is not None:
        weights_section(row, d, r, labels, overlay, layer)
    else:
        st.info("Pick one layer to see its full-precision weights on the quantization grid (each layer has its "
                "own grid).")
    ema_section(row, d, r, labels, epochs, k)
    occupancy_section(d, epochs, r)
    if overlay is not None:
        overlay_distances(row, overlay, d, r, epochs, k, layer)


C_INSIDE = 65  # distance codes 0 … 64 are inside the quantization range (≤ ½ Δ)


def bin_positions(edges) -> list[float]:
    """Centres of the regular code bins, then the overflow bin set apart by one empty bin."""
    width = edges[1] - edges[0]
    return list((edges[:-1] + edges[1:]) / 2) + [edges[-1] + 1.5 * width]


def distance_heatmap(d, epochs, r: int, k: int, log: bool) -> None:
    counts, edges = rebin_codes(d.dist.sum(axis=1), k)                 # [R, B+1], last = beyond ½ Δ
    pct = 100 * counts / max(d.n_weights, 1)
    centers = np.asarray(bin_positions(edges))
    half = (edges[1] - edges[0]) / 2
    z = np.log10(np.maximum(pct.T, 1e-4)) if log else pct.T
    ticks = {t: f"{t:g}" for t in (0, 0.1, 0.2, 0.3, 0.4, 0.5)} | {float(centers[-1]): "> ½"}
    (Chart("Distance to the level over training", "epoch", "distance to the nearest level (Δ)", y_ticks=ticks)
     .heatmap(edges_from_centers(epochs), np.stack([centers - half, centers + half], axis=1), z,
              "log₁₀ %" if log else "% of weights", hover={"pct": (pct.T, "% of weights", ".2f")}, x_values=epochs)
     .vline(float(epochs[r])).show("dist_heat"))


def class_histogram(counts3, k: int, title: str, xlabel: str, key: str, last: int = C_INSIDE - 1,
                    threshold: float | None = None, next_threshold: float | None = None) -> None:
    """Stacked bars per weight class of code counts [3, 256] binned by k codes (last bin: above `last`)."""
    binned, edges = rebin_codes(counts3, k, last=last)                  # [3, B+1]
    width = edges[1] - edges[0]
    x = bin_positions(edges)
    n = max(counts3.sum(), 1)
    top = edges[-1]
    ticks = [float(t) for t in np.round(np.linspace(0, top, 6), 2)]
    fig = Chart(title, xlabel, "weights (%)",
                x_ticks={t: f"{t:g}" for t in ticks} | {float(x[-1]): f"> {top:.2g}"})
    fig.bars(x, {CLASS_NAMES[cls]: (100 * binned[ci] / n, C.WEIGHT_CLASS_COLORS[cls], binned[ci])
                 for ci, cls in enumerate(("active", "frozen", "moved")) if binned[ci].any() or ci == 0}, width)
    if threshold is not None and threshold >= 0:
        fig.vline(threshold, dash=False, width=2, name=f"ρ_t·Δ at this record ({threshold:.3f} Δ)")
    if next_threshold is not None and next_threshold >= 0:
        fig.vline(next_threshold, name=f"at the next record ({next_threshold:.3f} Δ)")
    fig.show(key)


def weight_range(d) -> tuple[float, float]:
    """(low, high) weight values reached by any weight at any record (for an axis that does not jump)."""
    pe = d.position_edges()
    nz = np.flatnonzero(d.positions.sum(axis=(0, 1)))
    lo_p, hi_p = pe[nz[0]], pe[nz[-1] + 1]
    lo = hi = None
    for r in range(d.n_records):
        w0, dw = weight_axis(d.kind, d.bits, d.n_levels, d.bounds[r])
        a, b = sorted((w0 + lo_p * dw, w0 + hi_p * dw))
        lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return lo, hi


def nearest_record(epochs_other: np.ndarray, epoch: float) -> int:
    return int(np.argmin(np.abs(np.asarray(epochs_other) - epoch)))


def weights_section(row, d, r: int, labels, overlay, layer) -> None:
    st.subheader("Full-precision weights on the quantization grid")
    w0, dw = weight_axis(d.kind, d.bits, d.n_levels, d.bounds[r])
    ranges = [weight_range(d)]
    other = None
    if overlay is not None:
        other = overlay_distributions(overlay, layer, row)
        if other is not None and other.positions is not None:
            ranges.append(weight_range(other))
        else:
            other = None
    edges = common_weight_edges(ranges, WEIGHT_BINS)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    pe = d.position_edges()
    n = max(d.n_weights, 1)
    fig = Chart(f"Weights of {row['run_id']} at epoch {labels[r]}", "weight value", "weights (%)", height=320,
                x_domain=[edges[0], edges[-1]])
    fig.bars(centers, {CLASS_NAMES[cls]: (100 * h / n, C.WEIGHT_CLASS_COLORS[cls], h)
                       for ci, cls in enumerate(("active", "frozen", "moved"))
                       for h in [weight_histogram(d.positions[r, ci], pe, w0, dw, edges)] if h.any() or ci == 0},
             width)
    if other is not None:
        orow = overlay
        oe = C.steps_to_epochs(orow, other.steps)
        ro = nearest_record(oe, float(C.steps_to_epochs(row, d.steps[r])))
        ow0, odw = weight_axis(other.kind, other.bits, other.n_levels, other.bounds[ro])
        oh = weight_histogram(other.positions[ro].sum(0), other.position_edges(), ow0, odw, edges)
        fig.line(f"{orow['run_id']} at epoch {oe[ro]:.2f} (all weights)", centers,
                 100 * oh / max(other.n_weights, 1), C.INK, points=False, step=True, fmt=".2f")
    L = int(d.n_levels)
    for kk in range(L):
        fig.vline(w0 + kk * dw, dash=False, width=1.5, opacity=0.9)
    for kk in range(L - 1):
        fig.vline(w0 + (kk + 0.5) * dw, dash=[2, 3], opacity=0.7)
    fig.show("weights_hist")
    lo, hi = sorted((w0, w0 + (L - 1) * dw))
    notes = [f"Solid lines: the {L} level values at this record ({lo:.4g} … {hi:.4g}); dotted: the rounding "
             "boundaries between them. Both move with the learned bounds — move the record to watch them."]
    tot = d.class_totals()[r]
    if tot[2]:
        notes.append(f"Red: {int(tot[2]):,} frozen weights now on another level than the one they froze on.")
    if not d.signed:
        notes.append("This run did not record which side of its level each weight lies on, so a weight within "
                     "½ Δ of its level is drawn half on each side (weights outside the range are placed exactly); "
                     "runs trained by this version record it.")
    st.caption(" ".join(notes))


def ema_section(row, d, r: int, labels, epochs, k: int) -> None:
    st.subheader("The EMA distance that LTS watches, and when weights froze")
    left, right = st.columns(2)
    with left:
        if d.ema is None:
            st.info("No EMA for this run: it is recorded by LTS runs, and replayed on baseline runs.")
        else:
            thr = None if d.thresholds is None else float(d.thresholds[r])
            nxt = None if d.thresholds is None or r + 1 >= d.n_records else float(d.thresholds[r + 1])
            class_histogram(d.ema[r], k, f"EMA distance at epoch {labels[r]} ({d.ema_source})", "EMA distance (Δ)",
                            key="ema_hist", last=CODE_MAX_EMA, threshold=thr, next_threshold=nxt)
            if nxt is not None and nxt >= 0:
                below = int(d.ema[r, 0, :int(np.floor(nxt * 128 + 1e-9)) + 1].sum())
                st.caption(f"Left of the dashed line: {below:,} weights not yet frozen whose EMA is already under "
                           f"the next record's threshold ρ_t = {nxt:.3f} Δ — they freeze next unless their level "
                           "changes (which resets the EMA to 1 Δ).")
            elif thr is not None and thr < 0:
                st.caption("Warm-up: no weight freezes before it ends, whatever its EMA.")
    with right:
        if d.frozen_by[-1] == 0:
            st.info("No weight freezes in this run (with these settings).")
        else:
            width = float(np.min(np.diff(epochs))) * 0.8 if len(epochs) > 1 else 1.0
            (Chart("When weights froze", "epoch", "weights frozen at this record (%)")
             .bars(epochs, {"newly frozen": (100 * d.newly_frozen / max(d.n_weights, 1),
                                             C.WEIGHT_CLASS_COLORS["frozen"], d.newly_frozen)}, width)
             .vline(float(epochs[r])).show("freeze_hist"))


CODE_MAX_EMA = 128  # EMA histogram axis: 0 … 1 Δ, then one bin above (a reset EMA is 1 Δ)


def occupancy_section(d, epochs, r: int) -> None:
    if d.occupancy is None:
        return
    st.subheader("Level occupancy over training")
    n = max(d.n_weights, 1)
    (Chart(None, "epoch", "weights at the level (%)", height=240, y_domain=[0, 100])
     .areas(epochs, {f"level {kk}": (100 * d.occupancy[:, kk] / n, C.color(kk))
                     for kk in range(d.occupancy.shape[1])})
     .vline(float(epochs[r])).show("occupancy"))


def overlay_picker(row: dict) -> dict | None:
    others = [r for r in C.ok_runs() if r["path"] != row["path"]]
    ids = ["none"] + [r["run_id"] for r in others]
    chosen = C.url_selectbox("Overlay a second run (same bins; its nearest record)", ids, "overlay", "none",
                             help="e.g. the baseline against an LTS run, or two bit widths")
    return next((r for r in others if r["run_id"] == chosen), None)


def overlay_distributions(orow: dict, layer: int | None, row: dict):
    """The overlay run's distributions for the layer of the same name (else the same index, else all layers)."""
    orun = C.load_run(orow)
    if orun.n_records < 1:
        return None
    oi = None
    if layer is not None:
        name = C.load_run(row).layers[layer]["name"]
        names = [lay["name"] for lay in orun.layers]
        oi = names.index(name) if name in names else (layer if layer < len(names) else None)
    return C.distributions_of(orow, oi, C.replay_settings(orow) if orow.get("rule") == "none" else None)


def overlay_distances(row, orow, d, r: int, epochs, k: int, layer) -> None:
    other = overlay_distributions(orow, layer, row)
    if other is None:
        return
    oe = C.steps_to_epochs(orow, other.steps)
    ro = nearest_record(oe, float(epochs[r]))
    st.subheader("Overlay: distance to the level")
    a, edges = rebin_codes(d.dist[r].sum(0), k)
    b, _ = rebin_codes(other.dist[ro].sum(0), k)
    width = edges[1] - edges[0]
    x = bin_positions(edges)
    top = edges[-1]
    ticks = [float(t) for t in np.round(np.linspace(0, top, 6), 2)]
    (Chart(None, "distance to the nearest level (Δ)", "weights (%)", height=260,
           x_ticks={t: f"{t:g}" for t in ticks} | {float(x[-1]): f"> {top:.2g}"})
     .bars(x, {f"{row['run_id']} at epoch {epochs[r]:.2f}": (100 * a / max(d.n_weights, 1), C.color(0)),
               f"{orow['run_id']} at epoch {oe[ro]:.2f}": (100 * b / max(other.n_weights, 1), C.color(1))},
           width, opacity=0.6, stack=False)
     .show("overlay_dist"))

C.guard(body)
