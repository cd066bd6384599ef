"""Threshold sweep: replay LTS on a recorded run for any threshold, live; compare with real runs and with
oscillation freezing."""
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

C.leave_mpa_v1()

K_SCHED, K_RATIO, K_WARM, K_DECAY = "sw_schedule", "sw_ratio", "sw_warmup", "sw_decay"


def _init_controls(row) -> None:
    """Control values for a newly picked run: its own settings for an LTS run, else the last ones used."""
    if st.session_state.get("_sw_path") == row["path"] and K_SCHED in st.session_state:
        return
    st.session_state["_sw_path"] = row["path"]
    s = C.replay_settings(row)
    st.session_state[K_SCHED] = s.schedule
    st.session_state[K_RATIO] = float(min(max(s.ratio, 0.0), 2.0))
    st.session_state[K_DECAY] = s.decay if s.decay in C.DECAYS else 0.99
    st.session_state[K_WARM] = float(min(s.warmup_epochs, max_warmup(row)))


def max_warmup(row) -> float:
    return max(float(row.get("epochs") or 1) - 1.0, 0.0)


def _use_settings(lts: dict) -> None:
    st.session_state[K_SCHED] = lts.get("schedule") or "linear"
    st.session_state[K_RATIO] = float(min(lts.get("threshold") or 1.0, 2.0))
    st.session_state[K_WARM] = float(min(C.warmup_epochs_of(lts), max_warmup(lts)))
    d = float(lts.get("decay") or 0.99)
    st.session_state[K_DECAY] = d if d in C.DECAYS else 0.99


def body() -> None:
    st.title("Threshold sweep — replay LTS on a recorded run")
    st.caption("LTS freezes a weight once the EMA of its distance to its quantization level drops below "
               "ρ·Δ. Replaying the rule on the recorded distances of a run shows, for any threshold, which weights "
               "*would* have frozen and when — without retraining. A baseline run (no freezing) is the natural "
               "input.")
    rows = C.ok_runs()
    if not rows:
        C.no_runs_message()
        return
    row = C.run_picker("Recorded run to replay on", key="sweep_run", rows=rows, prefer=C.prefer_baseline,
                       help="Any run works; a baseline run (rule none) shows the undisturbed dynamics.")
    run = C.load_run(row)
    if run.n_records < 2:
        st.warning("This run has fewer than two records: nothing to replay yet.")
        return
    if row.get("rule") != "none":
        st.caption(f"Note: this run trained with rule **{row.get('rule')}**, so its recorded trajectories are "
                   "already shaped by its own freezing.")
    every = int(row.get("record_every") or 1)
    if every > 1:
        spe = row.get("steps_per_epoch") or every
        st.info(f"This run was recorded every {every} steps ({every / spe:g} epoch), not at every step: the "
                f"replay works at **record resolution** — the EMA decay is compounded between records "
                f"(m^{every}), freezing is checked only at record steps, and level changes between records are "
                "invisible. A run recorded with `--record-every 1` replays its own training exactly.")
    _init_controls(row)
    sweep_fragment(row)


@st.fragment
def sweep_fragment(row: dict) -> None:
    C.guard(lambda: _sweep(row))


