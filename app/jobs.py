"""Background training jobs of the app: `python -m lts_core train|sweep` subprocesses.

A job is started with subprocess.Popen (stdout/stderr to a log file in `<runs>/.logs/`, a hidden folder that
run listings skip) and kept in a process-wide registry so every browser session sees it. The app only polls
the run store and the jobs' progress files (`lts_core.progress`); it never trains in its own process.

Limits: at most `max_jobs()` jobs run at once (SCRATCHOFF_MAX_JOBS, default 1); more are refused with a message.
Sizes are capped (`LIMITS`). Every job gets a unique id, and its run folder is reserved under a lock before
the process starts, so two browser tabs asking for the same run name cannot both get it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from lts_core.progress import ENV as PROGRESS_ENV, read_reports
from lts_core.store import RunError, open_run

LOG_DIR = ".logs"
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
MAX_JOBS_ENV = "SCRATCHOFF_MAX_JOBS"
DEFAULT_MAX_JOBS = 1
LIMITS = {"epochs": 1000, "fp_epochs": 1000, "sweep_runs": 25, "name_length": 120}
_LOCK = threading.Lock()


class JobRefused(Exception):
    """A job that is not started (limit reached, name taken, size too large); the message says why."""


@dataclass
class Job:
    id: str
    kind: str                       # "train" | "sweep"
    proc: subprocess.Popen
    out: Path                       # run folder (train) or sweep folder (sweep)
    log: Path
    cmd: list[str]
    config: dict                    # TrainConfig fields (base settings for a sweep)
    progress_dir: Path | None = None
    started: float = field(default_factory=time.time)
    thresholds: list[float] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    stop_requested: bool = False
    stop_time: float | None = None
    announced: bool = False         # the page has reacted to its end (cache cleared, rerun)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def n_runs(self) -> int:
        """Runs this job trains (a sweep: thresholds × schedules + one baseline)."""
        return len(self.thresholds) * len(self.schedules) + 1 if self.kind == "sweep" else 1


@st.cache_resource
def registry() -> dict[str, Job]:
    """Jobs started by this app process (shared by all sessions)."""
    return {}


def max_jobs() -> int:
    """Concurrent background jobs allowed: $SCRATCHOFF_MAX_JOBS (≥ 1), default 1."""
    try:
        return max(1, int(os.environ.get(MAX_JOBS_ENV, DEFAULT_MAX_JOBS)))
    except ValueError:
        return DEFAULT_MAX_JOBS


def running_jobs() -> list[Job]:
    return [j for j in registry().values() if j.running]


def cuda_device() -> str | None:
    """The CUDA device name when torch sees one, else None."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def check_run_name(name: str) -> str | None:
    """An error message for an invalid run folder name, else None."""
    if len(name) > LIMITS["name_length"]:
        return f"run name too long ({len(name)} characters; at most {LIMITS['name_length']})"
    if not _RUN_ID_RE.fullmatch(name) or name in (".", ".."):
        return (f"invalid run name {name!r}: use letters, digits and . _ - + = "
                "(starting with a letter or digit)")
    return None


def check_sizes(fields: dict) -> str | None:
    """An error message when a size is beyond the app's limits (`LIMITS`), else None."""
    for key in ("epochs", "fp_epochs"):
        v = fields.get(key)
        if v is not None and v > LIMITS[key]:
            return f"{key.replace('_', ' ')} = {v:,} is more than this app starts (at most {LIMITS[key]:,})"
    return None


def _taken(folder: Path) -> set[Path]:
    return {j.out for j in registry().values() if j.out.parent == folder}


def _reserve(folder: Path, name: str, exact: bool) -> Path:
    """A run folder name nobody has (on disk or being started by a job); `exact` refuses instead of adding
    a suffix. Call under _LOCK."""
    taken = _taken(folder)
    p, i = folder / name, 2
    while p.exists() or p in taken:
        if exact:
            raise JobRefused(f"a run named {name!r} already exists or is being started in {folder}; "
                             "choose another name")
        p, i = folder / f"{name}-{i}", i + 1
    return p


def _new_id(out: Path) -> str:
    return f"{out.name}#{secrets.token_hex(3)}"


def _check_capacity() -> None:
    active = running_jobs()
    if len(active) >= max_jobs():
        names = ", ".join(j.out.name for j in active)
        raise JobRefused(f"{len(active)} training job{'s' if len(active) > 1 else ''} already running ({names}); "
                         f"this app runs at most {max_jobs()} at a time (set {MAX_JOBS_ENV} to change it). "
                         "Stop it or wait until it ends.")


