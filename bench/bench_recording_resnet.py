"""Recording overhead on ResNet-20 (CIFAR layout, 2-bit, batch 128, CPU): QAT step with and without recording
every step. Usage: python bench/bench_recording_resnet.py [--steps 15]"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from lts_core import Recorder, quantize_model
from lts_core.models import build_model


def median_step(record: bool, steps: int, tmp: str) -> float:
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    m = quantize_model(build_model("resnet20", (3, 32, 32), 10), bits=2, example_input=x[:2])
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    rec = Recorder.create(tmp, m, config={"name": f"bench-{record}"}, every=1, steps_per_epoch=steps + 3,
                          total_steps=steps + 3) if record else None
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        if rec is not None:
            rec.step()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if rec is not None:
        rec.finish()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        plain = min(median_step(False, args.steps, tmp), median_step(False, args.steps, tmp))
        rec = min(median_step(True, args.steps, tmp), median_step(True, args.steps, tmp))
    print("| ResNet-20, 2-bit, batch 128 | ms/step | overhead |\n|---|---|---|")
    print(f"| plain QAT step | {plain * 1e3:.0f} | – |\n| + record every step | {rec * 1e3:.0f} | {rec / plain:.3f}× |")


if __name__ == "__main__":
    main()
