"""How fast the disk gives a run's chunk files to reads of a given size and number in flight, with O_DIRECT
(`npy_direct.PositionalReader`, as the streamed analyses read them) or through the page cache (after
posix_fadvise(DONTNEED) on the files), and the CPU each byte costs.

    python bench/bench_direct_read.py /work/bigruns/syn-100m [--files 12] [--sizes 2,4,8] [--threads 1,2,4]
        [--ways direct,buffered] [--pages huge,small] [--rounds 1]

Each configuration reads other chunk files of the run (level and dist files, cycling through the run), whole,
in requests of SIZE MiB on THREADS threads, into buffers on transparent huge pages (`npy_direct.read_buffer`,
as the streamed passes' buffers) or on ordinary 4 KiB pages (a fresh anonymous mapping asked not to use
huge pages); MB/s = bytes ÷ wall, ns/byte = process CPU (user + system) ÷ bytes. `--rounds` repeats the
whole set, so that the configurations alternate.
"""
from __future__ import annotations

import argparse
import itertools
import os
import queue
import resource
import sys
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
    import mmap
    from lts_core.npy_direct import PositionalReader, read_buffer
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--files", type=int, default=12, help="chunk files per configuration")
    ap.add_argument("--sizes", default="2,4,8", help="request sizes, MiB")
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--ways", default="direct,buffered")
    ap.add_argument("--pages", default="huge", help="huge, small or both (huge,small)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    def small_pages(size):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(m, np.uint8)
    files = sorted(p for p in (Path(args.run) / "traj").iterdir() if p.name.endswith((".level.npy", ".dist.npy")))
    at = 0
    sizes = [int(float(x) * (1 << 20)) for x in args.sizes.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]
    configs = itertools.product(range(args.rounds), args.ways.split(","), sizes, threads_list, args.pages.split(","))
    for rnd, way, size, threads, pages in configs:
        mine = [files[(at + i) % len(files)] for i in range(args.files)]
        at += args.files
        for p in mine:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        jobs = [(p, pos) for p in mine for pos in range(0, p.stat().st_size, size)]
        free = queue.SimpleQueue()       # one buffer per thread, made and touched untimed
        for _ in range(threads):
            b = read_buffer(size, np.uint8) if pages == "huge" else small_pages(size)
            b[:] = 0
            free.put(b)

        def read(job, size=size, way=way, free=free):
            p, pos = job
            b = free.get()
            try:
                with PositionalReader(p, direct=way == "direct") as f:
                    return f.read_into(b[:max(0, min(size, p.stat().st_size - pos))], pos)
            finally:
                free.put(b)
        t0, c0 = time.perf_counter(), cpu()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, jobs))
        wall, used = time.perf_counter() - t0, cpu() - c0
        print(f"round {rnd + 1} {way:8s} {pages:5s} pages, {size >> 20} MiB × {threads} in flight: "
              f"{total / wall / 1e6:6.0f} MB/s, {used / total * 1e9:.3f} ns/byte of CPU ({total / 1e9:.2f} GB)",
              flush=True)

if __name__ == "__main__":
    main()