def train_command(cfg, out: Path) -> list[str]:
    """`python -m lts_core train …` for a TrainConfig (only the options that differ from the defaults)."""
    from lts_core.config import TrainConfig
    default = TrainConfig()
    opts = ["preset", "model", "width", "dataset", "data_root", "bits", "quantizer", "rule", "schedule", "threshold",
            "decay", "granularity", "channel_quantile", "bound_grad", "warmup_epochs", "epochs", "fp_epochs",
            "batch_size", "lr", "seed", "device", "record_every", "max_train"]
    cmd = [sys.executable, "-m", "lts_core", "train"]
    for name in opts:
        value = getattr(cfg, name)
        if value is None or (value == getattr(default, name) and name not in ("model", "dataset", "bits", "rule",
                                                                              "epochs", "fp_epochs")):
            continue
        cmd += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return cmd + ["--out", str(out), "--quiet"]


def _popen(cmd: list[str], log: Path, new_session: bool, progress_dir: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    progress_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{PROGRESS_ENV: str(progress_dir)})
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(Path(__file__).resolve().parent.parent), start_new_session=new_session)


def start_train(cfg, runs_dir: Path, name: str | None = None) -> Job:
    """Launch one training run in the background; its run folder is `<runs_dir>/<name>`.
    Raises JobRefused (limit reached, name taken, sizes too large)."""
    runs_dir = Path(runs_dir)
    problem = check_sizes(cfg.model_dump()) or (check_run_name(name) if name else None)
    if problem:
        raise JobRefused(problem)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        _check_capacity()
        out = _reserve(runs_dir, name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.label()}-s{cfg.seed}",
                       exact=name is not None)
        job_id = _new_id(out)
        logs = runs_dir / LOG_DIR
        log = logs / f"{out.name}.{job_id.rsplit('#', 1)[1]}.log"
        progress = logs / f"{out.name}.{job_id.rsplit('#', 1)[1]}.progress"
        cmd = train_command(cfg, out)
        job = Job(id=job_id, kind="train", proc=_popen(cmd, log, False, progress), out=out, log=log, cmd=cmd,
                  config=cfg.model_dump(), progress_dir=progress)
        registry()[job.id] = job
    return job


def start_sweep(base_fields: dict, thresholds: list[float], schedules: list[str], runs_dir: Path) -> Job:
    """Launch `python -m lts_core sweep` (thresholds × schedules + a baseline, one run after another).
    Raises JobRefused (limit reached, too many runs, sizes too large)."""
    runs_dir = Path(runs_dir)
    n_runs = len(thresholds) * len(schedules) + 1
    if n_runs > LIMITS["sweep_runs"]:
        raise JobRefused(f"this sweep trains {n_runs} runs; the app starts at most {LIMITS['sweep_runs']} in one "
                         "sweep (use the command line for more)")
    problem = check_sizes(base_fields)
    if problem:
        raise JobRefused(problem)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        _check_capacity()
        out = _reserve(runs_dir, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", exact=False)
        job_id = _new_id(out)
        suffix = job_id.rsplit("#", 1)[1]
        logs = runs_dir / LOG_DIR
        logs.mkdir(parents=True, exist_ok=True)
        cfg_path = logs / f"{out.name}.{suffix}.config.json"
        fields = {k: v for k, v in base_fields.items() if k not in ("rule", "threshold", "schedule", "seed")}
        cfg_path.write_text(json.dumps(fields, indent=1))
        seed = int(base_fields.get("seed", 0))
        cmd = [sys.executable, "-m", "lts_core", "sweep", "--thresholds", ",".join(f"{t:g}" for t in thresholds),
               "--schedules", ",".join(schedules), "--seeds", str(seed), "--out", str(out), "--config",
               str(cfg_path)]
        log = logs / f"{out.name}.{suffix}.log"
        progress = logs / f"{out.name}.{suffix}.progress"
        job = Job(id=job_id, kind="sweep", proc=_popen(cmd, log, True, progress), out=out, log=log, cmd=cmd,
                  config=dict(base_fields), progress_dir=progress, thresholds=list(thresholds),
                  schedules=list(schedules))
        registry()[job.id] = job
    return job


def stop(job: Job) -> None:
    """SIGINT: the trainer closes its run as 'interrupted' (readable up to its last record)."""
    if not job.running:
        return
    job.stop_requested = True
    job.stop_time = time.time()
    _signal(job, signal.SIGINT)


def escalate_stop(job: Job, after_s: float = 8.0) -> None:
    """A process that ignores SIGINT (e.g. started from a shell that ignores it) gets SIGTERM, which the
    trainer also turns into a clean 'interrupted' run."""
    if job.stop_requested and job.running and job.stop_time and time.time() - job.stop_time > after_s:
        job.stop_time = time.time()
        _signal(job, signal.SIGTERM)


def _signal(job: Job, sig: int) -> None:
    if job.kind == "sweep":  # the sweep's runs are its children: signal the whole process group
        try:
            os.killpg(job.proc.pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass
    try:
        job.proc.send_signal(sig)
    except ProcessLookupError:
        pass


def log_tail(job: Job, n: int = 40) -> list[str]:
    try:
        return job.log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit))\b:?\s*(.*)$")


