"""Analysis of big runs: time, throughput and peak memory of each streamed analysis, against the in-memory path.

Every operation runs in a fresh Python process (so its peak resident memory, `ru_maxrss`, is its own), on
the runs given (e.g. the synthetic runs of `bench/synthetic_run.py`), rounds interleaved (run A op 1, run A
op 2, …, run B op 1, …). Operations:

- `levels`: settle records, flips, reversals, occupancy (`LevelStatsPass`, what `settle_summary(run)` uses);
- `index`: `ReplayIndex.build(run, …)` with the run's own settings (`summaries.run_settings`);
- `osc`: `oscillation_summary(run)` (the accounting and the per-weight replay); `osc-sum`: its accounting
  alone (`per_weight=False`, what the run's cache keeps and the Sweep page shows);
- `dist`, `dist1`: `record_distributions(run, None)` and `(run, 0)` (the Distributions view's per-record
  histograms, of all layers and of the first layer, as the app asks; one thread, record by record, through
  memory maps, so "MB read" does not see its reads);
- `replay`: `replay_freeze_steps(run, ratio=1.0, …)` (one ratio, per-weight freeze steps);
- `cache`: `build_cache(run)` from scratch (all of the above but `replay`, in one scan), what a finished run
  pays once;
- `open`: a fresh process opening the run and loading what the Settling and Sweep pages need from the cache;
- `read1`, `read2`: the streamed reading alone, no analysis: `run_passes` with a pass that reads the levels
  (`read1`, what `levels`, `osc` and `osc-sum` read) or the levels and distances (`read2`, what `index`, `replay` and
  `cache` read) and computes nothing. The same reader threads, O_DIRECT reads and buffers as the analyses:
  the rate a disk-limited analysis reaches on this machine. With them, the bench prints each analysis's
  MB/s ÷ its reading's MB/s, per round;
- `old-index`, `old-settle`: the in-memory path for comparison (`ReplayIndex.build` and `settle_summary` on the
  arrays gathered by `arrays_from_run(run)`); skipped with --no-old.

"MB read" is what the operation read after the imports: read()/pread() bytes (`rchar`) plus the growth of the
file pages mapped and resident (`RssFile`: memory-mapped cache files, and library code first touched).

"MB/s" is that divided by the wall time: the rate at which the operation consumed the run's chunk files.

`--cold` drops the run's files from the page cache before every operation (`posix_fadvise(DONTNEED)` on each
file of the run folder, nothing else on the machine), so the operation reads from the disk. `--warm-process`
runs each operation once untimed in its process before timing it (after `--cold`'s drop again): numba's
kernels are loaded and the memory the first run freed is reused, as in the app's long-lived server after its
first analysis. On a VM that hands freed guest memory back to its host (virtio-balloon free page reporting),
fresh memory costs seconds per GB to touch the first time, and only a fresh process pays it; peak memory is
then the larger of the two runs. `--baseline DIR`
runs every operation also with the code of another checkout (e.g. a worktree of the previous commit),
interleaved with this one (baseline, this, baseline, this …), and prints the ratios per round. Each
operation's process first applies `lts_core.malloc.keep_freed_memory()`, as the app's server and `python -m
lts_core train` do (`--malloc keep`, the default); `--malloc default` leaves glibc's
defaults, `--malloc both` runs every operation both ways, interleaved ("this" and "this+keep").

The disk's cold sequential read rate of the chunk files is measured before and after the operations
(`--disk-repeats` times each, each time on other files of the run): `dd iflag=direct bs=4M` (O_DIRECT: from
the disk, not the page cache), and buffered 16 MiB reads after `posix_fadvise(DONTNEED)` (what the analyses
see: the kernel's readahead included). That is the rate a disk-limited analysis approaches.

    python bench/bench_scale.py /work/bigruns/syn-1m /work/bigruns/syn-10m [--rounds 2] [--no-old]
    [--ops read1,levels,osc,read2,index,replay,cache,open] [--cold] [--baseline /tmp/wt-old] [--disk-repeats 3]
    [--malloc default|keep|both]
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
CODE = os.environ.get("BENCH_CODE", str(ROOT))   # the checkout whose lts_core a child process imports
sys.path.insert(0, CODE)


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
    if os.environ.get("BENCH_KEEP_FREED") == "1":
        from lts_core.malloc import keep_freed_memory
        keep_freed_memory()
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
    elif op == "osc-sum":
        oscillation_summary(run, per_weight=False)
    elif op in ("dist", "dist1"):
        from lts_core.analysis.distributions import record_distributions
        record_distributions(run, None if op == "dist" else 0)
    elif op == "replay":
        replay_freeze_steps(run, ratio=1.0, **s)
    elif op == "cache":
        shutil.rmtree(Path(path) / "cache", ignore_errors=True)
        build_cache(run)
    elif op == "open":   # held until measured: their memory maps count in "MB read"
        held += [cached_settle_summary(run), cached_replay_index(run, **s), cached_oscillation_summary(run)]
        held.append(held[1].sweep())
    elif op in ("read1", "read2"):
        run_passes(RunSource(run), [_ReadOnly(("level",) if op == "read1" else ("level", "dist"))])
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


class _ReadOnly:
    """A pass that reads `needs` and computes nothing (the `read1`/`read2` ops)."""

    def __init__(self, needs):
        self.needs = tuple(needs)

    def worker(self, src, task, first_record):
        return self

    def collector(self, src, first_record):
        return self

    def feed(self, r0, data, sub):
        pass

    def result(self):
        return None

    def add(self, task, res):
        pass

    def finish(self):
        return None


READ_OF = {"levels": "read1", "osc": "read1", "osc-sum": "read1", "index": "read2", "replay": "read2", "cache": "read2"}


def in_child(op: str, path: Path, code: str | None = None, keep: bool = False, warm: bool = False,
             cold: bool = False) -> dict:
    code = code or str(ROOT)
    out = subprocess.run([sys.executable, __file__, "--child", op, str(path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=code, BENCH_CODE=code, BENCH_KEEP_FREED=str(int(keep)),
                                  BENCH_WARM=str(int(warm)), BENCH_COLD=str(int(cold))))
    if out.returncode:
        raise SystemExit(f"{op} on {path} ({code}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_cached(path: Path) -> None:
    """Drop the run folder's files from the page cache (posix_fadvise DONTNEED; clean pages only)."""
    drop_cached_files([f for f in Path(path).rglob("*") if f.is_file()])


