"""What reading a recorded run costs, for two versions of the engine, interleaved (A, B, A, B, …).

    python bench/bench_read.py --compare /work/main /work/wt-hardening [--rounds 5] [--weights 524288]

writes two runs once (with the first tree's store): `dense` (levels change for ~30% of the weights between
records, so they are stored dense) and `sparse` (0.5%: stored as changes), each `--records` records of
`--weights` weights in two layers, plus a copy of `sparse` left as a killed run would be (its records in an
open chunk, no chunk listed) when the second tree knows open chunks. Each round then starts one process per
tree (PYTHONPATH=<tree>) that times, best of 3 inside the process:

- open: `open_run` (manifest validation, every chunk file's header and size);
- layer: `run.levels("b")` (one layer, half of the weights);
- all: `run.levels()`;
- stream: `iter_chunks(("level", "dist"))` touching every value;
- killed-open / killed-all: the same on the killed copy (second tree only).

It prints the median over rounds of each figure (ms) and the ratio B/A. Machine load moves both trees
alike within a round; the ratio is the figure to read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_runs(folder: Path, weights: int, records: int) -> None:
    import numpy as np
    from lts_core.store import RunWriter
    rng = np.random.default_rng(0)
    half = weights // 2
    layers = [{"name": "a", "shape": [half], "n_levels": 4, "bits": 2},
              {"name": "b", "shape": [weights - half], "n_levels": 4, "bits": 2}]
    for name, p in (("dense", 0.3), ("sparse", 0.005)):
        w = RunWriter.create(folder, name, {"layers": layers, "steps_per_epoch": 1, "total_steps": records,
                                            "record_every": 1, "state_arrays": ["ema"]})
        lv = np.empty((records, weights), np.uint8)
        lv[0] = rng.integers(0, 4, weights)
        for i in range(1, records):
            lv[i] = lv[i - 1]
            moved = rng.random(weights) < p
            lv[i, moved] = (lv[i, moved] + 1) % 4
        w.append_chunk({"step": np.arange(records), "level": lv,
                        "dist": rng.integers(0, 256, (records, weights), dtype=np.uint8),
                        "ema": rng.integers(0, 256, (records, weights), dtype=np.uint8),
                        "bounds": np.zeros((records, 2, 2), np.float32)})
        w.set_status("complete")


def make_killed_copy(folder: Path) -> None:
    """The sparse run re-recorded through the open-chunk appender and never sealed (as after a SIGKILL)."""
    import numpy as np
    from lts_core.npy_direct import aligned_empty
    from lts_core.store import RunWriter, open_run
    src = open_run(folder / "sparse")
    r, n = src.n_records, src.n_weights
    w = RunWriter.create(folder, "killed", {"layers": src.layers, "steps_per_epoch": 1, "total_steps": r,
                                            "record_every": 1, "state_arrays": ["ema"]})
    buf = {"step": np.arange(r, dtype=np.int64), "level": aligned_empty((r, n), np.uint8),
           "dist": aligned_empty((r, n), np.uint8), "ema": aligned_empty((r, n), np.uint8),
           "bounds": np.zeros((r, 2, 2), np.float32)}
    buf["level"][:], buf["dist"][:], buf["ema"][:] = src.levels(), src.dist_codes(), src.state("ema")
    chunk = w.open_chunk(buf)
    for i in range(1, r + 1, 8):
        chunk.append(min(i + 7, r))
    chunk.abandon()  # killed: never sealed


def best(fn, k: int = 3) -> float:
    out = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1000 * min(out)


def measure(folder: Path) -> dict:
    from lts_core.store import open_run
    res = {}
    for name in ("dense", "sparse", "killed"):
        if not (folder / name).exists():
            continue
        try:
            run = open_run(folder / name)
        except Exception:
            continue
        if run.n_records == 0:
            continue  # the killed copy, in a tree that does not know open chunks
        res[f"{name}-open"] = best(lambda: open_run(folder / name))
        res[f"{name}-layer"] = best(lambda: open_run(folder / name).levels("b"))
        res[f"{name}-all"] = best(lambda: open_run(folder / name).levels())

        def stream():
            for ch in open_run(folder / name).iter_chunks(("level", "dist")):
                int(ch["level"].sum()) + int(ch["dist"].sum())
        res[f"{name}-stream"] = best(stream)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, metavar=("TREE_A", "TREE_B"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", type=int, default=1 << 19)
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-killed", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    if args.make:
        make_runs(Path(args.make), args.weights, args.records)
        return
    if args.make_killed:
        make_killed_copy(Path(args.make_killed))
        return
    a, b = (str(Path(t).resolve()) for t in args.compare)
    folder = Path(tempfile.mkdtemp(prefix="bench-read-"))

    def run(tree: str, *extra: str) -> str:
        env = {**os.environ, "PYTHONPATH": tree}
        return subprocess.run([sys.executable, __file__, *extra], env=env, check=True, capture_output=True,
                              text=True).stdout

    try:
        run(a, "--make", str(folder), "--weights", str(args.weights), "--records", str(args.records))
        try:
            run(b, "--make-killed", str(folder))
        except subprocess.CalledProcessError:
            pass
        results = {a: [], b: []}
        for _ in range(args.rounds):
            for tree in (a, b):
                results[tree].append(json.loads(run(tree, "--measure", str(folder)).strip().splitlines()[-1]))
        print(f"\n{args.weights:,} weights × {args.records} records, median of {args.rounds} interleaved rounds "
              f"(best of 3 in each); A = {a}, B = {b}\n")
        print("| figure | A ms | B ms | B / A |\n|---|---:|---:|---:|")
        for key in results[b][0]:
            mb = statistics.median(r[key] for r in results[b])
            if key in results[a][0]:
                ma = statistics.median(r[key] for r in results[a])
                print(f"| {key} | {ma:.2f} | {mb:.2f} | {mb / ma:.2f} |")
            else:
                print(f"| {key} | – | {mb:.2f} | – |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
