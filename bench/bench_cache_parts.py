"""Where a cache build's time goes: `build_cache(run)` from nothing, its parts timed (wall, user and system
time of the whole process, from getrusage).

Parts: each item's `make_pass` (planning; the replay index's includes importing torch, about 1.3 s here, which
the recorder and the app's server have done already), the scan (`run_passes`: reading the chunk files and the kernels),
each item's `finish` and `store`, and `cache.save` (writing the results). The run's cache folder is removed and
its files dropped from the page cache first (`bench_scale.drop_cached`), so the scan reads from the disk. The
process keeps freed memory (`malloc.keep_freed_memory()`), as the app's server and the recorder do.

    python bench/bench_cache_parts.py /work/bigruns/syn-100m

The run's cache is rebuilt (and left) by this script.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args()

    from bench_scale import drop_cached
    from lts_core import malloc
    from lts_core.analysis import cache, summaries
    from lts_core.store import open_run

    malloc.keep_freed_memory()
    shutil.rmtree(args.run / "cache", ignore_errors=True)
    drop_cached(args.run)
    run = open_run(args.run)
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                acc = parts.setdefault(name, [0.0, 0.0, 0.0])
                acc[0] += time.perf_counter() - t0
                acc[1] += r1.ru_utime - r0.ru_utime
                acc[2] += r1.ru_stime - r0.ru_stime
        return wrapper

    summaries.run_passes = timed("scan", summaries.run_passes)
    cache.save = timed("save", cache.save)
    for cls in (summaries.LevelsItem, summaries.IndexItem, summaries.OscItem):
        for meth in ("make_pass", "finish", "store"):
            setattr(cls, meth, timed(f"{cls.__name__[:-4]}.{meth}", getattr(cls, meth)))
    run_total = timed("total", summaries.build_cache)
    run_total(run)

    print(f"{run.n_weights:,} weights × {run.n_records} records, cold")
    print("| part | wall | user | system |\n|---|---|---|---|")
    for name, (wall, user, system) in parts.items():
        if wall >= 0.005 or name == "total":
            print(f"| {name} | {wall:.2f} s | {user:.2f} s | {system:.2f} s |")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
