"""Threshold sweep: replay LTS on a recorded run for any threshold, live; compare with real runs and with
oscillation freezing."""
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


def body() -> None:
    rows = C.page_start("Threshold sweep — replay LTS on a recorded run",
                        "LTS freezes a weight once the EMA of its distance to its quantization level drops below "
                        "ρ_t·Δ. Replaying the rule on the recorded distances of a run shows, for any threshold, "
                        "which weights *would* have frozen and when — without retraining. A baseline run (no "
                        "freezing) is the natural input.")
    if rows is None:
        return
    row = C.run_picker("Recorded run to replay on", rows=rows, prefer=C.prefer_baseline,
                       help="Any run works; a baseline run (rule none) shows the undisturbed dynamics.")
    run = C.load_run(row)
    if run.n_records < 2:
        st.warning("This run has fewer than two records: nothing to replay yet.")
        return
    if row.get("rule") != "none":
        st.caption(f"Note: this run trained with rule **{C.plain(row.get('rule'))}**, so its recorded trajectories "
                   "are already shaped by its own freezing.")
    every = int(row.get("record_every") or 1)
    if every > 1:
        spe = row.get("steps_per_epoch") or every
        st.info(f"This run was recorded every {every} steps ({every / spe:g} epoch), not at every step: the "
                f"replay works at **record resolution** — the EMA decay is compounded between records "
                f"(m^{every}), freezing is checked only at record steps, and level changes between records are "
                "invisible. A run recorded with `--record-every 1` replays its own training exactly.")
    # the real LTS runs of the same setup: the replay starts from the settings of the one overlaid
    candidates = [r for r in C.ok_runs() if C.is_lts(r) and C.same_setup(r, row) and r["path"] != row["path"]]
    lts = None
    if candidates:
        ids = [r["run_id"] for r in candidates]
        a1, a2 = st.columns([3, 1])
        chosen = C.url_selectbox("Actual LTS run with the same model, dataset, bits and seed (overlaid)", ids,
                                 "actual", ids[0], container=a1,
                                 help="the replay starts from the settings this run trained with")
        lts = next(r for r in candidates if r["run_id"] == chosen)
        a1.caption(C.plain(C.describe(lts)))
        a2.button("Use its settings", on_click=C.use_settings, args=(C.own_settings(lts), row),
                  help="set schedule, ρ, warm-up and decay back to the ones this run trained with")
    sweep_fragment(row, lts)


@st.fragment
def sweep_fragment(row: dict, lts: dict | None) -> None:
    C.guard(lambda: _sweep(row, lts))


