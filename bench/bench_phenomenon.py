"""The paper's phenomenon on our data, and how far a per-epoch replay is from a per-step one.

Usage: python bench/bench_phenomenon.py [--epochs 30]
1. mnist1d, MLP, 2 bits, baseline QAT recorded every step: fraction of weights at their final level
   (and staying there) after 10% of training.
2. Replay of LTS (linear growth, warm-up 20%) on that run at per-step resolution vs at per-epoch
   resolution (records subsampled at epoch boundaries; EMA decay compounded between records).
3. Replay prediction on the baseline vs an actual LTS run of the same seed.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from lts_core.analysis.replay import agreement, replay_freeze_steps
from lts_core.analysis.settle import fraction_settled_curve
from lts_core.config import make_config
from lts_core.store import open_run
from lts_core.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--dataset", default="mnist1d")
    args = ap.parse_args()
    common = dict(model="mlp", dataset=args.dataset, bits=2, epochs=args.epochs, fp_epochs=20, device="cpu",
                  record_every=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        base_res = train(make_config(**common, rule="none"), run_dir=Path(tmp) / "base", progress=False)
        lts_res = train(make_config(**common, rule="lts", schedule="linear"), run_dir=Path(tmp) / "lts",
                        progress=False)
        base, lts = open_run(Path(tmp) / "base"), open_run(Path(tmp) / "lts")
        S, T = base.manifest["steps_per_epoch"], base.manifest["total_steps"]
        steps, levels, codes = base.steps, base.levels(), base.dist_codes()
        curve = fraction_settled_curve(levels)
        r10 = int(np.searchsorted(steps, int(0.1 * T)))
        print(f"## {args.dataset} MLP 2-bit, {args.epochs} QAT epochs × {S} steps, {base.n_weights} quantized weights")
        print(f"FP test acc {base_res.fp_test_acc:.1f}%, baseline QAT {base_res.metrics[-1]['test_acc']:.1f}%, "
              f"LTS {lts_res.metrics[-1]['test_acc']:.1f}% (updates eliminated "
              f"{lts_res.metrics[-1]['updates_eliminated']:.1%})")
        print(f"fraction at final level after 10% of training (step {steps[r10]}): {curve[r10]:.1%}")
        for pct in (25, 50):
            r = int(np.searchsorted(steps, int(pct / 100 * T)))
            print(f"fraction at final level after {pct}% of training: {curve[r]:.1%}")

        s = lts.manifest["rule"]["settings"]
        kw = dict(schedule="linear", ratio=1.0, warmup_steps=s["warmup_steps"], total_steps=T, decay=s["decay"],
                  layer_sizes=[la["numel"] for la in base.layers],
                  layer_n_levels=[la["n_levels"] for la in base.layers])
        per_step = replay_freeze_steps(steps, levels, None, raw_dists=base.raw_dists(), **kw)  # exact distances
        ep = np.unique(np.r_[np.arange(0, T, S), T - 1])
        per_epoch = replay_freeze_steps(steps[ep], levels[ep], codes[ep], **kw)  # the default cadence: codes
        ag = agreement(per_epoch, per_step)
        print(f"per-epoch vs per-step replay: jaccard {ag['jaccard']:.3f}, precision {ag['precision']:.3f}, "
              f"recall {ag['recall']:.3f}, mean |Δ freeze step| {ag['mean_abs_step_diff']:.1f} steps "
              f"({ag['mean_abs_step_diff'] / S:.2f} epochs)")
        ag2 = agreement(per_step, lts.freeze_steps())
        print(f"replay on baseline vs actual LTS run: jaccard {ag2['jaccard']:.3f}, precision "
              f"{ag2['precision']:.3f}, recall {ag2['recall']:.3f}, mean |Δ freeze step| "
              f"{ag2['mean_abs_step_diff']:.1f} steps")


if __name__ == "__main__":
    main()
