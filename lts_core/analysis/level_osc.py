"""The level statistics and the oscillation replay in one pass, for the cache build.

`build_cache` computes both from record 0 in the same scan. Both follow each weight's level record by record
and keep its previous level and the direction of its last change, so one kernel (`stream_kernels.
level_osc_kernel`) does both: one load of the levels, one copy of that state, and the level statistics then
update only the weights whose level changed, which the oscillation update lists as it goes. The results are
the two passes' own, bit for bit (tests/test_level_osc.py).

    passes, unpack = fuse_level_osc([LevelStatsPass(), index_pass, OscPass(...)])
    results = unpack(run_passes(src, passes))     # one result per pass given, in their order
"""
from __future__ import annotations

from typing import Callable, Sequence

from .level_stats import LevelStatsPass
from .replay_stream import OscPass
from .stream import Pass, Task, level_limits


class LevelOscPass(Pass):
    """`LevelStatsPass` (from record 0) and `OscPass` in one kernel; its result is (level stats' result, the
    oscillation replay's result), its collector the two passes' collectors side by side."""

    needs = ("level",)
    checks_levels = True

    def __init__(self, levels: LevelStatsPass, osc: OscPass):
        self.levels, self.osc = levels, osc

    def worker(self, src, task: Task, first_record: int, out: dict | None = None):
        return _LevelOscWorker(self, src, task, first_record, out)

    def collector(self, src, first_record: int):
        return _LevelOscCollector(self.levels.collector(src, first_record), self.osc.collector(src, first_record))


class _LevelOscWorker:
    """The two passes' workers, sharing the level worker's previous levels and last directions (the
    oscillation worker's own are not used: its result reads the final levels from the shared ones)."""

    def __init__(self, p: LevelOscPass, src, task: Task, first_record: int, out: dict | None):
        if first_record:
            raise ValueError("the fused level and oscillation pass runs from the first record")
        self.p, self.src, self.task, self.limits = p, src, task, level_limits(src)
        level_out, osc_out = out if out is not None else (None, None)
        self.lw = p.levels.worker(src, task, 0, out=level_out) if level_out is not None else \
            p.levels.worker(src, task, 0)
        self.ow = p.osc.worker(src, task, 0, out=osc_out)
        self.ow.prev, self.ow.last_dir = self.lw.prev, self.lw.last_dir

    def feed(self, r0: int, data: dict, sub) -> None:
        from .stream_kernels import level_osc_kernel
        lw, ow = self.lw, self.ow
        s = slice(sub.offset, sub.offset + sub.size)
        top = level_osc_kernel(data["level"], sub.offset, sub.size, r0, lw.prev[s], lw.last_change[s], lw.flips[s],
                               lw.reversals[s], lw.last_dir[s], lw.occ[sub.layer], *self.p.osc.kernel_args(sub.layer),
                               ow.freq[s], ow.level_ema[s], ow.fs[s], ow.flevel[s], ow.free[s],
                               ow.new_by_record[sub.layer])
        if top >= self.limits[sub.layer]:
            self.src.level_error(r0, data["level"], self.task, sub)

    def result(self):
        return self.lw.result(), self.ow.result()


class _LevelOscCollector:
    def __init__(self, levels, osc):
        self.levels, self.osc = levels, osc

    def views(self, task: Task):
        views = [getattr(c, "views", lambda t: None)(task) for c in (self.levels, self.osc)]
        return None if views == [None, None] else tuple(views)

    def add(self, task: Task, res) -> None:
        self.levels.add(task, res[0])
        self.osc.add(task, res[1])

    def finish(self):
        return self.levels.finish(), self.osc.finish()


def fuse_level_osc(passes: Sequence[Pass]) -> tuple[list[Pass], Callable[[list], list]]:
    """(the passes to run, unpack(their results) → one result per pass of `passes`): a `LevelStatsPass`
    without a resume and an `OscPass` among them run as one `LevelOscPass` where the fused kernel is compiled
    for this CPU (`stream_kernels.HAS_COMPRESS`); otherwise the passes as they are."""
    passes = list(passes)
    lv = [i for i, p in enumerate(passes) if type(p) is LevelStatsPass and p.resume is None]
    osc = [i for i, p in enumerate(passes) if type(p) is OscPass]
    if not (lv and osc):
        return passes, list
    from .stream_kernels import HAS_COMPRESS
    if not HAS_COMPRESS:
        return passes, list
    a, b = lv[0], osc[0]
    rest = [i for i in range(len(passes)) if i not in (a, b)]
    run = [LevelOscPass(passes[a], passes[b])] + [passes[i] for i in rest]

    def unpack(results: list) -> list:
        out = [None] * len(passes)
        out[a], out[b] = results[0]
        for i, r in zip(rest, results[1:]):
            out[i] = r
        return out
    return run, unpack


__all__ = ["LevelOscPass", "fuse_level_osc"]