def _sweep(row: dict, lts: dict | None) -> None:
    run = C.load_run(row)
    # start from the overlaid real run's settings, unless this run was already replayed in the session
    prev = st.session_state.get("_replay_settings")
    replayed = isinstance(prev, dict) and prev.get("path") == row["path"]
    s = C.replay_controls(row, start=None if replayed or lts is None else C.own_settings(lts))
    W = C.epochs_to_steps(row, s.warmup_epochs)
    idx = C.replay_index(row, s.schedule, W, s.decay)
    res = idx.query(s.ratio)
    epochs = idx.epochs if np.all(np.isfinite(idx.epochs)) else C.record_epochs(run)

    m = st.columns(6)
    m[0].metric("Updates eliminated, of quantized weights", C.pct(res.updates_eliminated),
                help="frozen fraction of the watched quantized weights, averaged over every training step")
    upd_all = res.updates_eliminated_all_params
    m[5].metric("… of all trainable params", C.pct(None if upd_all != upd_all else upd_all),
                help="the same frozen weight-steps over all trainable parameters of the model: the paper's "
                     "denominator ('—' when the run did not record its parameter count)")
    m[1].metric("Backward FLOPs saved (accounted)", C.pct(res.backward_flops_saved),
                help="weight-gradient FLOPs of frozen weights, over the whole backward pass (≈ half), as the "
                     "paper counts them; the structural share is below")
    m[2].metric("Ticket precision", C.pct(res.ticket_precision),
                help="share of frozen weights already at their final level when they froze")
    m[3].metric("Frozen, then changed level", C.pct(None if not res.n_frozen else
                                                    1 - res.n_frozen_correct / res.n_frozen),
                help=f"{res.n_frozen - res.n_frozen_correct:,} of the {res.n_frozen:,} replay-frozen weights end on "
                     "another level than the one they froze on: frozen too early (1 − ticket precision)")
    m[4].metric("Frozen at the end", C.pct(res.frozen_fraction[-1]), help=f"{res.n_frozen:,} weights")

    fig = Chart("Frozen fraction vs epoch", "epoch", "frozen weights (%)", y_domain=[0, 101])
    if s.warmup_epochs > 0:
        fig.band(0, s.warmup_epochs, "warm-up")
    fig.line(f"replay: {C.SCHEDULE_NAMES[s.schedule]} ρ={s.ratio:.4g}", epochs, 100 * res.frozen_fraction,
             C.color(0), width=3)
    if lts is not None:
        lm = C.load_run(lts).metrics
        if len(lm):
            fig.line(f"actual: {lts['run_id']} ({C.SCHEDULE_NAMES.get(lts.get('schedule'))} "
                     f"ρ={C._g(lts.get('threshold'))})", lm["epoch"], 100 * lm["frozen_fraction"], C.INK,
                     dash=[6, 4])
    fig.show("sweep_frozen")

    _structural(row, lts, s, W)
    if lts is not None:
        _agreement(row, lts)

    # ---- whole sweep: figures vs ρ, and threshold × epoch heat map ----
    left, right = st.columns(2)
    with left:
        sw = idx.sweep()
        fig = Chart("Whole-run figures vs threshold", "threshold ratio ρ (Δ)", "%")
        fig.line("updates eliminated, over quantized weights (%)", sw["ratio"], 100 * sw["updates_eliminated"],
                 C.color(0), points=False)
        if np.all(np.isfinite(sw["updates_eliminated_all_params"])):
            fig.line("updates eliminated, over all trainable params (paper's, %)", sw["ratio"],
                     100 * sw["updates_eliminated_all_params"], C.color(0), dash=[6, 4], points=False)
        fig.line("backward FLOPs saved (%)", sw["ratio"], 100 * sw["backward_flops_saved"], C.color(1),
                 points=False)
        fig.line("ticket precision (%)", sw["ratio"], 100 * sw["ticket_precision"], C.color(2), points=False)
        fig.vline(s.ratio)
        fig.show("sweep_curve")
    with right:
        ratios = np.linspace(0.0, idx.max_ratio, 41)   # rows of ρ; more cells cost a first view, not detail
        hm = idx.heatmap(ratios)
        (Chart("Frozen fraction: threshold × epoch", "epoch", "threshold ratio ρ (Δ)")
         .heatmap(edges_from_centers(epochs), edges_from_centers(ratios), 100 * hm, "frozen %", 0, 100,
                  x_values=epochs, y_values=ratios)
         .hline(s.ratio).show("sweep_heatmap"))

    _oscillation(row, res, epochs)


def _structural(row: dict, lts: dict | None, s, W: int) -> None:
    """The replay's prediction of what is structurally skippable at the chosen threshold, per granularity."""
    from lts_core.channels import DEFAULT_CHANNEL_QUANTILE
    own = next((r for r in (lts, row) if r is not None and r.get("granularity") == "channel"), None)
    st.markdown(f"**Accounted vs structural at ρ = {s.ratio:.4g}** — the accounted FLOPs are bookkeeping; only "
                "channels whose every weight is frozen can be skipped by a planned backward (with bound-grad "
                "'active'). Per-weight freezing leaves few such channels.")
    c = st.columns([1.2, 1, 1, 1, 1])
    gran = c[0].selectbox("Granularity of the replay", ["weight", "channel"], key="sweep_granularity",
                          index=1 if own is not None else 0,
                          format_func={"weight": "single weights (paper)", "channel": "whole channels"}.get,
                          help="channel: a channel freezes when a quantile of its weights' EMA distances passes "
                               "the threshold (--granularity channel)")
    q = DEFAULT_CHANNEL_QUANTILE
    if gran == "channel":
        q = c[1].number_input("Channel quantile", 0.01, 1.0,
                              float((own or {}).get("channel_quantile") or DEFAULT_CHANNEL_QUANTILE), 0.05,
                              key="sweep_channel_quantile",
                              help=f"{DEFAULT_CHANNEL_QUANTILE:g} = the default, 0.5 = median, 1 = max")
    if not C.weight_by_weight_ok(row, "sweep_structural_go", "Predict the structural share for this threshold "
                                 "(replays every weight)"):
        return
    acc = C.replay_accounting_cached(row, s.schedule, s.ratio, W, s.decay, gran, q)
    c[2].metric("Updates eliminated", C.pct(acc.updates_eliminated),
                help="over the watched quantized weights, with the granularity on the left")
    c[3].metric("Accounted", C.pct(acc.backward_flops_saved),
                help="backward FLOPs saved as the paper counts them (weight-gradient FLOPs of frozen weights)")
    skip = acc.backward_flops_skippable
    c[4].metric("Skippable (predicted)", C.pct(None if skip != skip else skip),
                help="share of backward FLOPs in output channels all of whose weights are frozen, mean over the "
                     "steps: what a planned backward skips. '—' when the run did not record its layer shapes")


