"""Train: start a recorded run (or a real threshold sweep) in the background and watch it live."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[1])
if _APP not in sys.path:
    sys.path.insert(0, _APP)

import streamlit as st  # noqa: E402

import common as C  # noqa: E402
import jobs as J  # noqa: E402
from lts_core import DATASETS, MODELS, DatasetError, load_dataset  # noqa: E402
from lts_core.channels import DEFAULT_CHANNEL_QUANTILE  # noqa: E402
from lts_core.config import ConfigError, make_config  # noqa: E402

NEEDS_FOLDER = ("mnist", "fashion-mnist", "cifar10", "cifar100")
RULES = {"lts": "LTS", "none": "none (baseline)", "osc": "oscillation"}
STATE_TEXT = {"pretraining": "pre-training in full precision (not recorded yet)", "training": "QAT running",
              "complete": "complete", "interrupted": "interrupted", "failed": "failed"}


def settings_form(prefix: str, with_rule: bool) -> dict:
    """The common training settings (live widgets, no form: the command line below follows every change);
    returns TrainConfig fields (not yet validated)."""
    c = st.columns(5)
    f: dict = {}
    f["model"] = c[0].selectbox("Model", MODELS, key=f"{prefix}_model",
                                help="resnet18 (11.2M weights) and mobilenetv2 (2.2M) are the LTS paper's CIFAR "
                                     "models, adapted to 32×32 inputs; transformer is a small encoder for "
                                     "mnist1d-seq")
    f["width"] = c[1].number_input("Model width", min_value=1, max_value=1024, value=None, step=1,
                                   key=f"{prefix}_width", placeholder="model default",
                                   help="the model's base width (channels of its first stage; empty: the model's "
                                        "own, e.g. 64 for resnet18, 32 for mobilenetv2). On a CPU, resnet18 at 16 "
                                        "or mobilenetv2 at 8 keeps the layout at a fraction of the cost")
    f["dataset"] = c[2].selectbox("Dataset", DATASETS, key=f"{prefix}_dataset",
                                  help="digits, mnist1d and mnist1d-seq need no download; mnist, fashion-mnist, "
                                       "cifar10 and cifar100 need their files in a data folder")
    f["bits"] = c[3].number_input("Weight bits", 1, 8, 2, key=f"{prefix}_bits")
    f["seed"] = c[4].number_input("Seed", 0, 2**31 - 1, 0, key=f"{prefix}_seed")
    if f["dataset"] in NEEDS_FOLDER:
        f["data_root"] = st.text_input(
            "Data folder", key=f"{prefix}_data_root", placeholder="/path/to/the/dataset/files",
            help="mnist and fashion-mnist: the four IDX files (train-images-idx3-ubyte …, optionally .gz); "
                 "cifar10: the cifar-10-batches-py (or -bin) files; cifar100: cifar-100-python (train, test) or "
                 "cifar-100-binary (train.bin, test.bin). Nothing is downloaded.").strip() or None
    if with_rule:
        c = st.columns([2, 2, 2, 2])
        f["rule"] = c[0].selectbox("Freezing rule", list(RULES), key=f"{prefix}_rule", format_func=RULES.get,
                                   help="LTS: the Lottery Ticket Scratcher (freeze weights that settled); none: "
                                        "baseline QAT; oscillation: Nagel et al. 2022 (freeze oscillating weights)")
        f["schedule"] = c[1].selectbox("Threshold schedule", ["linear", "fixed", "sine"], key=f"{prefix}_schedule",
                                       format_func=C.SCHEDULE_NAMES.get)
        f["threshold"] = c[2].number_input("Threshold ratio ρ (Δ)", min_value=0.0, max_value=C.RATIO_MAX, value=None,
                                           step=1 / 64, format="%.4f", key=f"{prefix}_threshold",
                                           placeholder="0.1 fixed · 1.0 growth",
                                           help="empty: 0.1 for fixed, 1.0 for the growth schedules")
        f["decay"] = c[3].select_slider("EMA decay m", C.DECAYS, value=0.99, key=f"{prefix}_decay")
        savings_form(prefix, f)
    c = st.columns(4)
    f["epochs"] = c[0].number_input("QAT epochs", 1, J.LIMITS["epochs"], 30, step=1, key=f"{prefix}_epochs",
                                    help=f"at most {J.LIMITS['epochs']:,} here")
    f["fp_epochs"] = c[1].number_input("FP pre-training epochs", 0, J.LIMITS["fp_epochs"], 20, step=1,
                                       key=f"{prefix}_fp_epochs", help="cached per model, dataset and seed")
    f["warmup_epochs"] = c[2].number_input("Warm-up (epochs)", min_value=0.0, value=None, step=1.0,
                                           key=f"{prefix}_warmup", placeholder="20% of epochs")
    f["record_every"] = c[3].number_input("Record every (steps)", min_value=1, value=None, step=1,
                                          key=f"{prefix}_record_every", placeholder="once per epoch",
                                          help="1 = every step (exact replay, bigger run folder)")
    if st.toggle("Reference preset (train as the paper's code)", key=f"{prefix}_preset",
                 help="every conv/linear layer quantized at these bits (first and last included), the 2q − 1 "
                      "weight output, epochs counting the partial last batch, SGD momentum 0.9 / weight decay "
                      "1e-4 for the weights and Adam 1e-4 for the quantizer bounds. It needs a model with "
                      "BatchNorm (cnn1d, cnn2d, resnet…): 2q − 1 has no scale of its own."):
        f["preset"] = "reference"
    f["device"] = "auto"
    return f


def savings_form(prefix: str, f: dict) -> None:
    """What a frozen weight saves: LTS granularity (and its channel quantile) and what the bounds learn from."""
    if f["rule"] == "none":
        return
    c = st.columns([2, 2, 2, 2])
    if f["rule"] == "lts":
        f["granularity"] = c[0].selectbox(
            "Freeze", ["weight", "channel"], key=f"{prefix}_granularity",
            format_func={"weight": "single weights (the paper)", "channel": "whole output channels"}.get,
            help="--granularity: 'channel' freezes a whole row of a Linear or filter of a Conv at once, which a "
                 "planned backward can skip; 'weight' is the paper's rule")
        if f["granularity"] == "channel":
            f["channel_quantile"] = c[1].number_input(
                "Channel quantile", min_value=0.01, max_value=1.0, value=DEFAULT_CHANNEL_QUANTILE, step=0.05,
                key=f"{prefix}_channel_quantile",
                help="--channel-quantile: a channel freezes when this quantile of its weights' EMA distances "
                     f"passes the threshold ({DEFAULT_CHANNEL_QUANTILE:g}, the default: a quarter of them settled; "
                     "0.5 = median; 1 = max: every weight settled)")
    f["bound_grad"] = c[2].selectbox(
        "Bounds learn from", ["all", "active"], key=f"{prefix}_bound_grad",
        format_func={"all": "all weights (the reference)", "active": "unfrozen weights only"}.get,
        help="--bound-grad: with 'all' every weight stays in the quantizer bounds' gradient, so the weight-gradient "
             "computation runs in full and no time is saved; 'active' lets frozen channels skip it")
    if f.get("granularity") == "channel" and f["bound_grad"] == "all":
        c[3].caption("Whole channels with bounds learning from all weights: accounted and structural FLOPs, but "
                     "no measured time saved. Pick 'unfrozen weights only' to save backward time.")


def validate(fields: dict):
    """A TrainConfig, or None after showing a clear error."""
    try:
        return make_config(**fields)
    except ConfigError as e:
        st.error(C.plain(e))
        return None


def check_data_folder(cfg) -> str | None:
    """For datasets read from a folder: a one-line problem with the folder, else None (files are read once,
    as training will read them)."""
    if cfg.dataset not in NEEDS_FOLDER:
        return None
    if not cfg.data_root:
        return f"{cfg.dataset} needs a data folder with its files (nothing is downloaded): fill in 'Data folder'"
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        return f"data folder {root} does not exist or is not a folder"
    try:
        with st.spinner(f"Checking the {cfg.dataset} files in {root}…"):
            load_dataset(cfg.dataset, root=str(root), seed=cfg.seed, max_train=cfg.max_train,
                         max_test=cfg.max_test)
    except (DatasetError, OSError, ValueError) as e:
        return str(e)
    return None


def command_text(cmd: list[str]) -> str:
    return shlex.join(["python"] + cmd[1:])


# ---- one run ----------------------------------------------------------------------------------------------
def single_run_tab() -> None:
    fields = settings_form("tr", with_rule=True)
    name = st.text_input("Run name (optional)", key="tr_name", placeholder="date-label-seed",
                         max_chars=J.LIMITS["name_length"]).strip() or None
    try:
        preview = make_config(**fields)
        out = C.runs_folder() / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-{preview.label()}-s{preview.seed}")
        st.caption("Equivalent command line:")
        st.code(command_text(J.train_command(preview, out)), language="bash", wrap_lines=True)
    except ConfigError as e:
        st.caption(f"Equivalent command line: — ({C.plain(e)})")
    if st.button("Start training", type="primary", key="tr_start"):
        start_single(fields, name)
    job = J.registry().get(st.session_state.get("train_job", ""))
    if job is None:
        return
    st.caption("Command: " + C.plain(command_text(job.cmd)))
    if job.running or not job.announced:
        train_monitor(job.id)
    else:
        show_train_job(job)


def start_single(fields: dict, name: str | None) -> None:
    cfg = validate(fields)
    if cfg is None:
        return
    if name and (err := J.check_run_name(name)):
        st.error(C.plain(err))
        return
    launch(cfg, "train_job", lambda: J.start_train(cfg, C.runs_folder(), name))


def launch(cfg, session_key: str, start) -> None:
    """Check the data folder, then `start()` a job; a refusal (limits, name taken) is one line, nothing starts."""
    problem = check_data_folder(cfg)
    if problem:
        st.error(f"Not started: {C.plain(problem)}")
        return
    try:
        job = start()
    except J.JobRefused as e:
        st.error(f"Not started: {C.plain(e)}")
        return
    st.session_state[session_key] = job.id
    st.toast(f"Started {job.kind} {C.plain(job.out.name)}")


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
    c1.progress(min(max(frac, 0.0), 1.0), text=label)
    if job.running:
        c2.button("Stop", key=f"stop_{job.id}", on_click=J.stop, args=(job,),
                  help="send SIGINT: running runs are closed as 'interrupted' and stay readable")
    if state == "complete":
        st.success(f"{what} is complete; {done_text}.")
    elif state == "interrupted":
        st.warning(f"{what} was interrupted: {C.plain(reason)}.")
    elif state == "failed":
        st.error(f"{failed}: {C.plain(reason)}")
        st.caption(f"Full log: {C.plain(job.log)}")


def phase_fraction(p: J.Progress | None, fp_epochs: int, epochs: int) -> float:
    """Share of a run's work done, counting FP and QAT epochs alike."""
    if p is None:
        return 0.0
    total = max(fp_epochs + epochs, 1)
    done = p.done if p.phase == "fp" else fp_epochs + p.done
    return done / total