def _sweep(row: dict) -> None:
    run = C.load_run(row)
    epochs_total = float(row.get("epochs") or 1)
    c = st.columns(4)
    schedule = c[0].selectbox("Schedule", ["fixed", "linear", "sine"], key=K_SCHED,
                              format_func=lambda s: C.SCHEDULE_NAMES[s],
                              help="fixed: ρ_t = ρ; linear/sine-growth: ρ_t grows from 0 to ρ after warm-up")
    ratio = c[1].slider("Threshold ratio ρ (Δ)", 0.0, 2.0, step=0.01, key=K_RATIO,
                        help="freeze when EMA distance ≤ ρ_t·Δ; for the growth schedules ρ is the final value "
                             "(the paper uses 1)")
    warm = c[2].slider("Warm-up (epochs)", 0.0, max(max_warmup(row), 0.5),
                       step=0.5 if epochs_total <= 60 else 1.0, key=K_WARM,
                       help="no weight freezes during the warm-up")
    decay = c[3].select_slider("EMA decay m", C.DECAYS, key=K_DECAY)
    st.session_state["replay_settings"] = {"path": row["path"], "schedule": schedule, "ratio": float(ratio),
                                           "warmup_epochs": float(warm), "decay": float(decay)}
    W = C.epochs_to_steps(row, warm)
    idx = C.replay_index(row, schedule, W, decay)
    res = idx.query(ratio)
    epochs = idx.epochs if np.all(np.isfinite(idx.epochs)) else C.record_epochs(run)

    m = st.columns(4)
    m[0].metric("Updates eliminated", C.pct(res.updates_eliminated),
                help="frozen fraction of all weights averaged over every training step")
    m[1].metric("Backward FLOPs saved", C.pct(res.backward_flops_saved),
                help="weight-gradient FLOPs of frozen weights, over the whole backward pass (≈ half)")
    m[2].metric("Ticket precision", C.pct(res.ticket_precision),
                help="share of frozen weights already at their final level when they froze")
    m[3].metric("Frozen at the end", C.pct(res.frozen_fraction[-1]), help=f"{res.n_frozen:,} weights")

    # ---- matching real LTS runs ----
    candidates = [r for r in C.ok_runs() if C.is_lts(r) and C.same_setup(r, row)]
    lts = None
    if candidates:
        paths = [r["path"] for r in candidates]
        by = {r["path"]: r for r in candidates}
        k_actual = C.run_key("sw_actual", row)
        C.keep_valid(k_actual, paths)
        a1, a2 = st.columns([3, 1])
        lts = by[a1.selectbox("Actual LTS run with the same model, dataset, bits and seed", paths,
                              key=k_actual, format_func=lambda p: C.run_label(by[p]))]
        a2.button("Use its settings", on_click=_use_settings, args=(lts,),
                  help="set schedule, ρ, warm-up and decay to the ones this run trained with")

    fig = C.figure("Frozen fraction vs epoch", "epoch", "frozen weights (%)")
    fig.add_scatter(x=epochs, y=100 * res.frozen_fraction, mode="lines+markers", line=dict(width=3),
                    name=f"replay: {C.SCHEDULE_NAMES[schedule]} ρ={res.ratio:.3g}", hovertemplate="%{y:.1f}%")
    if lts is not None:
        lrun = C.load_run(lts)
        lm = lrun.metrics
        if len(lm):
            fig.add_scatter(x=lm["epoch"], y=100 * lm["frozen_fraction"], mode="lines+markers",
                            line=dict(color="black", dash="dash"), hovertemplate="%{y:.1f}%",
                            name=f"actual: {lts['run_id']} ({C.SCHEDULE_NAMES.get(lts.get('schedule'))} "
                                 f"ρ={C._g(lts.get('threshold'))})")
    if warm > 0:
        fig.add_vrect(x0=0, x1=warm, fillcolor="grey", opacity=0.12, line_width=0,
                      annotation_text="warm-up", annotation_position="top left")
    fig.update_yaxes(range=[0, 101])
    C.show(fig, key="sweep_frozen")

    if lts is not None:
        _agreement(row, lts)

    # ---- whole sweep: figures vs ρ, and threshold × epoch heat map ----
    left, right = st.columns(2)
    with left:
        sw = idx.sweep()
        fig = C.figure("Whole-run figures vs threshold", "threshold ratio ρ (Δ)", "%")
        fig.add_scatter(x=sw["ratio"], y=100 * sw["updates_eliminated"], name="updates eliminated (%)",
                        hovertemplate="%{y:.1f}%")
        fig.add_scatter(x=sw["ratio"], y=100 * sw["backward_flops_saved"], name="backward FLOPs saved (%)",
                        hovertemplate="%{y:.1f}%")
        fig.add_scatter(x=sw["ratio"], y=100 * sw["ticket_precision"], name="ticket precision (%)",
                        hovertemplate="%{y:.1f}%")
        fig.add_vline(x=res.ratio, line_dash="dot", line_color="grey")
        C.show(fig, key="sweep_curve")
    with right:
        ratios = np.linspace(0.0, idx.max_ratio, 81)
        hm = idx.heatmap(ratios)
        fig = C.figure("Frozen fraction: threshold × epoch", "epoch", "threshold ratio ρ (Δ)", hovermode="closest")
        fig.add_heatmap(z=100 * hm, x=epochs, y=ratios, colorscale="Viridis", zmin=0, zmax=100,
                        colorbar=dict(title="frozen %"),
                        hovertemplate="epoch %{x:.2f}<br>ρ = %{y:.3f} Δ<br>frozen %{z:.1f}%<extra></extra>")
        fig.add_hline(y=res.ratio, line_color="white", line_dash="dot")
        C.show(fig, key="sweep_heatmap")

    _oscillation(row, res, epochs)


