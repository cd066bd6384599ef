"""Command line: `python -m lts_core train|sweep|runs`.

Invalid input prints one clear line and exits with code 2 before anything is written or trained: options
and config files are validated first, then the run folder is taken atomically (`os.mkdir`: of two runs
given the same --out, one gets it and the other exits 2). A failure while training (NaN loss, disk full)
prints one line and exits 1; Ctrl-C exits 130. Warnings are printed as one line each.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from .config import NEEDS_DATA_ROOT, ConfigError, TrainConfig, load_config_file, make_config
from .datasets import DATASETS
from .manifest import RUN_ID_PATTERN, one_line
from .models import MODELS
from .store import MANIFEST, runs_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="scratchoff: quantization-aware training with the Lottery Ticket Scratcher.")


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {one_line(msg, 2000)}", err=True)
    raise typer.Exit(code)


def build_config(config: Optional[Path], overrides: dict) -> TrainConfig:
    fields = load_config_file(config) if config else {}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(**fields)


def default_run_dir(cfg: TrainConfig) -> Path:
    return runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.label()}-s{cfg.seed}"


def check_folder_name(path: Path, option: str = "--out") -> None:
    """A run or sweep folder's name must be a valid run id: letters, digits and . _ - + =, at most 255
    bytes, starting with a letter or digit (so no newline, no path trick)."""
    name = path.name
    if len(os.fsencode(name)) > 255:
        fail(f"{option} name is {len(os.fsencode(name))} bytes long; at most 255")
    if not re.fullmatch(RUN_ID_PATTERN, name):
        fail(f"{option} name {one_line(repr(name))} is not allowed: use letters, digits and . _ - + = "
             "(starting with a letter or digit)")


def check_parent(path: Path, option: str = "--out") -> None:
    """The folder that will hold `path` is a folder, or can be created."""
    for p in [path.parent, *path.parent.parents]:
        if p.exists():
            if not p.is_dir():
                fail(f"{option} {path}: {p} is not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                fail(f"{option} {path}: cannot create it, {p} is not writable")
            return


def claim_run_dir(path: Path, pick_free_name: bool = False) -> Path:
    """Create the run folder with one `os.mkdir`: the process that creates it owns it, so two runs never
    share one. With `pick_free_name` (the default --out) a taken name gets a suffix -2, -3, …"""
    check_folder_name(path)
    if path.exists() and not path.is_dir():
        fail(f"--out {path} is a file, not a folder")
    check_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {path}: cannot create {path.parent} ({e.strerror})")
    base = path
    for i in range(2, 1000):
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            if not pick_free_name:
                fail(f"--out {path} already exists (another run has it); choose another")
            path = base.with_name(f"{base.name}-{i}")
        except OSError as e:
            fail(f"--out {path}: cannot create it ({e.strerror})")
    fail(f"--out {base}: no free name")


def release_run_dir(path: Path | None) -> None:
    """Remove the folder `claim_run_dir` made if nothing was written to it."""
    if path is not None:
        try:
            path.rmdir()
        except OSError:
            pass


def _exit_now(code: int) -> None:
    """Exit at once with `code`. Used after a Ctrl-C during start-up, when nothing is open: a Ctrl-C that
    lands inside torch's lazy imports (seen in `use_deterministic_algorithms` importing sympy) made the
    interpreter's normal exit end by SIGINT (status -2) instead of 130, about one time in three."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_data_root(cfg: TrainConfig) -> None:
    """A dataset read from a folder needs an existing --data-root (checked here, not in TrainConfig, so that
    the app can word its own message for its 'Data folder' field)."""
    if cfg.dataset in NEEDS_DATA_ROOT and not cfg.data_root:
        fail(f"dataset {cfg.dataset} needs --data-root DIR, the folder holding its files (nothing is downloaded)")
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().is_dir():
        fail(f"--data-root {one_line(cfg.data_root)} is not a folder")