def show_train_job(job: J.Job) -> None:
    J.escalate_stop(job)
    state, reason = J.state(job)
    info = J.run_info(job.out)
    m = info.get("metrics")
    total = int(job.config.get("epochs") or 1)
    fp_total = int(job.config.get("fp_epochs") or 0)
    prog = J.progress(job)
    p = prog[-1] if prog else None
    if p is not None and p.phase == "fp" and state == "training":
        state = "pretraining"
    if state in ("pretraining", "training") and p is not None:
        label = f"**{C.plain(job.out.name)}** — {p.text}"
    else:
        done = 0 if m is None else len(m)
        label = f"**{C.plain(job.out.name)}** — {STATE_TEXT[state]} · epoch {done}/{total}"
    frac = 1.0 if state == "complete" else phase_fraction(p, fp_total, total)
    job_status(job, state, reason, frac, label, what=f"Run **{C.plain(job.out.name)}**",
               done_text="it now appears on every page", failed="Training failed")
    if m is not None and len(m):
        left, right = st.columns(2)
        with left:
            fig = C.figure("Test accuracy", "epoch", "test accuracy (%)", height=300)
            fig.add_scatter(x=m["epoch"], y=m["test_acc"], mode="lines+markers", hovertemplate="%{y:.2f}%",
                            name="test accuracy")
            fig.update_xaxes(range=[0, total + 0.5])
            C.show(fig, key=f"live_acc_{job.id}")
        with right:
            fig = C.figure("Frozen fraction and train loss", "epoch", "frozen weights (%)", height=300)
            fig.add_scatter(x=m["epoch"], y=100 * m["frozen_fraction"], mode="lines+markers",
                            hovertemplate="%{y:.1f}%", name="frozen (%)")
            if "train_loss" in m:
                fig.add_scatter(x=m["epoch"], y=m["train_loss"], mode="lines", yaxis="y2", name="train loss",
                                line=dict(color=C.color(1), dash="dot"), hovertemplate="%{y:.4f}")
                fig.update_layout(yaxis2=dict(title="train loss", overlaying="y", side="right", showgrid=False))
            fig.update_xaxes(range=[0, total + 0.5])
            fig.update_yaxes(range=[0, 101])
            C.show(fig, key=f"live_frozen_{job.id}")
    elif state == "pretraining":
        st.caption(f"Pre-training the full-precision model ({fp_total} epochs, cached per model/dataset/seed); QAT "
                   "and recording start next.")


