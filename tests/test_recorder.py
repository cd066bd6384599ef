"""Recorder: records at the right steps, values round-trip through the store, crash and exception paths,
bounded memory. Uses small fake layers/rules (duck typing) plus one real quantized model."""
from __future__ import annotations

import errno
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from lts_core.distance import encode_distance
from lts_core.recorder import Recorder, default_run_id
from lts_core.store import CorruptChunkError, StoreWriteError, chunk_file, list_runs, open_run


# ---- fakes implementing exactly the attributes the recorder relies on ------------------------------------
class FakeQuantizer:
    def __init__(self, bits=2, kind="liq"):
        self.bits, self.n_levels, self.kind = bits, 2 ** bits, kind
        self.lower, self.upper, self.step_size = -1.0, 1.0, 0.5
        self.n_measures = 0

    def measure(self, w):
        self.n_measures += 1
        with torch.no_grad():
            if self.kind == "lsq":
                pos = w / self.step_size + self.n_levels // 2
            else:
                pos = (w - self.lower) / (self.upper - self.lower) * (self.n_levels - 1)
            level = torch.clamp(torch.round(pos), 0, self.n_levels - 1)
            return level.to(torch.int64), (pos - level).abs().float()

    def bounds(self):
        return {"step": self.step_size} if self.kind == "lsq" else {"lower": self.lower, "upper": self.upper}


class FakeLayer:
    def __init__(self, shape, kind="liq", flops=100, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.6)
        self.weight_quantizer = FakeQuantizer(kind=kind)
        self.flops = flops


def fake_layers():
    return [("enc.fc1", FakeLayer((6, 4), "liq", seed=1)), ("head", FakeLayer((10,), "lsq", seed=2))]


class FakeRule:
    """Watches `layers` (a subset allowed); one uint8 state array given per layer or flat."""

    name = "lts"

    def __init__(self, layers, flat_state=False):
        self.layer_names = [n for n, _ in layers]
        self.mods = [m for _, m in layers]
        self.t = 0
        self.last_level = [None] * len(layers)
        self.last_dist_code = [None] * len(layers)
        self.freeze_step = [torch.full_like(m.weight, -1, dtype=torch.int64) for m in self.mods]
        self.ema = [torch.zeros(m.weight.numel(), dtype=torch.uint8) for m in self.mods]
        self.flat_state = flat_state

    def step(self):
        for i, m in enumerate(self.mods):
            lev, d = m.weight_quantizer.measure(m.weight)
            self.last_level[i], self.last_dist_code[i] = lev, encode_distance(d)
            self.ema[i] = (self.ema[i].int() * 3 + 7 * self.t).remainder(256).to(torch.uint8) + 1
            self.freeze_step[i].view(-1)[self.t % m.weight.numel()] = self.t
        self.t += 1

    def record_state(self):
        return {"ema": torch.cat(self.ema) if self.flat_state else [e.clone() for e in self.ema]}

    def settings(self):
        return {"rule": "lts", "ratio": 1.0}


def wiggle(layers, t):
    g = torch.Generator().manual_seed(100 + t)
    with torch.no_grad():
        for _, m in layers:
            m.weight += torch.randn(m.weight.shape, generator=g) * 0.3


def expected_record(layers):
    lev, code = [], []
    for _, m in layers:
        level, dist = m.weight_quantizer.measure(m.weight)
        lev.append(level.reshape(-1).to(torch.uint8))
        code.append(encode_distance(dist).reshape(-1))
    return torch.cat(lev).numpy(), torch.cat(code).numpy()


def run_loop(rec, layers, n_steps, rule=None, expect=None):
    for t in range(n_steps):
        wiggle(layers, t)
        if rule is not None:
            rule.step()
        if expect is not None and rec.should_record(t):
            lev, code = expected_record(layers)
            exp = {"level": lev, "dist": code, "step": t,
                   "bounds": np.array([[-1.0, 1.0], [0.5, np.nan]], np.float32)}
            if rule is not None:
                exp["ema"] = torch.cat(rule.ema).numpy().copy()
            expect.append(exp)
        rec.step()


