"""The paper's architectures (ResNet-18, MobileNetV2, a Transformer encoder) and the new datasets (CIFAR-100,
mnist1d-seq) train, record, replay and summarise end to end, at tiny widths so that the test stays fast."""
import numpy as np
import pytest

from lts_core.analysis import (ReplayIndex, cached_settle_summary, oscillation_summary, replay_freeze_steps,
                               settle_summary)
from lts_core.config import make_config
from lts_core.layers import quantized_layers
from lts_core.store import open_run
from lts_core.trainer import train
from test_datasets import _with, write_cifar100


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHOFF_DATA", str(tmp_path / "data"))
    import mnist1d.data
    real_args = mnist1d.data.get_dataset_args
    monkeypatch.setattr(mnist1d.data, "get_dataset_args",
                        lambda as_dict=False: _with(real_args(as_dict), num_samples=400))   # small = fast
    write_cifar100(tmp_path / "cifar-100-python", "py", n_train=48, n_test=16)
    return tmp_path


CASES = [("resnet18", "cifar100", 4, "layer4.1.conv2"), ("mobilenetv2", "cifar100", 4, "blocks.16.depthwise"),
         ("transformer", "mnist1d-seq", 16, "layers.1.fc2")]


@pytest.mark.parametrize("model,dataset,width,a_layer", CASES)
def test_trains_records_replays_and_summarises(data_env, tmp_path, model, dataset, width, a_layer):
    cfg = make_config(model=model, dataset=dataset, data_root=str(data_env), width=width, bits=2, epochs=2,
                      fp_epochs=1, batch_size=16, max_train=32, device="cpu", rule="lts", schedule="fixed",
                      threshold=0.25, warmup_epochs=1, record_every=1, seed=0)
    run_dir = tmp_path / "runs" / model
    res = train(cfg, run_dir=run_dir, progress=False)
    assert res.status == "complete" and np.isfinite(res.metrics[-1]["train_loss"])
    run = open_run(run_dir)
    assert a_layer in run.layer_names and run.n_records == run.manifest["total_steps"]
    assert run.config["dataset"] == dataset
    # self-replay of the recorded rule reproduces its freeze steps
    s = run.manifest["rule"]["settings"]
    replayed = replay_freeze_steps(run, schedule="fixed", ratio=0.25, warmup_steps=s["warmup_steps"],
                                   decay=s["decay"])
    np.testing.assert_array_equal(replayed, run.freeze_steps())
    idx = ReplayIndex.build(run, schedule="fixed", warmup_steps=s["warmup_steps"], decay=s["decay"])
    assert idx.query(0.25).n_frozen == int((run.freeze_steps() >= 0).sum())
    # the summary cached at finish equals the in-memory analysis of the records
    cached, ref = cached_settle_summary(run), settle_summary(run.levels(), [lay["numel"] for lay in run.layers])
    np.testing.assert_array_equal(cached.settle_records, ref.settle_records)
    np.testing.assert_array_equal(cached.layer_curves, ref.layer_curves)
    osc, _ = oscillation_summary(run)
    assert osc.frozen_fraction.shape == (run.n_records,)


def test_depthwise_layers_are_quantized_with_their_groups():
    import torch
    from lts_core import build_model, quantize_model
    m = quantize_model(build_model("mobilenetv2", (3, 32, 32), 100, width=4), bits=2,
                       example_input=torch.randn(2, 3, 32, 32))
    dw = {n: q for n, q in quantized_layers(m) if n.endswith(".depthwise")}
    assert len(dw) == 17 and all(q.groups == q.in_channels for q in dw.values())
    # FLOPs of a depthwise conv: one 3×3 filter per channel at every output position
    q = dw["blocks.0.depthwise"]
    assert q.flops == 2 * q.out_channels * 32 * 32 * 9
