"""Step time and recording cost of the paper's architectures on the CPU (2-bit, 2 threads).

For each model: the median step time of FP training, QAT, QAT + LTS, QAT + a recorder taking one record every
`--epoch-steps` steps (a short "epoch": a real CIFAR epoch at batch 128 has 390 steps, so the real cost is
smaller still), and the cost of one record (`rec.step()` on a record step, measured alone). Rounds are
interleaved (FP, QAT, LTS, QAT+rec, FP, …) and the best round of each is kept.

    python bench/bench_models.py [--rounds 2] [--steps 20] [--epoch-steps 20] [--models resnet18,mobilenetv2,transformer]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lts_core import LTSRule, Recorder, quantize_model  # noqa: E402
from lts_core.layers import quantized_layers  # noqa: E402
from lts_core.models import build_model  # noqa: E402

SHAPES = {"resnet18": ((3, 32, 32), 32), "mobilenetv2": ((3, 32, 32), 32), "transformer": ((10, 4), 128),
          "resnet20": ((3, 32, 32), 128)}


def steps_timed(model, x, y, steps: int, hooks=()) -> list[float]:
    """Seconds of each optimizer step (forward, backward, hooks such as rule.step / rec.step, update)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    made = [h(model, opt) for h in hooks]
    out = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for h in made:
            h.step()
        opt.step()
        out.append(time.perf_counter() - t0)
    for h in made:
        if hasattr(h, "finish"):
            h.finish()
    return out[2:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epoch-steps", type=int, default=20)
    ap.add_argument("--models", default="resnet18,mobilenetv2,transformer")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            shape, batch = SHAPES[name]
            x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

            def fresh(q=True):
                torch.manual_seed(0)
                m = build_model(name, shape, 10)
                return quantize_model(m, bits=2, example_input=x[:2]) if q else m

            lts = lambda m, o: LTSRule(m, o, total_steps=10_000, warmup_steps=0, schedule="fixed", ratio=0.05)
            rec = lambda m, o: Recorder.create(tmp, m, config={"name": name}, every=args.epoch_steps,
                                               steps_per_epoch=args.epoch_steps, total_steps=10_000)
            best = {}
            rec_cost = []
            for _ in range(args.rounds):
                for kind, make, hooks in (("fp", lambda: fresh(False), ()), ("qat", fresh, ()),
                                          ("lts", fresh, (lts,)), ("rec", fresh, (rec,))):
                    ts = steps_timed(make(), x, y, args.steps, hooks)
                    best[kind] = min(best.get(kind, float("inf")), statistics.mean(ts))
                # one record alone: rec.step() at a record step, after a normal step
                m = fresh()
                r = Recorder.create(tmp, m, config={"name": f"{name}-one"}, every=1, steps_per_epoch=1,
                                    total_steps=4)
                F.cross_entropy(m(x), y).backward()
                t0 = time.perf_counter()
                r.step()
                rec_cost.append(time.perf_counter() - t0)
                r.finish()
            n_q = sum(layer.weight.numel() for _, layer in quantized_layers(fresh()))
            rows.append((name, shape, batch, n_q, best, min(rec_cost)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 2-bit weights; mean step over "
          f"{args.steps} steps, best of {args.rounds} interleaved rounds; recorder: one record every "
          f"{args.epoch_steps} steps")
    print("| model | input × batch | quantized weights | FP step | QAT step | LTS step | QAT ÷ FP | LTS ÷ QAT | "
          "QAT + record every {0} steps ÷ QAT | one record (rec.step) |".format(args.epoch_steps))
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, batch, n_q, b, one in rows:
        print(f"| {name} | {'×'.join(map(str, shape))} × {batch} | {n_q / 1e6:.2f}M | {b['fp'] * 1e3:.0f} ms | "
              f"{b['qat'] * 1e3:.0f} ms | {b['lts'] * 1e3:.0f} ms | {b['qat'] / b['fp']:.2f} | "
              f"{b['lts'] / b['qat']:.2f} | {b['rec'] / b['qat']:.3f} | {one * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
