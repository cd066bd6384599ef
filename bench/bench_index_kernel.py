"""The streamed analyses' kernels alone: CPU per weight-record of a cache item's pass (`--item index`: the
replay index of the run's own settings, the default; `levels`; `osc`; `levels-osc`: the two in the cache build's
one kernel, `LevelOscPass`, where this CPU has it) over the first columns of a stored run,
in memory (no reading), one thread; the code of this checkout or of another one (`--code DIR`, e.g. a worktree
of an older commit), so that two versions compare on the same data.

    python bench/bench_index_kernel.py /work/bigruns/syn-100m [--item osc] [--columns 1000000] [--rounds 4] [--code DIR]

Prints the thread CPU time of each round (the first includes numba's start and, once per installation, the
compilation) and a checksum of the results, which must be the same for every version.
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--columns", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--item", choices=("index", "levels", "osc", "levels-osc"), default="index")
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    import numpy as np
    from lts_core import open_run
    from lts_core.analysis.stream import ArraySource, run_passes, serial
    from lts_core.analysis.summaries import IndexItem, LevelsItem, OscItem, run_settings

    run = open_run(args.run)
    C = min(args.columns, run.n_weights)
    arrays = {name: np.concatenate([run.read_columns(c, name, 0, C) for c in range(len(run.chunk_sizes))])
              for name in ("level", "dist")}
    item = {"index": lambda: IndexItem(**run_settings(run)), "levels": LevelsItem, "osc": OscItem,
            "levels-osc": lambda: _LevelsOsc(LevelsItem(), OscItem())}[args.item]()
    src = ArraySource(arrays, [C], 1)
    wr = arrays["level"].size
    for i in range(args.rounds):
        p = item.make_pass(run, None)
        t0 = time.thread_time()
        (result,) = run_passes(src, [p], serial, workers=1)
        t = time.thread_time() - t0
        crc = 0
        for a in _arrays(result):
            crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
        print(f"round {i + 1}: {t:.3f} s CPU, {t / wr * 1e9:.2f} ns per weight-record ({wr:.3g} weight-records), "
              f"crc {crc:08x}")


class _LevelsOsc:
    """The level statistics and the oscillation item as the cache build runs them (`fuse_level_osc`)."""

    def __init__(self, *items):
        self.items = items

    def make_pass(self, run, resume):
        from lts_core.analysis.level_osc import fuse_level_osc
        passes, _ = fuse_level_osc([it.make_pass(run, None) for it in self.items])
        if len(passes) != 1:
            raise SystemExit("this CPU runs the level statistics and the oscillation replay apart (no AVX-512)")
        return passes[0]


def _arrays(result):
    """The numpy arrays of a pass's result (a tuple, a dict or an object with array attributes), in a fixed order."""
    import numpy as np
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, dict):
        return [a for k in sorted(result) for a in _arrays(result[k])]
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _arrays(r)]
    if hasattr(result, "__dict__"):
        return _arrays(vars(result))
    return []


if __name__ == "__main__":
    main()