# ---- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("chunk_bytes,records_per_chunk", [(32 << 20, (4, 4)), (200, (2, 1)), (1, (1, 1))])
def test_round_trip_without_rule(tmp_path, chunk_bytes, records_per_chunk, background):
    layers = fake_layers()
    rec = Recorder.create(tmp_path, None, {"model": "fake", "seed": 3}, every=3, steps_per_epoch=5,
                          total_steps=10, chunk_bytes=chunk_bytes, layers=layers, run_id="rt",
                          background=background)
    assert rec.bytes_per_record == 92 and rec.chunk_records == records_per_chunk[background]
    expect = []
    run_loop(rec, layers, 10, expect=expect)
    rec.finish()
    run = open_run(tmp_path / "rt")
    assert run.status == "complete" and run.manifest["seed"] == 3 and run.manifest["rule"]["name"] == "none"
    assert len(run.manifest["chunks"]) == math.ceil(4 / rec.chunk_records)
    np.testing.assert_array_equal(run.steps, [0, 3, 6, 9])
    np.testing.assert_allclose(run.epochs, np.array([0, 3, 6, 9]) / 5)
    lev = np.stack([e["level"] for e in expect])
    code = np.stack([e["dist"] for e in expect])
    np.testing.assert_array_equal(run.levels(), lev)
    np.testing.assert_array_equal(run.dist_codes(), code)
    np.testing.assert_array_equal(run.levels("head"), lev[:, 24:])
    np.testing.assert_array_equal(run.levels(0), lev[:, :24])
    np.testing.assert_array_equal(run.dist_codes(1), code[:, 24:])
    np.testing.assert_array_equal(run.bounds(), np.stack([e["bounds"] for e in expect]))
    assert [lay["name"] for lay in run.layers] == ["enc.fc1", "head"]
    assert run.layers[0] == {"name": "enc.fc1", "shape": [6, 4], "numel": 24, "offset": 0, "n_levels": 4,
                             "bits": 2, "flops": 100, "kind": "liq"}
    assert run.state_arrays == [] and run.freeze_steps() is None
    assert run.manifest["record_every"] == 3 and run.manifest["total_steps"] == 10


@pytest.mark.parametrize("flat_state", [False, True])
def test_round_trip_with_rule_reuses_its_measurements(tmp_path, flat_state):
    layers = fake_layers()
    rule = FakeRule(layers, flat_state=flat_state)
    rec = Recorder.create(tmp_path, None, {}, rule=rule, every=4, steps_per_epoch=4, total_steps=10,
                          chunk_bytes=150, layers=layers, run_id="rule")
    expect = []
    run_loop(rec, layers, 10, rule=rule, expect=expect)
    # the recorder measured nothing itself: only the rule (10 steps) and our expectation (4 records)
    assert [m.weight_quantizer.n_measures for _, m in layers] == [14, 14]
    rec.finish()
    run = open_run(tmp_path / "rule")
    np.testing.assert_array_equal(run.steps, [0, 4, 8, 9])
    np.testing.assert_array_equal(run.levels(), np.stack([e["level"] for e in expect]))
    np.testing.assert_array_equal(run.dist_codes(), np.stack([e["dist"] for e in expect]))
    np.testing.assert_array_equal(run.state("ema"), np.stack([e["ema"] for e in expect]))
    fs = torch.cat([f.reshape(-1) for f in rule.freeze_step]).numpy()
    np.testing.assert_array_equal(run.freeze_steps(), fs)
    assert run.summary("freeze_step").dtype == np.int64
    assert run.manifest["rule"] == {"name": "lts", "settings": {"rule": "lts", "ratio": 1.0},
                                    "layers": ["enc.fc1", "head"]}
    assert run.manifest["state_arrays"] == ["ema"]