# ---- real sweep -------------------------------------------------------------------------------------------
def parse_thresholds(text: str) -> list[float]:
    vals = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    if not vals:
        raise ValueError("give at least one threshold")
    if any(v < 0 or v != v for v in vals):
        raise ValueError("thresholds must be numbers ≥ 0")
    return sorted(set(vals))


def sweep_tab() -> None:
    st.caption("Train a grid of real LTS runs (one after another, plus one baseline) and see test accuracy vs "
               "updates eliminated fill in point by point, next to what the replay on a baseline predicts.")
    fields = settings_form("sw", with_rule=False)
    c = st.columns(2)
    th_text = c[0].text_input("Thresholds ρ (Δ, comma-separated)", "0.05, 0.1, 0.2, 0.3", key="swp_thresholds")
    schedules = c[1].multiselect("Schedules", ["fixed", "linear", "sine"], default=["fixed"],
                                 key="swp_schedules", format_func=C.SCHEDULE_NAMES.get)
    decay = st.select_slider("EMA decay m", C.DECAYS, value=0.99, key="swp_decay")
    if st.button("Start sweep", type="primary", key="swp_start"):
        fields["decay"] = decay
        start_sweep_job(fields, th_text, schedules)
    job = J.registry().get(st.session_state.get("sweep_job", ""))
    groups = sorted({r["group"] for r in C.all_runs() if (r.get("group") or "").startswith("sweep")},
                    reverse=True)
    if job is not None:
        if job.running or not job.announced:
            sweep_monitor(job.id)
        else:
            C.guard(lambda: show_sweep(job.out.name, job))
    elif groups:
        g = st.selectbox("Show an earlier sweep", groups, key="swp_group")
        C.guard(lambda: show_sweep(g, None))