def reason_from_log(lines: list[str]) -> str | None:
    """The one-line reason of a failed process: its `error: …` line, else the exception line, else the last
    line (tracebacks themselves are never returned)."""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    for line in reversed(lines):
        m = _EXC_LINE.match(line.strip())
        if m:
            return f"{m.group(1)}: {m.group(3)}".rstrip(": ")
    for line in reversed(lines):
        s = line.strip()
        if s and not s.startswith(("File ", "Traceback", "^", "$ ")):
            return s[:500]
    return None


def run_info(path: Path) -> dict:
    """What the run store says about a run folder: exists, status, reason, metrics (DataFrame or None)."""
    if not (Path(path) / "manifest.json").is_file():
        return {"exists": False, "status": None, "reason": None, "metrics": None}
    try:
        run = open_run(path)
        return {"exists": True, "status": run.status, "reason": run.reason, "metrics": run.metrics,
                "total_steps": run.manifest.get("total_steps")}
    except RunError as e:  # written at this instant or broken: report, keep polling
        return {"exists": True, "status": "unreadable", "reason": str(e), "metrics": None}


def state(job: Job) -> tuple[str, str | None]:
    """(state, reason): state is pretraining | training | complete | interrupted | failed."""
    rc = job.returncode
    info = run_info(job.out) if job.kind == "train" else {"exists": True, "status": None, "reason": None}
    if rc is None:
        return ("training" if info["exists"] else "pretraining"), None
    if rc == 0:
        return "complete", None
    if job.stop_requested or rc in (130, -signal.SIGINT):
        where = "" if info["exists"] else " before QAT started (nothing was recorded)"
        return "interrupted", (info.get("reason") or f"stopped by you{where}")
    reason = info.get("reason") if info.get("status") == "failed" else None
    return "failed", reason or reason_from_log(log_tail(job)) or f"the process exited with code {rc}"


# ---- progress and ETA ---------------------------------------------------------------------------------------
@dataclass
class Progress:
    run: str | None      # run folder name (None: a sweep's shared pre-training)
    phase: str           # "fp" | "qat"
    done: int
    total: int
    eta_s: float | None  # seconds left in this phase (None until one epoch is done)
    live: bool           # its process still runs

    @property
    def text(self) -> str:
        what = "pre-training (full precision)" if self.phase == "fp" else "QAT"
        eta = "" if self.eta_s is None or self.done >= self.total else f", about {fmt_seconds(self.eta_s)} left"
        return f"{what} epoch {self.done}/{self.total}{eta}"


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True


def progress(job: Job, now: float | None = None) -> list[Progress]:
    """The job's processes' latest progress, one entry per (process, phase), oldest report first."""
    if job.progress_dir is None or not job.progress_dir.is_dir():
        return []
    now = time.time() if now is None else now
    out = []
    for d in sorted(read_reports(job.progress_dir), key=lambda d: float(d.get("time", 0))):
        done, total = int(d["done"]), int(d["total"])
        eta = None
        if 0 < done < total:
            elapsed = float(d.get("time", now)) - float(d.get("phase_started", now))
            eta = max(elapsed / done * (total - done) - (now - float(d.get("time", now))), 0.0)
        out.append(Progress(d.get("run"), d["phase"], done, total, eta, _pid_alive(d.get("pid"))))
    return out
