"""How fast the disk gives a run's chunk files to reads of a given size and number in flight, with O_DIRECT
(`npy_direct.PositionalReader`, as the streamed analyses read them) or through the page cache (after
posix_fadvise(DONTNEED) on the files), and the CPU each byte costs.

    python bench/bench_direct_read.py /work/bigruns/syn-100m [--files 12] [--sizes 2,4,8] [--threads 1,2,4]
        [--ways direct,buffered]

Each configuration reads other chunk files of the run (level and dist files, cycling through the run), whole,
in requests of SIZE MiB on THREADS threads; MB/s = bytes ÷ wall, ns/byte = process CPU (user + system) ÷ bytes.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    import numpy as np
    from lts_core.npy_direct import PositionalReader, aligned_empty
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--files", type=int, default=12, help="chunk files per configuration")
    ap.add_argument("--sizes", default="2,4,8", help="request sizes, MiB")
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--ways", default="direct,buffered")
    args = ap.parse_args()
    files = sorted(p for p in (Path(args.run) / "traj").iterdir() if p.name.endswith((".level.npy", ".dist.npy")))
    at = 0
    for way in args.ways.split(","):
        for size in (int(float(s) * (1 << 20)) for s in args.sizes.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                mine = [files[(at + i) % len(files)] for i in range(args.files)]
                at += args.files
                for p in mine:
                    fd = os.open(p, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                jobs = [(p, pos) for p in mine for pos in range(0, p.stat().st_size, size)]

                bufs: dict = {}

                def read(job):
                    p, pos = job
                    key = threading.get_ident()
                    if key not in bufs:
                        bufs[key] = aligned_empty(size, np.uint8)
                    buf = bufs[key][:max(0, min(size, p.stat().st_size - pos))]
                    with PositionalReader(p, direct=way == "direct") as f:
                        return f.read_into(buf, pos)
                t0, c0 = time.perf_counter(), cpu()
                with ThreadPoolExecutor(threads) as pool:
                    total = sum(pool.map(read, jobs))
                wall, used = time.perf_counter() - t0, cpu() - c0
                print(f"{way:8s} {size >> 20} MiB × {threads} in flight: {total / wall / 1e6:6.0f} MB/s, "
                      f"{used / total * 1e9:.3f} ns/byte of CPU ({total / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