def _agreement(row: dict, lts: dict) -> None:
    lrun = C.load_run(lts)
    actual = lrun.freeze_steps()
    st.markdown(f"**Replay vs reality** — LTS replayed on *{row['run_id']}* with the settings of "
                f"*{lts['run_id']}* ({C.SCHEDULE_NAMES.get(lts.get('schedule'))}, ρ={C._g(lts.get('threshold'))}, "
                f"warm-up {C.warmup_epochs_of(lts):g} epochs, m={lts.get('decay')}), compared weight by weight "
                "with the freeze steps that run recorded.")
    if actual is None:
        st.info("That run has no recorded freeze steps yet (they are written when a run finishes).")
        return
    from lts_core.analysis import agreement
    W = C.epochs_to_steps(lts, C.warmup_epochs_of(lts))
    pred = C.replay_freeze_steps_cached(row, lts.get("schedule") or "linear", float(lts.get("threshold") or 1.0),
                                        W, float(lts.get("decay") or 0.99))
    ag = agreement(pred, actual)
    spe = float(row.get("steps_per_epoch") or 1)
    c = st.columns(5)
    c[0].metric("Jaccard (frozen sets)", C.pct(ag["jaccard"]))
    c[1].metric("Precision", C.pct(ag["precision"]), help="share of replay-frozen weights that really froze")
    c[2].metric("Recall", C.pct(ag["recall"]), help="share of really frozen weights the replay froze")
    diff = ag["mean_abs_step_diff"]
    c[3].metric("Mean |Δ freeze epoch|", "—" if diff != diff else f"{diff / spe:.2f}")
    c[4].metric("Actual updates eliminated", C.pct(lts.get("updates_eliminated")))
    st.caption(f"Replay froze {ag['n_pred']:,} weights, the real run {ag['n_actual']:,}, both {ag['n_both']:,} "
               f"of {ag['n_weights']:,}. Once a real run freezes weights its trajectories differ from the "
               "recorded ones, so the replay is a prediction, not a copy.")


def _oscillation(row: dict, res, epochs) -> None:
    st.subheader("Contrast: oscillation freezing on the same run")
    st.caption("Nagel et al. (2022) freeze the *restless* weights — those whose level keeps flipping back and "
               "forth (EMA of direction reversals above a cosine-annealed threshold, after 25% of training, "
               "layers ≤ 4 bits). LTS freezes the *settled* ones. Oscillations are counted between records.")
    ores, orep = C.osc_replay(row)
    left, right = st.columns([3, 2])
    with left:
        fig = C.figure("Frozen fraction: LTS replay vs oscillation freezing", "epoch", "frozen weights (%)")
        fig.add_scatter(x=epochs, y=100 * res.frozen_fraction, name=f"LTS replay ρ={res.ratio:.3g}",
                        hovertemplate="%{y:.1f}%")
        fig.add_scatter(x=epochs, y=100 * ores.frozen_fraction, name="oscillation freezing",
                        line=dict(color=C.color(1)), hovertemplate="%{y:.2f}%")
        C.show(fig, key="sweep_osc")
    with right:
        n = max(len(orep.freeze_steps), 1)
        st.dataframe(pd.DataFrame({
            "": ["weights frozen", "frozen (%)", "updates eliminated (%)", "backward FLOPs saved (%)",
                 "frozen at final level (%)"],
            "LTS replay": [f"{res.n_frozen:,}", f"{100 * res.n_frozen / n:.2f}",
                           f"{100 * res.updates_eliminated:.2f}", f"{100 * res.backward_flops_saved:.2f}",
                           C.pct(res.ticket_precision, 2).rstrip("%")],
            "oscillation": [f"{ores.n_frozen:,}", f"{100 * ores.n_frozen / n:.2f}",
                            f"{100 * ores.updates_eliminated:.2f}", f"{100 * ores.backward_flops_saved:.2f}",
                            C.pct(ores.ticket_precision, 2).rstrip("%")],
        }), hide_index=True, width="stretch")


C.guard(body)
