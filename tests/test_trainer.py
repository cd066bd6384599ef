"""Trainer and CLI: headline figures on digits, determinism, same data order, NaN, validation, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lts_core.config import ConfigError, make_config
from lts_core.trainer import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SCRATCHOFF_RUNS", str(tmp_path / "runs"))


def test_digits_mlp_2bit_headline():
    """Baseline QAT and LTS (linear-growth, warm-up 20%) within 2 points of FP; LTS eliminates ≥ 40% of updates."""
    base = dict(model="mlp", dataset="digits", bits=2, epochs=30, device="cpu", record=False)
    none = train(make_config(**base, rule="none"), progress=False)
    lts = train(make_config(**base, rule="lts", schedule="linear"), progress=False)
    assert none.fp_test_acc == lts.fp_test_acc  # same cached FP checkpoint
    assert abs(none.metrics[-1]["test_acc"] - none.fp_test_acc) <= 2.0
    assert abs(lts.metrics[-1]["test_acc"] - lts.fp_test_acc) <= 2.0
    assert lts.metrics[-1]["updates_eliminated"] >= 0.40
    assert 0.0 < lts.metrics[-1]["backward_flops_saved"] < lts.metrics[-1]["updates_eliminated"] / 2 + 1e-9
    assert none.metrics[-1]["updates_eliminated"] == 0.0


def test_reference_preset_trains_as_the_reference_and_counts_both_ways(tmp_path):
    """preset="reference": every layer quantized at --bits with the 2q−1 output, the partial last batch kept,
    the reference's optimizers; both "updates eliminated" figures equal a hand computation from the freeze steps."""
    import math

    from lts_core.store import open_run
    cfg = make_config(preset="reference", model="mlp", dataset="digits", width=32, bits=2, epochs=3, fp_epochs=1,
                      batch_size=100, rule="lts", schedule="fixed", warmup_epochs=1, device="cpu", record_every=1)
    assert (cfg.first_last_bits, cfg.weight_output, cfg.drop_last, cfg.bound_lr) == (2, "unit", False, 1e-4)
    assert cfg.ratio == 0.1  # the reference's fixed ratio
    with pytest.warns(UserWarning, match="BatchNorm"):  # 2q − 1 has no scale without a BatchNorm: said so
        res = train(cfg, run_dir=tmp_path / "ref", progress=False)
    run = open_run(tmp_path / "ref")
    n_train = run.manifest["dataset_sizes"][0]
    spe = math.ceil(n_train / 100)
    assert n_train % 100 != 0 and run.manifest["steps_per_epoch"] == spe   # the partial batch is a step
    T = run.manifest["total_steps"]
    assert T == 3 * spe and run.n_records == T
    # all three Linear layers of the MLP are quantized at 2 bits and watched, first and last included
    assert [la["bits"] for la in run.layers] == [2, 2, 2] and run.manifest["rule"]["layers"] == run.layer_names
    # all trainable parameters: weights and biases of the three layers, plus two bounds per layer
    shapes = [la["shape"] for la in run.layers]
    n_params = sum(o * i + o + 2 for o, i in shapes)
    assert run.manifest["n_trainable_params"] == n_params
    fs = run.freeze_steps()
    counts = np.array([((fs >= 0) & (fs <= t)).sum() for t in range(T)])
    assert counts[-1] > 0 and fs[fs >= 0].min() > spe   # nothing freezes during the warm-up epoch (t > W)
    last = res.metrics[-1]
    assert last["updates_eliminated"] == pytest.approx(counts.sum() / (fs.size * T), rel=1e-12)
    assert last["updates_eliminated_all_params"] == pytest.approx(counts.sum() / (n_params * T), rel=1e-12)
    assert last["updates_eliminated_all_params"] < last["updates_eliminated"]
    # the quantized layers output the reference's 2q − 1 values
    assert [la["output"] for la in run.layers] == ["unit"] * 3


def test_deterministic_and_same_data_order_for_all_rules():
    base = dict(epochs=4, fp_epochs=2, device="cpu", record=False, warmup_epochs=1)
    a = train(make_config(**base, rule="lts"), progress=False)
    b = train(make_config(**base, rule="lts"), progress=False)
    assert a.metrics[-1]["train_loss"] == b.metrics[-1]["train_loss"]
    assert np.array_equal(a.frozen_mask.numpy(), b.frozen_mask.numpy())
    # during warm-up LTS freezes nothing: the first epoch is bit-identical to the baseline and osc runs
    n = train(make_config(**base, rule="none"), progress=False)
    o = train(make_config(**base, rule="osc"), progress=False)
    assert a.metrics[0]["train_loss"] == n.metrics[0]["train_loss"] == o.metrics[0]["train_loss"]


