"""Recording overhead on ResNet-20 (CIFAR layout, 2-bit, batch 128, CPU): QAT step with and without recording
every step, timed by bench_step's loop. Usage: python bench/bench_recording_resnet.py [--steps 15]"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import time_steps  # noqa: E402  (the same timed loop; a Recorder plugs in like a rule)

from lts_core import Recorder, quantize_model  # noqa: E402
from lts_core.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def model():
        torch.manual_seed(0)
        return quantize_model(build_model("resnet20", (3, 32, 32), 10), bits=2, example_input=x[:2])

    with tempfile.TemporaryDirectory() as tmp:
        recs = []

        def recorder(m, opt):
            recs.append(Recorder.create(tmp, m, config={"name": f"bench-{len(recs)}"}, every=1,
                                        steps_per_epoch=args.steps + 3, total_steps=args.steps + 3))
            return recs[-1]

        plain = min(time_steps(model(), x, y, args.steps) for _ in range(2))
        rec = min(time_steps(model(), x, y, args.steps, recorder) for _ in range(2))
        for r in recs:
            r.finish()
    print("| ResNet-20, 2-bit, batch 128 | ms/step | overhead |\n|---|---|---|")
    print(f"| plain QAT step | {plain * 1e3:.0f} | – |\n| + record every step | {rec * 1e3:.0f} | {rec / plain:.3f}× |")


if __name__ == "__main__":
    main()