def start_sweep_job(fields: dict, th_text: str, schedules: list[str]) -> None:
    try:
        ths = parse_thresholds(th_text)
        if not schedules:
            raise ValueError("pick at least one schedule")
    except ValueError as e:
        st.error(f"Invalid sweep: {C.plain(e)}")
        return
    cfg = validate({**fields, "rule": "lts"})
    if cfg is None:
        return
    launch(cfg, "sweep_job", lambda: J.start_sweep(cfg.model_dump(), ths, schedules, C.runs_folder()))


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


def sweep_progress_table(job: J.Job, rows: list[dict]) -> tuple[float, str]:
    """Per-run progress of a sweep (live); returns (fraction of all epochs done, overall ETA text)."""
    prog = J.progress(job)
    by_run: dict = {}
    for p in prog:
        by_run[p.run] = p          # reports come oldest first: the run's latest phase wins
    fp_total = int(job.config.get("fp_epochs") or 0)
    epochs = int(job.config.get("epochs") or 1)
    done_rows = {r["run_id"].split("/", 1)[-1]: r for r in rows}
    table, fracs, seconds_per_epoch = [], [], []
    shared = by_run.get(None)
    if shared is not None:
        table.append({"run": "(shared full-precision pre-training)", "progress": shared.text,
                      "status": "done" if shared.done >= shared.total else "running"})
    for p in prog:
        if p.eta_s is not None and p.done:
            seconds_per_epoch.append(p.eta_s / max(p.total - p.done, 1))
    for name, p in by_run.items():
        if name is None:
            continue
        r = done_rows.get(name)
        status = r["status"] if r else ("running" if p.live else "ended")
        table.append({"run": name, "progress": p.text, "status": status})
        fracs.append(1.0 if status == "complete" else phase_fraction(p, 0, epochs) if p.phase == "qat" else 0.0)
    n = job.n_runs
    frac = (sum(fracs) + 0.0) / max(n, 1)
    eta = ""
    if job.running and fracs:
        running = [p for k, p in by_run.items() if k is not None and p.live and p.eta_s is not None]
        left_now = sum(p.eta_s for p in running)
        per_run = None
        finished = [r for r in rows if r["ok"] and r["status"] == "complete"]
        if finished:
            import numpy as np
            per_run = float(np.mean([C.load_run(r).metrics["seconds"].sum() for r in finished]))
        not_started = max(n - len([k for k in by_run if k is not None]), 0)
        if per_run is not None:
            eta = f" · about {J.fmt_seconds(left_now + not_started * per_run)} left"
        elif left_now:
            eta = f" · current run: about {J.fmt_seconds(left_now)} left"
    if table:
        st.dataframe(table, hide_index=True, width="stretch")
    return frac, eta


