"""Where a streamed analysis' time goes: one operation of `bench_scale.py` (cold, this process), with the scan's
worker threads followed through it.

Prints the wall and CPU time of the operation and of its Python garbage collections (`gc.callbacks`); when
`run_passes` ran; per worker thread: its tasks, the wall time inside them ("busy"), its own CPU time in them
(the rest of "busy" is waiting for a core or for its reads), the time spent waiting for reads (and of that,
for the first groups of its tasks, which nothing overlaps); and per pass the CPU time of its workers' `feed`
(the numba kernels and their Python glue), also per weight-record of the run.

    python bench/bench_scan_timeline.py /work/bigruns/syn-100m index      # or levels, osc, replay, cache, read2…

The run's files are dropped from the page cache first (`bench_scale.drop_cached`); the process keeps freed
memory, as the app's server does.
"""
from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("op", help="an operation of bench_scale.py: read1, read2, levels, osc, index, replay, cache")
    args = ap.parse_args()

    import bench_scale
    from lts_core import malloc
    from lts_core.analysis import replay_stream, stream
    from lts_core.analysis.level_stats import LevelStatsPass

    malloc.keep_freed_memory()
    lock, local = threading.Lock(), threading.local()
    tasks, waits, feeds = [], [], {}
    scan_task, wait = stream.scan_task, stream._wait

    def timed_scan_task(*a, **k):
        local.waited = False
        t, c = time.perf_counter(), time.thread_time()
        out = scan_task(*a, **k)
        with lock:
            tasks.append((threading.get_ident(), t, time.perf_counter(), time.thread_time() - c))
        return out

    def timed_wait(reads):
        t = time.perf_counter()
        wait(reads)
        first, local.waited = not getattr(local, "waited", True), True
        with lock:
            waits.append((threading.get_ident(), time.perf_counter() - t, first))

    def follow(cls):     # its workers' feed (patched on the worker class: no reference cycles), CPU per pass
        make = cls.worker

        def worker(self, *a, **k):
            w = make(self, *a, **k)
            wcls = type(w)
            if not getattr(wcls, "_timed", False):
                feed = wcls.feed

                def timed_feed(this, *fa, **fk):
                    c = time.thread_time()
                    try:
                        return feed(this, *fa, **fk)
                    finally:
                        with lock:
                            feeds[cls.__name__] = feeds.get(cls.__name__, 0.0) + time.thread_time() - c
                wcls.feed, wcls._timed = timed_feed, True
            return w
        cls.worker = worker

    stream.scan_task, stream._wait = timed_scan_task, timed_wait
    for cls in (LevelStatsPass, replay_stream.IndexPass, replay_stream.OscPass, replay_stream.FreezeStepsPass):
        follow(cls)
    gc_time, gc_start = [0.0], [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_start[0]
    gc.callbacks.append(on_gc)

    bench_scale.drop_cached(args.run)
    res = bench_scale.do(args.op, str(args.run))
    print(f"{args.op}: wall {res['wall']:.2f} s, CPU {res['cpu']:.2f} s, garbage collections {gc_time[0]:.2f} s, "
          f"peak {res['maxrss_mb']:.0f} MB")
    if not tasks:
        return
    print(f"  tasks {len(tasks)}, over {max(t[2] for t in tasks) - min(t[1] for t in tasks):.2f} s")
    for th in sorted({t[0] for t in tasks}):
        mine = [t for t in tasks if t[0] == th]
        w = [x for x in waits if x[0] == th]
        print(f"  thread: {len(mine)} tasks, busy {sum(t[2] - t[1] for t in mine):.2f} s, its CPU "
              f"{sum(t[3] for t in mine):.2f} s, waiting for reads {sum(x[1] for x in w):.2f} s (first groups "
              f"{sum(x[1] for x in w if x[2]):.2f} s)")
    wr = res["weights"] * res["records"]
    for name, cpu in feeds.items():
        print(f"  {name}.feed: {cpu:.2f} s CPU, {cpu / wr * 1e9:.2f} ns per weight-record")


if __name__ == "__main__":
    main()