def big_chunk_files(path: Path) -> list[Path]:
    """The run's chunk files of 1 MiB or more (levels and distances), in order."""
    return [f for f in sorted((path / "traj").glob("*.npy")) if f.stat().st_size >= 1 << 20]


def disk_read_mbps(path: Path, repeats: int, limit_bytes: int = 1 << 30) -> dict[str, list[float]]:
    """MB/s reading about `limit_bytes` of the run's chunk files cold, `repeats` times each way, every time
    other files (windows taken in turn, wrapping round): O_DIRECT (`dd iflag=direct bs=4M`) and buffered
    16 MiB reads after posix_fadvise(DONTNEED) on the files."""
    files = big_chunk_files(path)
    if not files:
        return {"direct": [], "fadvise": []}
    per = max(1, min(len(files), int(limit_bytes // files[0].stat().st_size)))
    out: dict[str, list[float]] = {"direct": [], "fadvise": []}
    buf = bytearray(16 << 20)
    k = 0
    for _ in range(repeats):
        for way in ("direct", "fadvise"):
            window = [files[(k * per + j) % len(files)] for j in range(per)]
            k += 1
            total = sum(f.stat().st_size for f in window)
            drop_cached_files(window)
            t0 = time.perf_counter()
            for f in window:
                if way == "direct":
                    subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"],
                                   check=True)
                else:
                    with open(f, "rb", buffering=0) as fh:
                        while fh.readinto(buf):
                            pass
            out[way].append(total / (time.perf_counter() - t0) / 1e6)
            drop_cached_files(window)
    return out


def drop_cached_files(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if os.environ.get("BENCH_WARM") == "1":     # once untimed: the process is then as a server after it
            do(sys.argv[2], sys.argv[3])
            if os.environ.get("BENCH_COLD") == "1":
                drop_cached(Path(sys.argv[3]))
        print(json.dumps(do(sys.argv[2], sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ops", default="levels,index,osc,replay,cache,open")
    ap.add_argument("--no-old", action="store_true")
    ap.add_argument("--cold", action="store_true", help="drop the run's files from the page cache before each op")
    ap.add_argument("--baseline", help="a checkout of other code: every op also runs with it, interleaved")
    ap.add_argument("--disk-repeats", type=int, default=3)
    ap.add_argument("--warm-process", action="store_true",
                    help="each operation's process runs it once untimed, then (after --cold's drop) timed: "
                         "imports and kernels loaded, freed memory reused, as in the app's long-lived server")
    ap.add_argument("--malloc", choices=["default", "keep", "both"], default="keep",
                    help="glibc malloc in each operation's process: keep_freed_memory() (as the app's server and "
                         "the training CLI; the default), glibc's defaults, or both")
    args = ap.parse_args()
    ops = args.ops.split(",") + ([] if args.no_old else ["old-settle", "old-index"])
    keeps = {"default": [False], "keep": [True], "both": [False, True]}[args.malloc]
    codes = [(label + ("+keep" if keep and args.malloc == "both" else ""), code, keep)
             for label, code in ([("base", str(Path(args.baseline).resolve()))] if args.baseline else [])
             + [("this", str(ROOT))] for keep in keeps]
    res: dict = {}
    threads = os.environ.get("SCRATCHOFF_ANALYSIS_THREADS", "all cores")
    print(f"{os.cpu_count()} CPUs, analysis threads: {threads}, cold: {args.cold}, warm process: "
          f"{args.warm_process}, load average at start: {os.getloadavg()}")
    disk = {run.name: disk_read_mbps(run, args.disk_repeats) for run in args.runs}
    for rnd in range(args.rounds):
        for run in args.runs:
            for op in ops:
                for label, code, keep in codes:
                    if args.cold:
                        drop_cached(run)
                    r = in_child(op, run, code, keep, args.warm_process, args.cold)
                    r["load"] = os.getloadavg()[0]
                    res.setdefault((run.name, op, label), []).append(r)
                    print(f"round {rnd + 1} {run.name} {op} [{label}]: {r['wall']:.2f} s wall, {r['cpu']:.2f} s "
                          f"CPU, peak {r['maxrss_mb']:.0f} MB, read {r['read_mb']:.1f} MB "
                          f"({r['read_mb'] / r['wall']:.0f} MB/s), load {r['load']:.1f}", flush=True)
    for run in args.runs:
        for way, v in disk_read_mbps(run, args.disk_repeats).items():
            disk[run.name][way] += v
    print(f"\nload average at the end: {os.getloadavg()}\n")
    print(f"| run | operation | code | wall (best of {args.rounds}) | CPU | records/s | MB/s | peak memory | MB read |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, op, label), rs in res.items():
        best = min(rs, key=lambda r: r["wall"])
        print(f"| {name} ({best['weights'] / 1e6:g}M × {best['records']}) | {op} | {label} | {best['wall']:.2f} s | "
              f"{best['cpu']:.2f} s | {best['records'] / best['wall']:.2f} | {best['read_mb'] / best['wall']:.0f} | "
              f"{max(r['maxrss_mb'] for r in rs):.0f} MB | {best['read_mb']:.1f} |")
    for name, d in disk.items():
        for way, v in d.items():
            if v:
                print(f"\n{name}: chunk files read cold ({way}) at " + ", ".join(f"{x:.0f}" for x in v)
                      + f" MB/s (median {statistics.median(v):.0f})")
    pairs = [("base" + k, "this" + k) for k in (["", "+keep"] if args.malloc == "both" else [""])] \
        if args.baseline else []
    pairs += [("this", "this+keep")] if args.malloc == "both" else []
    for a_label, b_label in pairs:
        print(f"\nratios {a_label} ÷ {b_label}, wall (per round, interleaved):")
        for run in args.runs:
            for op in args.ops.split(","):
                a = [o["wall"] / n["wall"] for o, n in zip(res[(run.name, op, a_label)], res[(run.name, op, b_label)])]
                c = [o["cpu"] / n["cpu"] for o, n in zip(res[(run.name, op, a_label)], res[(run.name, op, b_label)])]
                print(f"  {run.name} {op}: wall " + ", ".join(f"{x:.2f}×" for x in a)
                      + f"; CPU " + ", ".join(f"{x:.2f}×" for x in c))
    for label in {c[0] for c in codes}:
        lines = []
        for run in args.runs:
            for op in args.ops.split(","):
                rd = res.get((run.name, READ_OF.get(op, ""), label))
                if rd is None:
                    continue
                r = [(n["read_mb"] / n["wall"]) / (d["read_mb"] / d["wall"])
                     for n, d in zip(res[(run.name, op, label)], rd)]
                lines.append(f"  {run.name} {op}: " + ", ".join(f"{x:.2f}" for x in r))
        if lines:
            print(f"\n[{label}] MB/s of each analysis ÷ MB/s of its reading alone (read1/read2), per round:")
            print("\n".join(lines))
    if not args.no_old:
        print("\nratios old ÷ streamed (same round, then best):")
        for run in args.runs:
            for old, new in (("old-index", "index"), ("old-settle", "levels")):
                a = [o["wall"] / n["wall"] for o, n in zip(res[(run.name, old, "this")], res[(run.name, new, "this")])]
                print(f"  {run.name} {old} ÷ {new}: " + ", ".join(f"{x:.1f}×" for x in a)
                      + f" (median {statistics.median(a):.1f}×)")


if __name__ == "__main__":
    main()