def show_sweep(group: str, job: J.Job | None) -> None:
    rows = [r for r in C.all_runs() if r.get("group") == group]
    done = [r for r in rows if r["ok"] and r["status"] == "complete"]
    if job is not None:
        J.escalate_stop(job)
        state, reason = J.state(job)
        total = job.n_runs
        text = "running" if state in ("pretraining", "training") else STATE_TEXT[state]
        frac, eta = sweep_progress_table(job, rows) if state in ("pretraining", "training") else (1.0, "")
        job_status(job, state, reason, max(frac, len(done) / total),
                   f"**{C.plain(group)}** — {text} · {len(done)}/{total} runs complete{eta}",
                   what=f"Sweep **{C.plain(group)}**", done_text="its runs appear on every page",
                   failed="The sweep failed")
        base_cfg, thresholds, schedules = job.config, job.thresholds, job.schedules
    else:
        lts_rows = [r for r in rows if C.is_lts(r)]
        thresholds = sorted({float(r["threshold"]) for r in lts_rows if r.get("threshold") is not None})
        schedules = sorted({r["schedule"] for r in lts_rows if r.get("schedule")})
        base_cfg = None
        st.caption(f"{len(done)} complete run(s) in {C.plain(group)}.")
    for r in rows:
        if not r["ok"]:
            st.error(f"{C.plain(r['run_id'])}: {C.plain(r['error'])}")
        elif r["status"] == "failed":
            st.error(f"{C.plain(r['run_id'])} failed: {C.plain(r.get('reason'))}")

    fig = C.figure("Test accuracy vs updates eliminated", "updates eliminated, over quantized weights (%)",
                   "test accuracy (%)", hovermode="closest")
    for i, sch in enumerate(schedules):
        pts = [r for r in done if C.is_lts(r) and r.get("schedule") == sch and r.get("test_acc") is not None]
        pts.sort(key=lambda r: r["threshold"])
        if pts:
            fig.add_scatter(x=[100 * (r["updates_eliminated"] or 0) for r in pts], y=[r["test_acc"] for r in pts],
                            mode="lines+markers+text", text=[f"ρ={r['threshold']:g}" for r in pts],
                            textposition="top center", marker=dict(size=10, color=C.color(i)),
                            line=dict(color=C.color(i)), name=f"actual LTS, {C.SCHEDULE_NAMES[sch]}",
                            hovertemplate="%{text}<br>updates eliminated %{x:.1f}%<br>test acc %{y:.2f}%"
                                          "<extra></extra>")
    base_done = next((r for r in done if r.get("rule") == "none"), None)
    if base_done is not None and base_done.get("test_acc") is not None:
        fig.add_hline(y=base_done["test_acc"], line_dash="dash", line_color=C.INK,
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
        for sch in schedules:
            idx = C.replay_index(baseline, sch, W, decay)
            for t in thresholds:
                if t <= idx.max_ratio:
                    pred.append((sch, t, idx.query(t).updates_eliminated))
        for sch, t, ue in pred:
            fig.add_vline(x=100 * ue, line_dash="dot", line_color=C.color(schedules.index(sch)), opacity=0.6,
                          annotation_text=f"ρ={t:g}", annotation_position="bottom right",
                          annotation_font_size=10)
        if pred:
            fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(dash="dot", color=C.INK),
                            name=f"updates eliminated predicted by replay on {C.plot_text(baseline['run_id'])}")
        st.caption(f"Dotted vertical lines: updates eliminated predicted by replaying each threshold on baseline "
                   f"**{C.plain(baseline['run_id'])}** (warm-up {warm:g} epochs, m={decay}). Accuracy cannot be "
                   "predicted by a replay: the points show the real runs.")
    else:
        st.caption("The replay prediction appears once a baseline run with the same setup exists (the sweep "
                   "trains one first).")
    fig.update_xaxes(range=[-2, 100])
    C.show(fig, key=f"sweep_real_{group}")


def body() -> None:
    st.title("Train")
    gpu = J.cuda_device()
    if gpu:
        st.success(f"Device: **CUDA** ({C.plain(gpu)}) — training runs on the GPU.")
    else:
        st.info("Device: **CPU** (no CUDA GPU visible to torch). digits and mnist1d train in seconds to minutes.")
    st.caption(f"New runs are written to {C.plain(C.runs_folder())}. Training runs in a background process (at most "
               f"{J.max_jobs()} at a time); this page polls the run store and stays responsive.")
    t1, t2 = st.tabs(["One run", "Real threshold sweep"])
    with t1:
        C.guard(single_run_tab)
    with t2:
        C.guard(sweep_tab)
    active = J.running_jobs()
    if active:
        st.caption("Running jobs of this app: " + ", ".join(f"{C.plain(j.out.name)} ({j.kind})" for j in active))


C.guard(body)
