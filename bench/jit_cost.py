"""numba's one-off cost of the streamed analyses' kernels (`lts_core.analysis.stream_kernels`): importing numba,
then each kernel's first call, compiled (empty cache) or loaded from numba's on-disk cache, each in a fresh
process.

    python bench/jit_cost.py [--rounds 3]      # the cache goes to a temporary NUMBA_CACHE_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child() -> dict:
    import numpy as np
    out = {}
    t = time.perf_counter()
    from lts_core.analysis import stream_kernels as sk
    out["import numba + kernels"] = time.perf_counter() - t
    from lts_core.analysis.level_stats import LevelStatsPass
    from lts_core.analysis.replay_stream import FreezeStepsPass, IndexPass, OscPass
    from lts_core.analysis.stream import ArraySource, run_passes, serial
    rng = np.random.default_rng(0)
    lv = rng.integers(0, 4, (6, 50)).astype(np.uint8)
    codes = rng.integers(0, 256, (6, 50)).astype(np.uint8)
    raw = rng.random((6, 50)).astype(np.float32)
    steps = np.arange(6) * 10
    passes = {"level_kernel": (LevelStatsPass(), {"level": lv}),
              "osc_kernel": (OscPass(steps, 60, 0.9, 0.0, 0.1, 0.01), {"level": lv}),
              "freeze_kernel (codes)": (FreezeStepsPass(steps, [4], "linear", 1.0, 5, 60, 0.9, False),
                                        {"level": lv, "dist": codes}),
              "freeze_kernel (raw)": (FreezeStepsPass(steps, [4], "linear", 1.0, 5, 60, 0.9, True),
                                      {"level": lv, "raw_dist": raw}),
              "index_kernel (codes)": (IndexPass(steps, [4], "linear", 5, 60, 0.9, 1024, 2048, False),
                                       {"level": lv, "dist": codes}),
              "index_kernel (raw)": (IndexPass(steps, [4], "linear", 5, 60, 0.9, 1024, 2048, True),
                                     {"level": lv, "raw_dist": raw})}
    for name, (p, arrays) in passes.items():
        t = time.perf_counter()
        run_passes(ArraySource(arrays), [p], serial)
        out[name] = time.perf_counter() - t
    assert sk.BLOCK
    return out


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(child()))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res: dict = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
            for label in ("compile", "cached"):
                out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                     check=True)
                for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    res.setdefault((k, label), []).append(v)
    print(f"load average {os.getloadavg()[0]:.1f}; seconds, median of {args.rounds} fresh processes (min–max)")
    print("| first call of | compiled (empty cache) | loaded from the cache |\n|---|---|---|")
    for k in dict.fromkeys(k for k, _ in res):
        cells = []
        for label in ("compile", "cached"):
            v = sorted(res[(k, label)])
            cells.append(f"{v[len(v) // 2]:.2f} ({v[0]:.2f}–{v[-1]:.2f})")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