def test_rule_watching_a_subset_of_layers(tmp_path):
    layers = fake_layers()
    rule = FakeRule(layers[1:])  # like OscillationRule skipping 8-bit layers
    rec = Recorder.create(tmp_path, None, {}, rule=rule, every=1, steps_per_epoch=2, total_steps=3,
                          layers=layers, run_id="subset")
    expect = []
    run_loop(rec, layers, 3, rule=rule, expect=expect)
    rec.finish()
    run = open_run(tmp_path / "subset")
    np.testing.assert_array_equal(run.levels(), np.stack([e["level"] for e in expect]))
    np.testing.assert_array_equal(run.state("ema", "enc.fc1"), 0)
    np.testing.assert_array_equal(run.state("ema", "head"), np.stack([e["ema"] for e in expect]))
    np.testing.assert_array_equal(run.freeze_steps("enc.fc1"), -1)
    np.testing.assert_array_equal(run.freeze_steps("head"), rule.freeze_step[0].numpy())


@pytest.mark.parametrize("background", [False, True])
def test_crash_without_finish_is_interrupted_and_readable(tmp_path, background):
    layers = fake_layers()
    # bytes/record = 8 + 2*34 + 2*8 = 92 -> 3 records per chunk
    rec = Recorder.create(tmp_path, None, {}, every=1, steps_per_epoch=4, total_steps=100,
                          chunk_bytes=92 * 3 * (2 if background else 1), layers=layers, run_id="crashed",
                          background=background, raw_distances=False)
    assert rec.chunk_records == 3
    run_loop(rec, layers, 8)  # 8 records: 2 chunks sealed, 2 records in the open chunk when "the process dies"
    rec._wait()  # (background: let the write in flight land, so the count below is deterministic)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    rec.writer.update_manifest(pid=proc.pid)  # the writer's process is gone
    Recorder.create(tmp_path, None, {}, every=1, steps_per_epoch=1, layers=fake_layers(), run_id="other").finish()
    entries = {e.run_id: e for e in list_runs(tmp_path)}
    e = entries["crashed"]
    assert e.ok and e.status == "interrupted"
    assert e.run.reason == "process ended without closing the run"
    np.testing.assert_array_equal(e.run.steps, np.arange(8))  # every record taken is on disk
    assert e.run.levels().shape == (8, 34) and len(e.run.manifest["chunks"]) == 2
    assert entries["other"].ok and entries["other"].status == "complete"
    # corrupt a chunk of the crashed run: it is reported, the other run still lists fine
    f = chunk_file(tmp_path / "crashed", 1, "dist")
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(CorruptChunkError, match="000001.dist.npy"):
        open_run(tmp_path / "crashed")
    entries = {e.run_id: e for e in list_runs(tmp_path)}
    assert not entries["crashed"].ok and "000001.dist.npy" in entries["crashed"].error
    assert entries["other"].ok


def test_context_manager_failed(tmp_path):
    layers = fake_layers()
    with pytest.raises(ValueError, match="boom"):
        with Recorder.create(tmp_path, None, {}, every=2, steps_per_epoch=2, layers=layers, run_id="f") as rec:
            run_loop(rec, layers, 5)
            raise ValueError("boom")
    run = open_run(tmp_path / "f")
    assert run.status == "failed" and "boom" in run.reason and "ValueError" in run.reason
    np.testing.assert_array_equal(run.steps, [0, 2, 4])  # buffered records were flushed


def test_context_manager_interrupted(tmp_path):
    layers = fake_layers()
    rule = FakeRule(layers)
    with pytest.raises(KeyboardInterrupt):
        with Recorder.create(tmp_path, None, {}, rule=rule, every=1, steps_per_epoch=2, layers=layers,
                             run_id="i") as rec:
            run_loop(rec, layers, 3, rule=rule)
            raise KeyboardInterrupt
    run = open_run(tmp_path / "i")
    assert run.status == "interrupted" and run.reason == "interrupted by user (Ctrl-C)"
    assert run.n_records == 3 and run.freeze_steps() is not None


def test_context_manager_normal_exit_and_idempotent_finish(tmp_path):
    layers = fake_layers()
    with Recorder.create(tmp_path, None, {}, every=1, steps_per_epoch=2, layers=layers, run_id="ok") as rec:
        run_loop(rec, layers, 2)
        rec.finish("interrupted", reason="early stop")
        rec.finish()  # no-op
    run = open_run(tmp_path / "ok")
    assert run.status == "interrupted" and run.reason == "early stop" and run.n_records == 2
    with pytest.raises(RuntimeError):
        rec.step()