@app.command()
def train(
    preset: Optional[str] = typer.Option(None, help="default | reference: train as the LTS reference code does "
                                         "(all layers quantized at --bits, 2q−1 output, partial last batch "
                                         "kept, SGD 0.9/1e-4 for weights, Adam 1e-4 for bounds)"),
    model: Optional[str] = typer.Option(None, help=" | ".join(MODELS)),
    dataset: Optional[str] = typer.Option(None, help=" | ".join(DATASETS)),
    data_root: Optional[str] = typer.Option(None, help="folder holding MNIST IDX files or CIFAR-10/100 batches"),
    width: Optional[int] = typer.Option(None, help="the model's base width (default: the model's own)"),
    bits: Optional[int] = typer.Option(None, help="weight bits (1..8)"),
    quantizer: Optional[str] = typer.Option(None, help="liq | lsq | binary | ternary"),
    act_bits: Optional[int] = typer.Option(None, help="activation bits (default: full precision)"),
    first_last_bits: Optional[int] = typer.Option(None, help="bits of first/last layers (default: FP)"),
    rule: Optional[str] = typer.Option(None, help="none (baseline QAT) | lts | osc"),
    schedule: Optional[str] = typer.Option(None, help="LTS threshold schedule: fixed | linear | sine"),
    threshold: Optional[float] = typer.Option(None, help="threshold ratio ρ in Δ (fixed: 0.1, growth: 1.0)"),
    decay: Optional[float] = typer.Option(None, help="LTS EMA decay m in [0, 1)"),
    warmup_epochs: Optional[float] = typer.Option(None, help="epochs without freezing (default 20%)"),
    granularity: Optional[str] = typer.Option(None, help="LTS freezes single weights (weight, the paper's "
                                              "rule) or whole output channels (channel)"),
    channel_quantile: Optional[float] = typer.Option(None, help="channel granularity: a channel freezes when "
                                                     "this quantile of its weights' EMA distances passes the "
                                                     "threshold (default 0.25: a quarter of them settled; "
                                                     "0.5 = median; 1 = max)"),
    bound_grad: Optional[str] = typer.Option(None, help="what the quantizer bounds learn from: all (the "
                                             "reference; no time saved) | active (unfrozen weights only: frozen "
                                             "channels skip their weight-gradient computation)"),
    epochs: Optional[int] = typer.Option(None, help="QAT epochs"),
    fp_epochs: Optional[int] = typer.Option(None, help="full-precision pre-training epochs"),
    batch_size: Optional[int] = typer.Option(None),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adam"),
    lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = typer.Option(None, help="cosine | step | constant"),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    record_every: Optional[int] = typer.Option(None, help="steps between trajectory records (default: 1 epoch)"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="CPU: run the quantizer's, rule's and recorder's elementwise work "
                                           "as torch.compile'd kernels (same results; needs a C++ compiler; "
                                           "10–60 s of compiling at the start)"),
    max_train: Optional[int] = typer.Option(None, help="use only the first N training samples"),
    config: Optional[Path] = typer.Option(None, help="a .json or .toml file of these options"),
    out: Optional[Path] = typer.Option(None, help="the run folder to create (default data/runs/<id>)"),
    no_record: bool = typer.Option(False, "--no-record", help="train without recording trajectories"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    dump_frozen: Optional[Path] = typer.Option(None, help="debug: each rank saves its final frozen mask "
                                               "to PREFIX.rank<N>.npy"),
) -> None:
    """Pre-train in full precision, then run QAT with the chosen freezing rule, recording the run."""
    args = {k: v for k, v in locals().items() if k not in ("config", "out", "no_record", "quiet", "dump_frozen")}
    if no_record:
        args["record"] = False
    try:
        cfg = build_config(config, args)
    except ConfigError as e:
        fail(str(e))
    check_data_root(cfg)
    if dump_frozen is not None:
        check_parent(dump_frozen, "--dump-frozen")
    run_dir = claim_run_dir(out or default_run_dir(cfg), pick_free_name=out is None) if cfg.record else None
    from .malloc import keep_freed_memory
    keep_freed_memory()   # this process trains: reuse freed memory instead of page-faulting it back each step
    try:
        from .datasets import DatasetError
        from .store import StoreWriteError
        from .trainer import NonFiniteLoss, train as run_training
        res = run_training(cfg, run_dir, progress=not quiet)
    except KeyboardInterrupt:
        if run_dir is not None and (run_dir / MANIFEST).exists():
            typer.echo(f"interrupted: the run in {run_dir} is readable up to its last record", err=True)
            raise typer.Exit(130)
        release_run_dir(run_dir)
        typer.echo("interrupted before QAT started: nothing was recorded", err=True)
        _exit_now(130)
    except BaseException as e:
        if run_dir is not None and not (run_dir / MANIFEST).exists():
            release_run_dir(run_dir)
        if isinstance(e, StoreWriteError):
            if e.records_kept is None:
                e.records_kept = 0
            fail(str(e), code=1)
        if isinstance(e, NonFiniteLoss):
            fail(f"training stopped: {e}", code=1)
        if isinstance(e, DatasetError):
            fail(str(e), code=2)
        if isinstance(e, (ValueError, OSError, RuntimeError)):
            fail(str(e), code=1)
        raise
    from .trainer import dist_info
    rank, world = dist_info()
    if dump_frozen is not None and res.frozen_mask is not None:
        np.save(f"{dump_frozen}.rank{rank}.npy", res.frozen_mask.numpy())
    last = res.metrics[-1] if res.metrics else {}
    typer.echo(json.dumps({"run_dir": str(res.run_dir) if res.run_dir else None, "fp_test_acc": res.fp_test_acc,
                           **{k: last.get(k) for k in ("test_acc", "updates_eliminated",
                                                       "updates_eliminated_all_params", "backward_flops_saved")}}))
    if world > 1:
        _leave_distributed()


def _leave_distributed() -> None:
    """End a torchrun rank whose run is written: wait for the other ranks, destroy the process group, exit 0.

    The exit skips the interpreter's teardown: with torch 2.13, gloo's threads made it abort now and then
    ("terminate called without an active exception", SIGABRT, so torchrun reported the finished run as failed;
    pytorch/pytorch#190489), even after `destroy_process_group()`."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    _exit_now(0)


def _parse_list(text: Optional[str], cast, option: str) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(cast, "values")
        raise ConfigError(f"{option} {one_line(repr(text), 200)} is not a comma-separated list of {kind}") from None


@app.command()
def sweep(
    thresholds: str = typer.Option("0.05,0.1,0.2,0.3", help="comma-separated threshold ratios ρ"),
    schedules: str = typer.Option("fixed", help="comma-separated schedules"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    baseline: bool = typer.Option(True, help="also train the baseline (rule none) per seed"),
    config: Optional[Path] = typer.Option(None, help="base .json/.toml config (model, dataset, epochs…)"),
    out: Path = typer.Option(..., help="folder receiving one run folder per grid point"),
    jobs: int = typer.Option(1, min=1, help="runs trained in parallel processes"),
) -> None:
    """Train a grid of real LTS runs (thresholds × schedules × seeds), each a normal recorded run."""
    try:
        base = load_config_file(config) if config else {}
        ths = _parse_list(thresholds, float, "--thresholds")
        sds = _parse_list(seeds, int, "--seeds")
        grid = [make_config(**{**base, "rule": "none", "seed": sd}) for sd in sds] \
            if baseline else []  # baselines first: the replay's predictions can show while LTS runs train
        grid += [make_config(**{**base, "rule": "lts", "threshold": r, "schedule": s, "seed": sd})
                 for s, r, sd in itertools.product(_parse_list(schedules, str, "--schedules"), ths, sds)]
    except (ConfigError, ValueError) as e:
        fail(str(e))
    if not grid:
        fail("the sweep grid is empty")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    check_folder_name(out)
    check_parent(out)
    check_data_root(grid[0])
    jobs_todo = []
    for cfg in grid:
        run_dir = out / f"{cfg.label()}-s{cfg.seed}"
        if run_dir.exists():
            typer.echo(f"skip {run_dir.name}: already exists")
            continue
        jobs_todo.append((cfg, run_dir))
    # pre-train the FP model of every seed once, before the runs start in parallel (and before --out exists)
    try:
        from .datasets import DatasetError, load_dataset
        from .store import StoreWriteError
        from .trainer import NonFiniteLoss, pick_device, pretrain_fp
        for sd in sorted({c.seed for c, _ in jobs_todo}):
            c0 = next(c for c, _ in jobs_todo if c.seed == sd)
            pretrain_fp(c0, load_dataset(c0.dataset, root=c0.data_root, seed=sd, max_train=c0.max_train,
                                         max_test=c0.max_test), pick_device(c0.device))
    except KeyboardInterrupt:
        typer.echo("sweep interrupted before any run started: nothing was recorded", err=True)
        _exit_now(130)
    except DatasetError as e:
        fail(str(e), code=2)
    except StoreWriteError as e:
        e.records_kept = 0
        fail(str(e), code=1)
    except (NonFiniteLoss, ValueError, RuntimeError, OSError) as e:
        fail(str(e), code=1)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create it ({e.strerror})")
    running: list[tuple[subprocess.Popen, Path, Path]] = []
    failures = 0

    def reap(block: bool) -> None:
        nonlocal failures
        for p, rd, cf in list(running):
            if block or p.poll() is not None:
                rc = p.wait()
                running.remove((p, rd, cf))
                cf.unlink(missing_ok=True)
                failures += rc != 0
                typer.echo(f"{'done' if rc == 0 else f'FAILED ({rc})'}: {rd.name}")

    try:
        for cfg, run_dir in jobs_todo:
            while len(running) >= jobs:
                reap(block=False)
                time.sleep(0.2)
            fd, cfg_path = tempfile.mkstemp(suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(cfg.model_dump(), f)
            cmd = [sys.executable, "-m", "lts_core", "train", "--config", cfg_path, "--out", str(run_dir),
                   "--quiet"]
            running.append((subprocess.Popen(cmd), run_dir, Path(cfg_path)))
            typer.echo(f"started: {run_dir.name}")
        reap(block=True)
    except KeyboardInterrupt:  # stop the running children cleanly: each closes its run as 'interrupted'
        for p, _, _ in running:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, rd, cf in running:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            cf.unlink(missing_ok=True)
        typer.echo("sweep interrupted: finished runs are complete, running ones are marked interrupted", err=True)
        raise typer.Exit(130)
    if failures:
        raise typer.Exit(1)


@app.command()
def runs(folder: Optional[Path] = typer.Option(None, help="runs folder to list (default data/runs)")) -> None:
    """List the runs of a folder with status, progress and key figures (a broken run is listed with its
    error)."""
    from .manifest import one_line
    from .store import RunError, list_runs
    for e in list_runs(folder or runs_dir()):
        name = one_line(e.run_id, 200)
        if not e.ok:
            typer.echo(f"{name:50s} BROKEN  {e.error}")
            continue
        try:
            m, progress = e.run.metrics, e.run.progress
        except RunError as err:
            typer.echo(f"{name:50s} BROKEN  {one_line(err, 1000)}")
            continue
        last = m.iloc[-1] if len(m) else None
        figs = "no epoch yet"
        if last is not None:
            figs = f"acc {last['test_acc']:.1f}%  updates eliminated {last['updates_eliminated']:.0%} of q-weights"
            if "updates_eliminated_all_params" in m.columns:
                figs += f" ({last['updates_eliminated_all_params']:.0%} of all params)"
        where = "" if e.status == "complete" else f"  ({progress})"
        typer.echo(f"{name:50s} {e.status:11s} {figs}{where}")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {one_line(message, 2000)}", err=True)


def main() -> None:
    warnings.showwarning = _warning_line
    app()
