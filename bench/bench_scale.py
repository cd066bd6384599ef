"""Analysis of big runs: time, throughput and peak memory of each streamed analysis, against the in-memory path.

Every operation runs in a fresh Python process (so its peak resident memory, `ru_maxrss`, is its own), on
the runs given (e.g. the synthetic runs of `bench/synthetic_run.py`), rounds interleaved (run A op 1, run A
op 2, …, run B op 1, …). Operations:

- `levels`: settle records, flips, reversals, occupancy (`LevelStatsPass`, what `settle_summary(run)` uses);
- `index`: `ReplayIndex.build(run, …)` with the run's own settings (`summaries.run_settings`);
- `osc`: `oscillation_summary(run)`;
- `replay`: `replay_freeze_steps(run, ratio=1.0, …)` (one ratio, per-weight freeze steps);
- `cache`: `build_cache(run)` from scratch (all of the above but `replay`, in one scan), what a finished run
  pays once;
- `open`: a fresh process opening the run and loading what the Settling and Sweep pages need from the cache;
- `old-index`, `old-settle`: the in-memory path for comparison (`ReplayIndex.build` and `settle_summary` on the
  arrays gathered by `arrays_from_run(run)`); skipped with --no-old.

"MB read" is what the operation read after the imports: read()/pread() bytes (`rchar`) plus the growth of the
file pages mapped and resident (`RssFile`: memory-mapped cache files, and library code first touched).

Also the speed of reading the chunk files with O_DIRECT (`dd iflag=direct`, i.e. from the disk, not from the
page cache), the floor a disk-limited analysis approaches.

    python bench/bench_scale.py /work/bigruns/syn-1m /work/bigruns/syn-10m [--rounds 2] [--no-old]
    [--ops levels,index,osc,replay,cache,open]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def io_mb() -> float:
    """MB this process read so far: read()/pread() bytes (`rchar` of /proc/self/io) plus the file pages it has
    mapped and touched (`RssFile` of /proc/self/status), i.e. what it pulled from the run folder either way."""
    rchar = rss_file = 0
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                rchar = int(line.split()[1])
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                rss_file = int(line.split()[1]) * 1024
    return (rchar + rss_file) / 1e6


def do(op: str, path: str) -> dict:
    """Run one operation in this process; returns its timings."""
    from lts_core import open_run
    from lts_core.analysis import (ReplayIndex, build_cache, cached_oscillation_summary, cached_replay_index,
                                   cached_settle_summary, oscillation_summary, replay_freeze_steps, settle_summary)
    from lts_core.analysis.level_stats import LevelStatsPass
    from lts_core.analysis.settle import arrays_from_run
    from lts_core.analysis.stream import RunSource, run_passes
    from lts_core.analysis.summaries import run_settings
    io0 = io_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    run = open_run(path)
    s = run_settings(run)
    held: list = []
    if op == "levels":
        run_passes(RunSource(run), [LevelStatsPass()])
    elif op == "index":
        ReplayIndex.build(run, **s)
    elif op == "osc":
        oscillation_summary(run)
    elif op == "replay":
        replay_freeze_steps(run, ratio=1.0, **s)
    elif op == "cache":
        shutil.rmtree(Path(path) / "cache", ignore_errors=True)
        build_cache(run)
    elif op == "open":   # held until measured: their memory maps count in "MB read"
        held += [cached_settle_summary(run), cached_replay_index(run, **s), cached_oscillation_summary(run)]
        held.append(held[1].sweep())
    elif op == "old-index":
        ReplayIndex.build(arrays_from_run(run), **s)
    elif op == "old-settle":
        arr = arrays_from_run(run, with_dists=False)
        settle_summary(arr.levels, arr.layer_sizes)
    else:
        raise SystemExit(f"unknown op {op}")
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "read_mb": io_mb() - io0,
            "held": len(held), "records": run.n_records, "weights": run.n_weights}


def in_child(op: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", op, str(path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode:
        raise SystemExit(f"{op} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def disk_read_gbps(path: Path, limit_bytes: int = 2 << 30) -> float:
    """GB/s reading the run's chunk files with O_DIRECT (dd iflag=direct), up to `limit_bytes`."""
    files, total = [], 0
    for f in sorted((path / "traj").glob("*.npy")):
        if total >= limit_bytes:
            break
        files.append(f)
        total += f.stat().st_size
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"], check=True)
    return total / (time.perf_counter() - t0) / 1e9


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(do(sys.argv[2], sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ops", default="levels,index,osc,replay,cache,open")
    ap.add_argument("--no-old", action="store_true")
    args = ap.parse_args()
    ops = args.ops.split(",") + ([] if args.no_old else ["old-settle", "old-index"])
    res: dict = {}
    threads = os.environ.get("SCRATCHOFF_ANALYSIS_THREADS", "all cores")
    print(f"{os.cpu_count()} CPUs, analysis threads: {threads}, load average at start: {os.getloadavg()}")
    for rnd in range(args.rounds):
        for run in args.runs:
            for op in ops:
                r = in_child(op, run)
                res.setdefault((run.name, op), []).append(r)
                print(f"round {rnd + 1} {run.name} {op}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU, peak "
                      f"{r['maxrss_mb']:.0f} MB, read {r['read_mb']:.1f} MB", flush=True)
    gbps = {run.name: disk_read_gbps(run) for run in args.runs}
    print(f"\nload average at the end: {os.getloadavg()}\n")
    print("| run | operation | wall (best of {0}) | CPU | records/s | peak memory | MB read |".format(args.rounds))
    print("|---|---|---|---|---|---|---|")
    for (name, op), rs in res.items():
        best = min(rs, key=lambda r: r["wall"])
        print(f"| {name} ({best['weights'] / 1e6:g}M × {best['records']}) | {op} | {best['wall']:.2f} s | "
              f"{best['cpu']:.2f} s | {best['records'] / best['wall']:.1f} | {max(r['maxrss_mb'] for r in rs):.0f} MB | "
              f"{best['read_mb']:.1f} |")
    for name, g in gbps.items():
        print(f"\n{name}: chunk files read with O_DIRECT at {g:.2f} GB/s")
    if not args.no_old:
        print("\nratios old ÷ streamed (same round, then best):")
        for run in args.runs:
            for old, new in (("old-index", "index"), ("old-settle", "levels")):
                a = [o["wall"] / n["wall"] for o, n in zip(res[(run.name, old)], res[(run.name, new)])]
                print(f"  {run.name} {old} ÷ {new}: " + ", ".join(f"{x:.1f}×" for x in a)
                      + f" (median {statistics.median(a):.1f}×)")


if __name__ == "__main__":
    main()