def test_nan_loss_stops_with_clear_message(tmp_path):
    cfg = make_config(epochs=3, fp_epochs=1, device="cpu", lr=1e12, optimizer="sgd", momentum=0.0)
    with pytest.raises(NonFiniteLoss, match="loss became"):
        train(cfg, run_dir=tmp_path / "runs" / "nan", progress=False)
    manifest = json.loads((tmp_path / "runs" / "nan" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "loss became" in manifest["reason"]


@pytest.mark.parametrize("fields,needle", [
    ({"bits": 9}, "bits"), ({"bits": 0}, "bits"), ({"decay": 1.0}, "decay"), ({"decay": -0.1}, "decay"),
    ({"warmup_epochs": 30, "epochs": 30}, "warm-up"), ({"model": "vgg"}, "unknown model"),
    ({"dataset": "imagenet"}, "unknown dataset"), ({"threshold": -0.5}, "threshold"), ({"rule": "magic"}, "rule"),
])
def test_config_validation(fields, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        make_config(**fields)
    assert "\n" not in str(e.value)


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "lts_core", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300, **kw)


@pytest.mark.parametrize("args", [["--bits", "9"], ["--decay", "1.5"], ["--warmup-epochs", "5", "--epochs", "5"],
                                  ["--model", "vgg"], ["--dataset", "imagenet"], ["--threshold", "-1"]])
def test_cli_invalid_config_exit_2_nothing_written(tmp_path, args):
    out = tmp_path / "run"
    r = cli("train", *args, "--out", str(out))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid config")
    assert not out.exists() and not (tmp_path / "data").exists()


def test_cli_config_file_and_train(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = 3\nfp_epochs = 1\nrule = "lts"\nwarmup_epochs = 1\nschedule = "fixed"\n'
                   'threshold = 0.3\ndevice = "cpu"\n')
    out = tmp_path / "runs" / "one"
    r = cli("train", "--config", str(cfg), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(out) and summary["updates_eliminated"] > 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = cli("train", "--config", str(bad))
    assert r.returncode == 2 and "cannot parse config file" in r.stderr


def test_ddp_two_cpu_ranks_identical_frozen_masks(tmp_path):
    prefix = tmp_path / "mask"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lts_core", "train", "--epochs", "4", "--fp-epochs", "1", "--warmup-epochs", "1",
                        "--no-record", "--quiet", "--device", "cpu", "--dump-frozen", str(prefix)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "SCRATCHOFF_DATA": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr[-2000:]
    m0, m1 = np.load(f"{prefix}.rank0.npy"), np.load(f"{prefix}.rank1.npy")
    assert 0.0 < m0.mean() and np.array_equal(m0, m1)


def test_cli_sweep_trains_a_grid_of_real_runs(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"epochs": 3, "fp_epochs": 1, "warmup_epochs": 1, "device": "cpu", "width": 32}))
    out = tmp_path / "sweep"
    r = cli("sweep", "--config", str(base), "--thresholds", "0.1,0.3", "--schedules", "fixed", "--out", str(out),
            "--jobs", "2", env={"SCRATCHOFF_DATA": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr[-2000:]
    from lts_core.store import list_runs
    entries = {e.run_id: e for e in list_runs(out)}
    assert set(entries) == {"mlp-digits-2b-lts-fixed-r0.1-s0", "mlp-digits-2b-lts-fixed-r0.3-s0",
                            "mlp-digits-2b-baseline-s0"}
    assert all(e.ok and e.status == "complete" for e in entries.values())
    fp = {e.run.manifest["fp_test_acc"] for e in entries.values()}
    assert len(fp) == 1  # one shared full-precision checkpoint
    ue = {k: e.run.metrics["updates_eliminated"].iloc[-1] for k, e in entries.items()}
    assert ue["mlp-digits-2b-lts-fixed-r0.3-s0"] >= ue["mlp-digits-2b-lts-fixed-r0.1-s0"] > 0
    r = cli("sweep", "--thresholds", "-1", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "threshold" in r.stderr


def test_in_process_hooks_on_epoch_and_should_stop(tmp_path):
    rows, calls = [], []

    def stop_after_30_steps():
        calls.append(1)
        return len(calls) >= 30

    cfg = make_config(epochs=10, fp_epochs=1, device="cpu", warmup_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir=tmp_path / "runs" / "hooked", progress=False, on_epoch=rows.append,
              should_stop=stop_after_30_steps)
    assert len(rows) == 2 and rows[0]["epoch"] == 1  # 11 steps per epoch: stopped inside epoch 3
    manifest = json.loads((tmp_path / "runs" / "hooked" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "step 30" in manifest["reason"]
