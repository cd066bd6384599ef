"""Train: start a recorded run (or a real threshold sweep) in the background and watch it live."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import streamlit as st  # noqa: E402

import common as C  # noqa: E402
import jobs as J  # noqa: E402
from lts_core.config import ConfigError, make_config  # noqa: E402

C.leave_mpa_v1()

MODELS = ("mlp", "cnn1d", "cnn2d", "resnet20")
DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10")
try:  # the engine's own lists when available
    from lts_core.datasets import DATASETS  # noqa: F811
    from lts_core.models import MODELS  # noqa: F811
except Exception:  # pragma: no cover
    pass

STATE_TEXT = {"pretraining": "pre-training in full precision (not recorded yet)…", "training": "QAT running",
              "complete": "complete", "interrupted": "interrupted", "failed": "failed"}


def settings_form(prefix: str, with_rule: bool) -> dict | None:
    """The common training settings; returns TrainConfig fields (not yet validated)."""
    c = st.columns(4)
    f: dict = {}
    f["model"] = c[0].selectbox("Model", MODELS, key=f"{prefix}_model")
    f["dataset"] = c[1].selectbox("Dataset", DATASETS, key=f"{prefix}_dataset",
                                  help="digits and mnist1d need no download; mnist, fashion-mnist and cifar10 "
                                       "need their files in the data folder")
    f["bits"] = c[2].number_input("Weight bits", 1, 8, 2, key=f"{prefix}_bits")
    f["seed"] = c[3].number_input("Seed", 0, 1_000_000, 0, key=f"{prefix}_seed")
    c = st.columns(4)
    if with_rule:
        f["rule"] = c[0].selectbox("Freezing rule", ["lts", "none", "osc"], key=f"{prefix}_rule",
                                   format_func={"lts": "LTS (Lottery Ticket Scratcher)", "none": "none (baseline QAT)",
                                                "osc": "oscillation freezing (Nagel et al.)"}.get)
        f["schedule"] = c[1].selectbox("Threshold schedule", ["linear", "fixed", "sine"], key=f"{prefix}_schedule",
                                       format_func=C.SCHEDULE_NAMES.get)
        f["threshold"] = c[2].number_input("Threshold ratio ρ (Δ)", min_value=None, value=None, step=0.05,
                                           key=f"{prefix}_threshold", placeholder="0.1 fixed · 1.0 growth",
                                           help="empty: 0.1 for fixed, 1.0 for the growth schedules")
        f["decay"] = c[3].select_slider("EMA decay m", C.DECAYS, value=0.99, key=f"{prefix}_decay")
        c = st.columns(4)
    f["epochs"] = c[0].number_input("QAT epochs", min_value=None, value=30, step=1, key=f"{prefix}_epochs")
    f["fp_epochs"] = c[1].number_input("FP pre-training epochs", min_value=None, value=20, step=1,
                                       key=f"{prefix}_fp_epochs")
    f["warmup_epochs"] = c[2].number_input("Warm-up (epochs)", min_value=None, value=None, step=1.0,
                                           key=f"{prefix}_warmup", placeholder="20% of epochs")
    f["record_every"] = c[3].number_input("Record every (steps)", min_value=None, value=None, step=1,
                                          key=f"{prefix}_record_every", placeholder="once per epoch",
                                          help="1 = every step (exact replay, bigger run folder)")
    f["device"] = "auto"
    return f


def validate(fields: dict):
    """A TrainConfig, or None after showing a clear error."""
    try:
        return make_config(**fields)
    except ConfigError as e:
        st.error(str(e))
        return None


# ---- one run ----------------------------------------------------------------------------------------------
def single_run_tab() -> None:
    with st.form("train_form"):
        fields = settings_form("tr", with_rule=True)
        name = st.text_input("Run name (optional)", key="tr_name", placeholder="date-label-seed")
        submitted = st.form_submit_button("Start training", type="primary")
    if submitted:
        cfg = validate(fields)
        name = (name or "").strip() or None
        if name and (err := J.check_run_name(name)):
            st.error(err)
            cfg = None
        elif name and (C.runs_folder() / name).exists():
            st.error(f"A run named {name!r} already exists in {C.runs_folder()}; choose another name.")
            cfg = None
        if cfg is not None:
            job = J.start_train(cfg, C.runs_folder(), name)
            st.session_state["train_job"] = job.id
            st.toast(f"Started {job.id}")
    job = J.registry().get(st.session_state.get("train_job", ""))
    if job is None:
        st.caption("Equivalent command line: `python -m lts_core train --model mlp --dataset digits --bits 2 "
                   "--rule lts --epochs 30 --out <runs folder>/<name>`")
        return
    st.caption("Command: `" + " ".join(["python"] + job.cmd[1:]) + "`")
    if job.running or not job.announced:
        train_monitor(job.id)
    else:
        show_train_job(job)


@st.fragment(run_every=1.0)
def train_monitor(job_id: str) -> None:
    job = J.registry().get(job_id)
    if job is None:
        return
    C.guard(lambda: show_train_job(job))
    if not job.running and not job.announced:
        job.announced = True
        C.refresh_runs()  # the new run appears on every page
        st.rerun()


def job_status(job: J.Job, state: str, reason, frac: float, label: str, what: str, done_text: str,
               failed: str) -> None:
    """Progress bar, Stop button while running, and the outcome of a background run or sweep."""
    c1, c2 = st.columns([4, 1])
    c1.progress(min(frac, 1.0), text=label)
    if job.running:
        c2.button("Stop", key=f"stop_{job.id}", on_click=J.stop, args=(job,),
                  help="send SIGINT: running runs are closed as 'interrupted' and stay readable")
    if state == "complete":
        st.success(f"{what} is complete; {done_text}.")
    elif state == "interrupted":
        st.warning(f"{what} was interrupted: {reason}.")
    elif state == "failed":
        st.error(f"{failed}: {reason}")
        st.caption(f"Full log: `{job.log}`")


def show_train_job(job: J.Job) -> None:
    J.escalate_stop(job)
    state, reason = J.state(job)
    info = J.run_info(job.out)
    m = info.get("metrics")
    total = int(job.config.get("epochs") or 1)
    done = 0 if m is None else len(m)
    job_status(job, state, reason, done / total, f"**{job.id}** — {STATE_TEXT[state]} · epoch {done}/{total}",
               what=f"Run **{job.id}**", done_text="it now appears on every page", failed="Training failed")
    if m is not None and len(m):
        left, right = st.columns(2)
        with left:
            fig = C.figure("Test accuracy", "epoch", "test accuracy (%)", height=300)
            fig.add_scatter(x=m["epoch"], y=m["test_acc"], mode="lines+markers", hovertemplate="%{y:.2f}%",
                            name="test accuracy")
            fig.update_xaxes(range=[0, total + 0.5])
            C.show(fig, key=f"live_acc_{job.id}")
        with right:
            fig = C.figure("Frozen fraction", "epoch", "frozen weights (%)", height=300)
            fig.add_scatter(x=m["epoch"], y=100 * m["frozen_fraction"], mode="lines+markers",
                            hovertemplate="%{y:.1f}%", name="frozen")
            fig.update_xaxes(range=[0, total + 0.5])
            fig.update_yaxes(range=[0, 101])
            C.show(fig, key=f"live_frozen_{job.id}")
    elif state == "pretraining":
        st.caption(f"Pre-training the full-precision model ({job.config.get('fp_epochs')} epochs, cached per "
                   "model/dataset/seed); QAT and recording start next.")


# ---- real sweep -------------------------------------------------------------------------------------------
def parse_thresholds(text: str) -> list[float]:
    vals = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    if not vals:
        raise ValueError("give at least one threshold")
    if any(v < 0 for v in vals):
        raise ValueError("thresholds must be ≥ 0")
    return sorted(set(vals))


def sweep_tab() -> None:
    st.caption("Train a grid of real LTS runs (one after another, plus one baseline) and see test accuracy vs "
               "updates eliminated fill in point by point, next to what the replay on a baseline predicts.")
    with st.form("sweep_form"):
        fields = settings_form("sw", with_rule=False)
        c = st.columns(2)
        th_text = c[0].text_input("Thresholds ρ (Δ, comma-separated)", "0.05, 0.1, 0.2, 0.3", key="swp_thresholds")
        schedules = c[1].multiselect("Schedules", ["fixed", "linear", "sine"], default=["fixed"],
                                     key="swp_schedules", format_func=C.SCHEDULE_NAMES.get)
        decay = st.select_slider("EMA decay m", C.DECAYS, value=0.99, key="swp_decay")
        submitted = st.form_submit_button("Start sweep", type="primary")
    if submitted:
        fields["decay"] = decay
        try:
            ths = parse_thresholds(th_text)
            if not schedules:
                raise ValueError("pick at least one schedule")
        except ValueError as e:
            st.error(f"Invalid sweep: {e}")
            ths = None
        cfg = validate({**fields, "rule": "lts"}) if ths else None
        if cfg is not None:
            base = cfg.model_dump()
            job = J.start_sweep(base, ths, schedules, C.runs_folder())
            st.session_state["sweep_job"] = job.id
            st.toast(f"Started sweep {job.id}")
    job = J.registry().get(st.session_state.get("sweep_job", ""))
    groups = sorted({r["group"] for r in C.all_runs() if r.get("group", "") and r["group"].startswith("sweep")},
                    reverse=True)
    if job is not None:
        if job.running or not job.announced:
            sweep_monitor(job.id)
        else:
            C.guard(lambda: show_sweep(job.out.name, job))
    elif groups:
        g = st.selectbox("Show an earlier sweep", groups, key="swp_group")
        C.guard(lambda: show_sweep(g, None))


@st.fragment(run_every=2.0)
def sweep_monitor(job_id: str) -> None:
    job = J.registry().get(job_id)
    if job is None:
        return
    C.guard(lambda: show_sweep(job.out.name, job))
    if not job.running and not job.announced:
        job.announced = True
        C.refresh_runs()
        st.rerun()


def show_sweep(group: str, job: J.Job | None) -> None:
    rows = [r for r in C.all_runs() if r.get("group") == group]
    done = [r for r in rows if r["ok"] and r["status"] == "complete"]
    if job is not None:
        J.escalate_stop(job)
        state, reason = J.state(job)
        total = job.n_runs
        text = "running" if state in ("pretraining", "training") else STATE_TEXT[state]
        job_status(job, state, reason, len(done) / total,
                   f"**{group}** — {text} · {len(done)}/{total} runs complete",
                   what=f"Sweep **{group}**", done_text="its runs appear on every page",
                   failed="The sweep failed")
        base_cfg, thresholds, schedules = job.config, job.thresholds, job.schedules
    else:
        lts_rows = [r for r in rows if C.is_lts(r)]
        thresholds = sorted({float(r["threshold"]) for r in lts_rows if r.get("threshold") is not None})
        schedules = sorted({r["schedule"] for r in lts_rows if r.get("schedule")})
        base_cfg = None
        st.caption(f"{len(done)} complete run(s) in {group}.")
    for r in rows:
        if not r["ok"]:
            st.error(f"{r['run_id']}: {r['error']}")
        elif r["status"] == "failed":
            st.error(f"{r['run_id']} failed: {r.get('reason')}")

    fig = C.figure("Test accuracy vs updates eliminated", "updates eliminated (%)", "test accuracy (%)",
                   hovermode="closest")
    for i, sch in enumerate(schedules):
        pts = [r for r in done if C.is_lts(r) and r.get("schedule") == sch and r.get("test_acc") is not None]
        pts.sort(key=lambda r: r["threshold"])
        if pts:
            fig.add_scatter(x=[100 * (r["updates_eliminated"] or 0) for r in pts], y=[r["test_acc"] for r in pts],
                            mode="lines+markers+text", text=[f"ρ={r['threshold']:g}" for r in pts],
                            textposition="top center", marker=dict(size=10, color=C.color(i)),
                            line=dict(color=C.color(i)), name=f"actual LTS, {C.SCHEDULE_NAMES[sch]}",
                            hovertemplate="ρ=%{text}<br>updates eliminated %{x:.1f}%<br>test acc %{y:.2f}%"
                                          "<extra></extra>")
    base_done = next((r for r in done if r.get("rule") == "none"), None)
    if base_done is not None and base_done.get("test_acc") is not None:
        fig.add_hline(y=base_done["test_acc"], line_dash="dash", line_color="black",
                      annotation_text=f"baseline {base_done['test_acc']:.2f}%")

    # prediction from a replay on a baseline of the same setup (the sweep's own once it is trained)
    baseline = base_done
    if baseline is None and base_cfg is not None:
        setup = tuple(base_cfg.get(k) for k in C.SETUP_KEYS)
        baseline = next((r for r in C.ok_runs() if r.get("rule") == "none" and r["status"] == "complete"
                         and r.get("setup") == setup), None)
    if baseline is not None and baseline.get("n_records", 0) >= 2:
        decay = float((base_cfg or {}).get("decay") or next((r.get("decay") for r in rows if C.is_lts(r)), 0.99))
        warm = (base_cfg or {}).get("warmup_epochs")
        warm = C.warmup_epochs_of(baseline) if warm is None else float(warm)
        W = C.epochs_to_steps(baseline, warm)
        pred = []
        for i, sch in enumerate(schedules):
            idx = C.replay_index(baseline, sch, W, decay)
            for t in thresholds:
                if t <= idx.max_ratio:
                    pred.append((sch, t, idx.query(t).updates_eliminated))
        for sch, t, ue in pred:
            fig.add_vline(x=100 * ue, line_dash="dot", line_color=C.color(schedules.index(sch)), opacity=0.6,
                          annotation_text=f"ρ={t:g}", annotation_position="bottom right",
                          annotation_font_size=10)
        if pred:
            fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(dash="dot", color="grey"),
                            name=f"updates eliminated predicted by replay on {baseline['run_id']}")
        st.caption(f"Dotted vertical lines: updates eliminated predicted by replaying each threshold on baseline "
                   f"**{baseline['run_id']}** (warm-up {warm:g} epochs, m={decay}). Accuracy cannot be "
                   "predicted by a replay: the points show the real runs.")
    else:
        st.caption("The replay prediction appears once a baseline run with the same setup exists (the sweep "
                   "trains one at the end).")
    fig.update_xaxes(range=[0, 100])
    C.show(fig, key=f"sweep_real_{group}")


def body() -> None:
    st.title("Train")
    gpu = J.cuda_device()
    if gpu:
        st.success(f"Device: **CUDA** ({gpu}) — training runs on the GPU.")
    else:
        st.info("Device: **CPU** (no CUDA GPU visible to torch). digits and mnist1d train in seconds to minutes.")
    st.caption(f"New runs are written to `{C.runs_folder()}`. Training runs in a background process; this page "
               "polls the run store and stays responsive.")
    t1, t2 = st.tabs(["One run", "Real threshold sweep"])
    with t1:
        C.guard(single_run_tab)
    with t2:
        C.guard(sweep_tab)
    active = [j for j in J.registry().values() if j.running]
    if active:
        st.caption("Running jobs of this app: " + ", ".join(f"{j.id} ({j.kind})" for j in active))


C.guard(body)
