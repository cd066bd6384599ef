"""Regenerate the example runs shipped in data/runs/: digits and mnist1d MLPs at 2 bits, and an mnist1d CNN with
four quantized layers (conv1, conv2, conv3, fc: "which layer settles first?"), each as baseline and LTS.

Usage: python scripts/make_examples.py [--force] [--only NAME ...]
MLP width 128 keeps each MLP run around 1 MiB, the CNN at width 24 (5,976 weights) under; records once per epoch over
20 QAT epochs.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lts_core.config import make_config
from lts_core.datasets import data_dir
from lts_core.trainer import train

EXAMPLES = {
    "example-digits-mlp-2b-baseline": dict(dataset="digits", rule="none"),
    "example-digits-mlp-2b-lts": dict(dataset="digits", rule="lts", schedule="linear"),
    "example-mnist1d-mlp-2b-baseline": dict(dataset="mnist1d", rule="none"),
    "example-mnist1d-mlp-2b-lts": dict(dataset="mnist1d", rule="lts", schedule="linear"),
    # every layer quantized at 2 bits (first and last too): four layers of different sizes and roles
    "example-mnist1d-cnn1d-2b-baseline": dict(dataset="mnist1d", model="cnn1d", width=24, first_last_bits=2,
                                              rule="none"),
    "example-mnist1d-cnn1d-2b-lts": dict(dataset="mnist1d", model="cnn1d", width=24, first_last_bits=2,
                                         rule="lts", schedule="linear"),
}
COMMON = dict(model="mlp", width=128, bits=2, epochs=20, fp_epochs=20, seed=0, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true", help="replace existing example runs")
    ap.add_argument("--out", type=Path, default=data_dir() / "runs")
    ap.add_argument("--only", nargs="*", default=None, help="regenerate only these examples")
    args = ap.parse_args()
    for name, fields in EXAMPLES.items():
        if args.only and name not in args.only:
            continue
        run_dir = args.out / name
        if run_dir.exists():
            if not args.force:
                print(f"keep {run_dir} (use --force to regenerate)")
                continue
            shutil.rmtree(run_dir)
        res = train(make_config(**{**COMMON, **fields}), run_dir=run_dir, progress=True)
        last = res.metrics[-1]
        print(f"{name}: FP {res.fp_test_acc:.1f}% → QAT {last['test_acc']:.1f}%, "
              f"updates eliminated {last['updates_eliminated']:.0%} of quantized weights "
              f"({last['updates_eliminated_all_params']:.0%} of all trainable parameters)")


if __name__ == "__main__":
    main()