def test_metrics(tmp_path):
    layers = fake_layers()
    rec = Recorder.create(tmp_path, None, {}, every=1, steps_per_epoch=2, layers=layers, run_id="m")
    assert len(open_run(tmp_path / "m").metrics) == 0
    rec.log_epoch({"epoch": 1, "train_loss": torch.tensor(0.5), "test_acc": 0.9, "lr": 0.1})
    rec.log_epoch({"epoch": 2, "train_loss": 0.25, "test_acc": 0.95, "lr": 0.05, "extra": 7})
    df = open_run(tmp_path / "m").metrics
    assert list(df["epoch"]) == [1.0, 2.0] and list(df["train_loss"]) == [0.5, 0.25]
    assert np.isnan(df["frozen_fraction"]).all() and "extra" in df.columns
    rec.finish()


@pytest.mark.parametrize("background", [False, True])
def test_memory_bound(tmp_path, background):
    layers = [("a", FakeLayer((50, 20))), ("b", FakeLayer((100,)))]
    rule = FakeRule(layers)
    bpr = 8 + 3 * 1100 + 2 * 8 + 4 * 1100  # step, level + dist + ema, bounds, exact raw distances (every step)
    rec = Recorder.create(tmp_path, None, {}, rule=rule, every=1, steps_per_epoch=10, total_steps=None,
                          chunk_bytes=40_000, layers=layers, run_id="mem", background=background)
    n_sets = 2 if background else 1
    assert rec.bytes_per_record == bpr and rec.chunk_records == 40_000 // (n_sets * bpr)
    run_loop(rec, layers, 50, rule=rule)
    assert rec.buffer_nbytes <= 40_000
    rec.flush()
    assert rec.n_written == 50
    assert len(rec.writer.manifest["chunks"]) == math.ceil(50 / rec.chunk_records)
    assert rec.buffer_nbytes <= 40_000
    rec.finish()
    assert open_run(tmp_path / "mem").n_records == 50
    # total_steps caps the buffer for short runs; a record bigger than chunk_bytes still gets one row
    if background:
        return
    short = Recorder.create(tmp_path, None, {}, every=5, steps_per_epoch=5, total_steps=11, layers=layers,
                            run_id="short")
    assert short.chunk_records == short.expected_records() == 3  # steps 0, 5, 10 (10 is also T-1)
    assert short.expected_records(12) == 4  # 0, 5, 10, 11
    tiny = Recorder.create(tmp_path, None, {}, every=1, steps_per_epoch=5, chunk_bytes=1, layers=layers,
                           run_id="tiny")
    assert tiny.chunk_records == 1


def test_run_ids(tmp_path):
    assert "mlp-digits-lts" in default_run_id({"model": "mlp", "dataset": "digits", "rule": "lts"})
    assert "my-run" in default_run_id({"name": "My run!"})
    a, b = default_run_id({}), default_run_id({})
    assert a != b and a[:8].isdigit()
    rec = Recorder.create(tmp_path, None, {"name": "x"}, every=1, steps_per_epoch=1, layers=fake_layers())
    assert rec.path.parent == tmp_path and "-x-" in rec.run_id
    rec.finish()
    assert json.loads((rec.path / "manifest.json").read_text())["status"] == "complete"


