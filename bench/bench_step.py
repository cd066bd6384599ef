"""Step-time ratios on CPU, measured in one process: QAT step ÷ FP step and LTS step ÷ QAT step.

Usage: python bench/bench_step.py [--steps N]   (MLP on digits-shaped input, ResNet-20 at batch 128)
Targets (issue 2): QAT ≤ 1.5× FP, LTS adds ≤ 10% over QAT.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lts_core import LTSRule, quantize_model
from lts_core.models import build_model


def time_steps(model, x, y, steps: int, rule_factory=None) -> float:
    """Median seconds of one optimizer step (forward, backward, rule, update)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    rule = rule_factory(model, opt) if rule_factory else None
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if rule is not None:
            rule.step()
        opt.step()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, in_shape, steps: int, batch: int = 128) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, *in_shape), torch.randint(0, 10, (batch,))

    def fresh(quantized: bool):
        torch.manual_seed(0)
        m = build_model(name, in_shape, 10)
        return quantize_model(m, bits=2, example_input=x[:2]) if quantized else m

    # LTS in its costliest phase: after warm-up, ratio small enough that weights stay mostly unfrozen
    lts = lambda m, o: LTSRule(m, o, total_steps=10_000, warmup_steps=0, schedule="fixed", ratio=0.05)
    fp = time_steps(fresh(False), x, y, steps)
    qat = time_steps(fresh(True), x, y, steps)
    lts_t = time_steps(fresh(True), x, y, steps, lts)
    # interleave a second round so drift in machine load hits all three alike
    fp = min(fp, time_steps(fresh(False), x, y, steps))
    qat = min(qat, time_steps(fresh(True), x, y, steps))
    lts_t = min(lts_t, time_steps(fresh(True), x, y, steps, lts))
    return {"model": name, "fp_ms": fp * 1e3, "qat_ms": qat * 1e3, "lts_ms": lts_t * 1e3,
            "qat_over_fp": qat / fp, "lts_over_qat": lts_t / qat}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [bench("mlp", (64,), args.steps * 5), bench("resnet20", (3, 32, 32), args.steps)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 128, CPU")
    print("| model | FP step (ms) | QAT step (ms) | LTS step (ms) | QAT ÷ FP | LTS ÷ QAT |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fp_ms']:.2f} | {r['qat_ms']:.2f} | {r['lts_ms']:.2f} | "
              f"{r['qat_over_fp']:.2f} | {r['lts_over_qat']:.2f} |")


if __name__ == "__main__":
    main()