def _agreement(row: dict, lts: dict) -> None:
    lrun = C.load_run(lts)
    actual = lrun.freeze_steps()
    own = C.own_settings(lts)
    st.markdown(f"**Replay vs reality** — LTS replayed on *{C.plain(row['run_id'])}* with the settings of "
                f"*{C.plain(lts['run_id'])}* ({C.plain(own.text())}"
                f"{', whole channels' if lts.get('granularity') == 'channel' else ''}), compared weight by weight "
                "with the freeze "
                "steps that run recorded.")
    if actual is None:
        st.info("That run has no recorded freeze steps yet (they are written when a run finishes).")
        return
    if not C.weight_by_weight_ok(row, "sweep_agreement_go", "Compare the replay with that run"):
        return
    from lts_core.analysis import agreement
    pred = C.replay_freeze_steps_cached(row, own.schedule, own.ratio, C.epochs_to_steps(lts, own.warmup_epochs),
                                        own.decay, lts.get("granularity") or "weight",
                                        float(lts.get("channel_quantile") or 0.5))
    ag = agreement(pred, actual)
    spe = float(row.get("steps_per_epoch") or 1)
    c = st.columns(5)
    c[0].metric("Jaccard (frozen sets)", C.pct(ag["jaccard"]))
    c[1].metric("Precision", C.pct(ag["precision"]), help="share of replay-frozen weights that really froze")
    c[2].metric("Recall", C.pct(ag["recall"]), help="share of really frozen weights the replay froze")
    diff = ag["mean_abs_step_diff"]
    c[3].metric("Mean |Δ freeze epoch|", "—" if diff != diff else f"{diff / spe:.2f}")
    c[4].metric("Actual updates eliminated", C.pct(lts.get("updates_eliminated")),
                help="the real run's figure, over its watched quantized weights"
                     + ("" if lts.get("updates_eliminated_all_params") is None else
                        f"; over all trainable params {C.pct(lts.get('updates_eliminated_all_params'))}"))
    fm = C.frozen_moved(lts)
    if fm["frozen"]:
        st.warning(f"In the real run, {fm['moved']:,} of its {fm['frozen']:,} frozen weights "
                   f"({100 * fm['moved'] / fm['frozen']:.1f}%) end on another level than the one they froze on: "
                   "a frozen weight keeps its value, but the learned quantization bounds keep moving under it. "
                   "The Distributions page shows where they sit.")
    st.caption(f"Replay froze {ag['n_pred']:,} weights, the real run {ag['n_actual']:,}, both {ag['n_both']:,} "
               f"of {ag['n_weights']:,}. Once a real run freezes weights its trajectories differ from the "
               "recorded ones, so the replay is a prediction, not a copy.")


def _oscillation(row: dict, res, epochs) -> None:
    st.subheader("Contrast: oscillation freezing on the same run")
    st.caption("Nagel et al. (2022) freeze the *restless* weights — those whose level keeps flipping back and "
               "forth (EMA of direction reversals above a cosine-annealed threshold, after 25% of training, "
               "layers ≤ 4 bits). LTS freezes the *settled* ones. Oscillations are counted between records.")
    ores = C.osc_replay(row)
    left, right = st.columns([3, 2])
    with left:
        (Chart("Frozen fraction: LTS replay vs oscillation freezing", "epoch", "frozen weights (%)")
         .line(f"LTS replay ρ={res.ratio:.4g}", epochs, 100 * res.frozen_fraction, C.color(0))
         .line("oscillation freezing", epochs, 100 * ores.frozen_fraction, C.color(1), fmt=".2f")
         .show("sweep_osc"))
    with right:
        n = max(ores.n_weights, 1)
        # a Markdown table, not st.dataframe: five rows do not need the data grid, whose 1.3 MB of JavaScript
        # a new browser would otherwise load before this page's first view is complete
        rows = [("weights frozen", f"{res.n_frozen:,}", f"{ores.n_frozen:,}"),
                ("frozen (%)", f"{100 * res.n_frozen / n:.2f}", f"{100 * ores.n_frozen / n:.2f}"),
                ("updates eliminated (%)", f"{100 * res.updates_eliminated:.2f}",
                 f"{100 * ores.updates_eliminated:.2f}"),
                ("backward FLOPs saved (%)", f"{100 * res.backward_flops_saved:.2f}",
                 f"{100 * ores.backward_flops_saved:.2f}"),
                ("frozen at final level (%)", C.pct(res.ticket_precision, 2).rstrip("%"),
                 C.pct(ores.ticket_precision, 2).rstrip("%"))]
        st.markdown("\n".join(["| | LTS replay | oscillation |", "|---|---:|---:|"]
                              + [f"| {a} | {b} | {c} |" for a, b, c in rows]))


C.guard(body)
