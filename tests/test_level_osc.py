"""The level statistics and the oscillation replay in one pass (lts_core.analysis.level_osc) give the two passes'
own results, bit for bit, and the cache build uses it only where it can."""
import numpy as np
import pytest

from lts_core.analysis import level_osc
from lts_core.analysis.level_osc import LevelOscPass, fuse_level_osc
from lts_core.analysis.level_stats import LevelStatsPass
from lts_core.analysis.replay_stream import IndexPass, OscPass
from lts_core.analysis.stream import ArraySource, run_passes, serial, thread_executor
from lts_core.analysis.stream_kernels import HAS_COMPRESS
from test_stream_kernels import SIZES, levels, same_tree

needs_compress = pytest.mark.skipif(not HAS_COMPRESS, reason="the fused kernel is compiled for AVX-512 only")


def osc_pass(steps, watch=None, decay=0.5, thr=(0.5, 0.5)):
    return OscPass(steps, int(steps[-1]), decay, 0.2, thr[0], thr[1], watch, per_weight=False)


@needs_compress
@pytest.mark.parametrize("chunk,sub", [(1, 64), (7, 13), (40, 1 << 17), (3, 50)])
@pytest.mark.parametrize("watch", [None, [True, False, True, True, False]])
def test_fused_pass_equals_the_two_passes(chunk, sub, watch):
    """Levels of every layer size (2 … 256 levels: keys use all eight bits), changes in every sixteen and in
    the last nb mod 16 weights of a block (sub-blocks of 13 and 50 columns), thresholds tied with the
    frequency (0.5), layers not watched, one and two threads."""
    rng = np.random.default_rng(chunk)
    R = 40
    lv = levels(rng, R, p_move=0.5)
    steps = np.arange(R)
    src = ArraySource({"level": lv}, SIZES, chunk)
    for decay, thr in ((0.5, (0.5, 0.5)), (0.25, (0.3, 0.01))):
        for executor in (serial, thread_executor(2)):
            kw = {"executor": executor, "task_cols": 211, "sub_cols": sub}
            want = run_passes(src, [LevelStatsPass(), osc_pass(steps, watch, decay, thr)], **kw)
            got = run_passes(src, [LevelOscPass(LevelStatsPass(), osc_pass(steps, watch, decay, thr))], **kw)[0]
            same_tree(got[0], want[0], "levels")
            same_tree(got[1], want[1], "oscillation")
            assert got[1]["n_frozen"].sum() > 0 and got[0].reversals.sum() > 0


@needs_compress
def test_fuse_level_osc_keeps_the_order_of_results():
    """Among other passes (the replay index between them), results come back one per pass given, in order."""
    rng = np.random.default_rng(3)
    R = 30
    lv = levels(rng, R)
    codes = rng.integers(0, 256, lv.shape).astype(np.uint8)
    steps = np.arange(R)
    src = ArraySource({"level": lv, "dist": codes}, SIZES, 4)

    def make():
        return [osc_pass(steps), IndexPass(steps, [2, 3, 4, 16, 256], "linear", 5, R, 0.5, 64, 128, False),
                LevelStatsPass()]
    passes, unpack = fuse_level_osc(make())
    assert len(passes) == 2 and isinstance(passes[0], LevelOscPass)
    got = unpack(run_passes(src, passes, task_cols=211, sub_cols=64))
    want = run_passes(src, make(), task_cols=211, sub_cols=64)
    same_tree(got, want, "results")


def test_fuse_level_osc_leaves_other_sets_as_they_are():
    """No oscillation pass, or level statistics resumed from earlier records: nothing fused."""
    rng = np.random.default_rng(4)
    lv = levels(rng, 6)
    (old,) = run_passes(ArraySource({"level": lv[:3]}, SIZES, 3), [LevelStatsPass()])
    for passes in ([LevelStatsPass()], [osc_pass(np.arange(6))], [LevelStatsPass(old), osc_pass(np.arange(6))]):
        got, unpack = fuse_level_osc(passes)
        assert got == passes and unpack([1, 2]) == [1, 2]


@needs_compress
def test_cache_build_fused_equals_unfused(tmp_path, monkeypatch):
    """`build_cache` of a recorded run gives the same cached items with and without the fused pass."""
    from lts_core import open_run
    from lts_core.analysis import build_cache
    from test_stream import trajectories, write_run
    lv, dist, _ = trajectories(R=40, p_move=0.4)
    write_run(tmp_path, lv, dist, chunk=3)
    run = open_run(tmp_path / "r")
    fed = []
    feed = level_osc._LevelOscWorker.feed
    monkeypatch.setattr(level_osc._LevelOscWorker, "feed", lambda self, *a: fed.append(1) or feed(self, *a))
    fused = build_cache(run, save=False)
    assert fed                                  # the cache build ran the fused pass
    monkeypatch.setattr(level_osc, "fuse_level_osc", lambda passes: (list(passes), list))
    plain = build_cache(run, save=False)
    assert set(fused) == set(plain) == {"levels", "osc"} | {k for k in plain if k.startswith("replay-")}
    same_tree(fused["levels"], plain["levels"], "levels")
    same_tree(fused["osc"][1], plain["osc"][1], "osc")
