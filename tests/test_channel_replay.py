"""Channel granularity in the replay and the structurally skippable share: exact against the live rule on a run
recorded every step, and against a direct computation from per-weight freeze steps."""
from __future__ import annotations

import numpy as np
import pytest

from lts_core.analysis.replay import ReplayIndex, freeze_accounting, replay_accounting, replay_freeze_steps
from lts_core.config import make_config
from lts_core.store import open_run
from lts_core.trainer import train
from test_integration import data_env  # noqa: F401  (the module-scoped data folder fixture)


def test_channel_lts_run_replays_itself_exactly(data_env, tmp_path):
    cfg = make_config(model="mlp", dataset="digits", width=32, bits=2, epochs=6, fp_epochs=3, device="cpu",
                      warmup_epochs=1, record_every=1, rule="lts", schedule="linear", threshold=0.5,
                      granularity="channel", channel_quantile=0.9, bound_grad="active")
    res = train(cfg, run_dir=tmp_path / "ch", progress=False)
    run = open_run(tmp_path / "ch")
    s = run.manifest["rule"]["settings"]
    assert (s["granularity"], s["channel_quantile"], s["bound_grad"]) == ("channel", 0.9, "active")
    actual = run.freeze_steps()
    assert 0.05 < (actual >= 0).mean() < 1.0
    kw = dict(schedule="linear", decay=s["decay"], granularity="channel", channel_quantile=0.9)
    np.testing.assert_array_equal(replay_freeze_steps(run, ratio=0.5, **kw), actual)
    # the per-weight replay of the same records is a different rule
    assert not np.array_equal(replay_freeze_steps(run, ratio=0.5, schedule="linear", decay=s["decay"]), actual)
    idx = ReplayIndex.build(run, warmup_steps=s["warmup_steps"], **kw)
    q = idx.query(0.5)
    last = res.metrics[-1]
    assert q.updates_eliminated == pytest.approx(last["updates_eliminated"], abs=1e-9)
    assert q.backward_flops_saved == pytest.approx(last["backward_flops_saved"], abs=1e-9)
    # channel freezing: the structural share is the accounted one, and the live rule counted the same
    assert q.backward_flops_skippable == pytest.approx(q.backward_flops_saved, abs=1e-12)
    assert q.backward_flops_skippable == pytest.approx(last["backward_flops_skippable"], abs=1e-9)
    # one threshold with its accounting (what the Sweep page shows): the live rule's own figures
    acc = replay_accounting(run, ratio=0.5, **kw)
    for key in ("updates_eliminated", "backward_flops_saved", "backward_flops_skippable"):
        assert getattr(acc, key) == pytest.approx(last[key], abs=1e-9), key
    per_weight = replay_accounting(run, ratio=0.5, schedule="linear", decay=s["decay"])   # streamed
    pw_idx = ReplayIndex.build(run, warmup_steps=s["warmup_steps"], schedule="linear", decay=s["decay"],
                               structural=True).query(0.5)
    assert per_weight.backward_flops_skippable == pytest.approx(pw_idx.backward_flops_skippable, abs=1e-12)
    assert per_weight.updates_eliminated == pytest.approx(pw_idx.updates_eliminated, abs=1e-12)
    assert per_weight.backward_flops_skippable < per_weight.backward_flops_saved
    for ratio in (0.4, 0.7):   # any other threshold: the index equals the direct replay
        direct = replay_freeze_steps(run, ratio=ratio, **kw)
        assert idx.query(ratio).n_frozen == int((direct >= 0).sum())
    assert {"step_seconds", "backward_seconds", "backward_flops_skippable"} <= set(run.metrics.columns)
    assert (run.metrics["backward_seconds"] > 0).all()
    assert (run.metrics["step_seconds"] > run.metrics["backward_seconds"]).all()


def _synthetic(seed=0, R=12, sizes=(12, 8), channels=(4, 2)):
    rng = np.random.default_rng(seed)
    N = sum(sizes)
    steps = np.arange(R) * 2
    levels = rng.integers(0, 4, (R, N)).astype(np.uint8)
    levels[R // 2:] = levels[R // 2]                    # settle in the second half
    codes = rng.integers(0, 40, (R, N)).astype(np.uint8)
    return dict(steps=steps, levels=levels, dist_codes=codes, layer_sizes=list(sizes), layer_flops=[100, 30],
                warmup_steps=2, total_steps=int(steps[-1]) + 2, decay=0.5, layer_channels=list(channels),
                layer_n_levels=[4, 4])


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_index_structural_share_equals_the_direct_count(granularity):
    """For any grid ratio, the index's skippable share equals the share computed from the direct replay's
    per-weight freeze steps (a channel counts once its last weight froze)."""
    a = _synthetic()
    idx = ReplayIndex.build(a["steps"], a["levels"], a["dist_codes"], a["layer_sizes"], a["layer_flops"],
                            schedule="fixed", warmup_steps=a["warmup_steps"], total_steps=a["total_steps"],
                            decay=a["decay"], device="cpu", layer_n_levels=a["layer_n_levels"],
                            layer_channels=a["layer_channels"], granularity=granularity, channel_quantile=0.75)
    sw = idx.sweep()
    seen = set()
    for ratio in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        fs = replay_freeze_steps(a["steps"], a["levels"], a["dist_codes"], schedule="fixed", ratio=ratio,
                                 warmup_steps=a["warmup_steps"], total_steps=a["total_steps"], decay=a["decay"],
                                 layer_sizes=a["layer_sizes"], layer_n_levels=a["layer_n_levels"],
                                 granularity=granularity, channel_quantile=0.75, layer_channels=a["layer_channels"])
        direct = freeze_accounting(fs, a["steps"], a["layer_sizes"], a["layer_flops"], a["total_steps"],
                                   layer_channels=a["layer_channels"])
        q = idx.query(ratio)
        assert q.n_frozen == int((fs >= 0).sum())
        assert q.backward_flops_skippable == pytest.approx(direct.backward_flops_skippable, abs=1e-12)
        np.testing.assert_allclose(q.skippable_flops, direct.skippable_flops, atol=1e-12)
        assert sw["backward_flops_skippable"][idx.ratio_bin(ratio)] == pytest.approx(q.backward_flops_skippable)
        if granularity == "channel":
            assert q.backward_flops_skippable == pytest.approx(q.backward_flops_saved, abs=1e-12)
        else:
            assert q.backward_flops_skippable <= q.backward_flops_saved + 1e-12
        seen.add(round(q.backward_flops_skippable, 9))
    assert len(seen) > 2   # the thresholds give different answers: the test can tell them apart


def test_channel_replay_without_channel_counts_is_a_clear_error():
    a = _synthetic()
    with pytest.raises(ValueError, match="output-channel count"):
        replay_freeze_steps(a["steps"], a["levels"], a["dist_codes"], schedule="fixed", ratio=0.1,
                            warmup_steps=2, total_steps=30, layer_sizes=a["layer_sizes"], granularity="channel")
    q = ReplayIndex.build(a["steps"], a["levels"], a["dist_codes"], a["layer_sizes"], schedule="fixed",
                          warmup_steps=2, total_steps=30, device="cpu").query(0.1)
    assert np.isnan(q.backward_flops_skippable) and q.skippable_flops is None
