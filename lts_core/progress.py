"""Progress of a training process, for whoever launched it (the app's background jobs).

When the environment variable SCRATCHOFF_PROGRESS_DIR names a folder, `report()` keeps one small JSON file per
process and phase there, `<pid>-<phase>.json`, rewritten atomically at each epoch of full-precision pre-training ("fp") and of QAT
("qat"): {"pid", "run", "phase", "done", "total", "phase_started", "time"} (Unix times, seconds). Without the
variable it does nothing. A sweep's child processes inherit the variable, so every run of a sweep reports.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "SCRATCHOFF_PROGRESS_DIR"
_phase_started: dict[tuple, float] = {}


def report(phase: str, done: int, total: int, run: str | None = None) -> None:
    """Record that `done` of `total` epochs of `phase` ("fp" or "qat") of `run` are finished."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    now = time.time()
    started = _phase_started.setdefault((phase, run), now)
    data = {"pid": os.getpid(), "run": run, "phase": phase, "done": int(done), "total": int(total),
            "phase_started": started, "time": now}
    try:
        path = Path(folder) / f"{os.getpid()}-{phase}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:  # progress is a courtesy: never let it stop training
        pass


def read_reports(folder: str | os.PathLike) -> list[dict]:
    """Every process's latest report in `folder` (unreadable or half-written files are skipped)."""
    out = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and {"phase", "done", "total"} <= d.keys():
            out.append(d)
    return out