def test_real_quantized_model(tmp_path):
    layers_mod = pytest.importorskip("lts_core.layers")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    layers_mod.quantize_model(model, bits=2, first_last_bits=8, example_input=torch.randn(4, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    rec = Recorder.create(tmp_path, model, {"model": "mlp"}, every=2, steps_per_epoch=2, total_steps=5,
                          run_id="real", chunk_bytes=1000)
    qlayers = layers_mod.quantized_layers(model)
    expect = []
    for t in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if rec.should_record(t):
            lev = [m.weight_quantizer.measure(m.weight)[0].reshape(-1) for _, m in qlayers]
            expect.append(torch.cat(lev).to(torch.uint8).numpy())
        rec.step()
        opt.step()
    rec.finish()
    run = open_run(tmp_path / "real")
    assert [lay["name"] for lay in run.layers] == [n for n, _ in qlayers]
    assert [lay["bits"] for lay in run.layers] == [8, 2, 8]
    assert all(lay["flops"] > 0 for lay in run.layers)
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    np.testing.assert_array_equal(run.levels(), np.stack(expect))
    b = run.bounds()
    assert b.shape == (3, 3, 2) and np.all(b[..., 0] < b[..., 1])


def test_forward_remembers_only_before_record_steps(tmp_path):
    """The recorder asks the quantizers' forward pass to keep its position and level only for the steps it
    records; the records still equal a fresh measurement, and finish() releases the kept tensors. A layer
    whose flag a rule set stays on."""
    from lts_core.layers import quantize_model, quantized_layers
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    quantize_model(model, bits=2, first_last_bits=4, example_input=torch.randn(4, 8))
    qs = [m.weight_quantizer for _, m in quantized_layers(model)]
    qs[2].remember_forward = True  # as a rule watching the last layer would have set it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    rec = Recorder.create(tmp_path, model, {}, every=3, steps_per_epoch=3, total_steps=8, run_id="r")
    flags, expect_lv, expect_cd = [], [], []
    for t in range(8):
        flags.append([q.remember_forward for q in qs])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if rec.should_record(t):
            fresh = [q.measure(m.weight) for q, (_, m) in zip(qs, quantized_layers(model))]
            expect_lv.append(np.concatenate([lv.reshape(-1).numpy() for lv, _ in fresh]).astype(np.uint8))
            expect_cd.append(np.concatenate([encode_distance(d).reshape(-1).numpy() for _, d in fresh]))
        rec.step()
        opt.step()
    rec.finish()
    recorded = [rec.should_record(t) for t in range(8)]
    assert recorded == [True, False, False, True, False, False, True, True]
    assert [f[:2] for f in flags] == [[r, r] for r in recorded]
    assert all(f[2] for f in flags)
    assert [q.remember_forward for q in qs] == [False, False, True]
    assert qs[0]._seen is None and qs[1]._seen is None
    run = open_run(tmp_path / "r")
    np.testing.assert_array_equal(run.levels(), np.stack(expect_lv))
    np.testing.assert_array_equal(run.dist_codes(), np.stack(expect_cd))


def test_real_rule(tmp_path):
    pytest.importorskip("lts_core.layers")
    rules = pytest.importorskip("lts_core.rules")
    from lts_core.layers import quantize_model
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    quantize_model(model, bits=2, example_input=torch.randn(4, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rule = rules.LTSRule(model, opt, total_steps=6, warmup_steps=2, ratio=0.5)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with Recorder.create(tmp_path, model, {}, rule=rule, every=1, steps_per_epoch=3, total_steps=6,
                         run_id="lts") as rec:
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            rule.step()
            rec.step()
            opt.step()
    run = open_run(tmp_path / "lts")
    assert run.status == "complete" and run.state_arrays == ["ema"] and run.n_records == 6
    np.testing.assert_array_equal(run.freeze_steps(), rule.freeze_steps_flat().numpy())
    np.testing.assert_array_equal(run.levels()[-1], torch.cat([lv.reshape(-1) for lv in rule.last_level]).numpy())


def test_background_write_error_surfaces(tmp_path):
    layers = fake_layers()
    rec = Recorder.create(tmp_path, None, {}, every=1, steps_per_epoch=2, chunk_bytes=92 * 2, layers=layers, raw_distances=False,
                          run_id="diskfull")
    assert rec.background and rec.chunk_records == 1

    def broken(buffers):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "diskfull" / "traj"))

    rec.writer.open_chunk = broken
    with pytest.raises(StoreWriteError, match="disk full at .*traj, 0 records kept"):
        with rec:
            run_loop(rec, layers, 5)  # the 1st record fails in the background; the 2nd re-raises it
    assert rec.n_records == 2  # recording stopped at the first error
    run = open_run(tmp_path / "diskfull")
    assert run.status == "failed" and run.reason == f"disk full at {tmp_path / 'diskfull' / 'traj'}, 0 records kept"
    assert run.n_records == 0
