"""Fidelity of the LTS rule and of its replay, and the headline figures with both denominators.

    python bench/bench_fidelity.py [--dataset digits] [--epochs 30] [--headline-only | --replay-only]
    python bench/bench_fidelity.py --recording-cost [--rounds 3] [--steps 100]

1. Reference traces (tests/data/reference_traces): share of weights whose freeze step equals the reference
   code's, in lock-step, for all six traces.
2. Self-replay on real runs recorded at every step (MLP, 2 bits, default settings), one per schedule: share of
   weights whose replayed freeze step equals the live rule's, exactly, (a) from the exact raw distances the run
   recorded, (b) from the uint8 distance codes alone (1/128 Δ), (c) from per-epoch records (codes, the default
   cadence; the decay compounds between records). Plus the bytes per weight per record of each cadence.
3. Headline table: digits and mnist1d, baseline QAT vs LTS (linear growth, the defaults), with "updates
   eliminated" over the quantized weights and over all trainable parameters (the paper's denominator).
4. (--recording-cost) What exact replays cost in time: the step with the recorder every step storing the
   distance codes only, and storing the exact raw distances too, over a plain step and over the LTS rule's step
   (bench_recording.py's 1M-weight model and loop, rounds interleaved A, B, C, A, B, C…, median per mode).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lts_core import LTSRule, quantize_model, quantized_layers  # noqa: E402
from lts_core.analysis.replay import agreement, replay_freeze_steps  # noqa: E402
from lts_core.config import make_config  # noqa: E402
from lts_core.store import open_run  # noqa: E402
from lts_core.trainer import train  # noqa: E402


def reference_traces() -> None:
    print("## 1. Reference traces, lock-step (freeze step equal to the reference's, share of weights)\n")
    print("| trace | layer 1 | layer 2 | EMA bit-identical after every step |")
    print("|---|---:|---:|---|")
    for path in sorted((ROOT / "tests" / "data" / "reference_traces").glob("lts_ref_*.npz")):
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        T, S, W, bits, m, fr = d["meta"]
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        quantize_model(model, bits=int(bits), first_last_bits=int(bits), output="unit")
        layers = [lay for _, lay in quantized_layers(model)]
        mode = str(d["mode"])
        rule = LTSRule(model, None, int(T * S), int(W * S), schedule=mode,
                       ratio=float(fr) if mode == "fixing" else None, decay=float(m))
        ema_equal = True
        for t in range(int(T * S)):
            with torch.no_grad():
                for k, lay in enumerate(layers, 1):
                    lay.weight.copy_(torch.from_numpy(d[f"l{k}_w"][t]))
                    lay.weight_quantizer.lower.fill_(float(d[f"l{k}_lw"][t]))
                    lay.weight_quantizer.upper.fill_(float(d[f"l{k}_uw"][t]))
            rule.step()
            if t >= 1:
                ema_equal &= all(torch.equal(rule.ema[k], torch.from_numpy(d[f"l{k + 1}_dist"][t])) for k in (0, 1))
        match = []
        for k in (1, 2):
            u = d[f"l{k}_unchange"].astype(np.int64)
            match.append(float((rule.freeze_step[k - 1].numpy() == np.where(u > 0, u, -1)).mean()))
        print(f"| {path.stem} | {match[0]:.2%} | {match[1]:.2%} | {'yes' if ema_equal else 'NO'} |")
    print()


def self_replay(dataset: str, epochs: int, tmp: Path) -> None:
    print(f"## 2. Self-replay of real LTS runs recorded every step ({dataset}, MLP, 2 bits, {epochs} epochs)\n")
    print("Share of all watched weights whose replayed freeze step equals the live rule's (never = never).\n")
    print("| schedule | ρ | frozen by the end | exact raw distances (every step) | uint8 codes (every step) | "
          "per-epoch records (codes) | mean \\|Δ step\\| per-epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    sizes = {}
    for schedule, ratio in (("fixed", 0.1), ("linear", 1.0), ("sine", 1.0)):
        cfg = make_config(model="mlp", dataset=dataset, bits=2, epochs=epochs, rule="lts", schedule=schedule,
                          threshold=ratio, record_every=1, device="cpu", seed=0)
        out = tmp / f"{dataset}-{schedule}"
        train(cfg, run_dir=out, progress=False)
        run = open_run(out)
        live = run.freeze_steps()
        s = run.manifest["rule"]["settings"]
        lay = {"layer_sizes": [la["numel"] for la in run.layers],
               "layer_n_levels": [la["n_levels"] for la in run.layers]}
        kw = dict(schedule=schedule, ratio=ratio, warmup_steps=s["warmup_steps"], total_steps=s["total_steps"],
                  decay=s["decay"], **lay)
        exact = replay_freeze_steps(run.steps, run.levels(), None, raw_dists=run.raw_dists(), **kw)
        codes = replay_freeze_steps(run.steps, run.levels(), run.dist_codes(), **kw)
        S = run.manifest["steps_per_epoch"]
        ep = np.unique(np.r_[np.arange(0, len(run.steps), S), len(run.steps) - 1])
        per_epoch = replay_freeze_steps(run.steps[ep], run.levels()[ep], run.dist_codes()[ep], **kw)
        a = [agreement(x, live) for x in (exact, codes, per_epoch)]
        print(f"| {schedule} | {ratio:g} | {(live >= 0).mean():.1%} | {a[0]['exact_match']:.2%} | "
              f"{a[1]['exact_match']:.2%} | {a[2]['exact_match']:.2%} | {a[2]['mean_abs_step_diff']:.1f} |")
        traj = run.path / "traj"
        n_rec, n_w = run.n_records, run.n_weights
        sizes = {"level + dist code": 2.0, "LTS EMA code": 1.0, "exact raw distance": 4.0,
                 "on disk (all arrays, levels as changes)":
                     sum(p.stat().st_size for p in traj.glob("*.npy")) / (n_rec * n_w)}
    print("\nBytes per watched weight per record (the last run): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()) + ".\n")


def headline(epochs: int, tmp: Path) -> None:
    print(f"## 3. Headline: MLP, 2 bits, {epochs} QAT epochs, seed 0 (updates eliminated both ways)\n")
    print("| dataset | run | test acc | Δ vs FP | updates eliminated, of quantized weights | "
          "of all trainable params (paper) | backward FLOPs saved (accounted) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dataset in ("digits", "mnist1d"):
        variants = [("baseline QAT", dict(rule="none")), ("LTS (linear, defaults)", dict(rule="lts"))]
        for label, extra in variants:
            cfg = make_config(model="mlp", dataset=dataset, bits=2, epochs=epochs, device="cpu", seed=0,
                              record=False, **extra)
            res = train(cfg, progress=False)
            last = res.metrics[-1]
            print(f"| {dataset} | {label} | {last['test_acc']:.2f}% | {last['test_acc'] - res.fp_test_acc:+.2f} | "
                  f"{last['updates_eliminated']:.1%} | {last['updates_eliminated_all_params']:.1%} | "
                  f"{last['backward_flops_saved']:.1%} |", flush=True)
    print()


def recording_cost(rounds: int, steps: int, tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_recording import time_mode
    modes = [("plain QAT step", None, None, False), ("+ rec every step, codes only", 1, None, False),
             ("+ rec every step, codes + exact raw distances", 1, None, True),
             ("LTS rule step", None, "lts", False), ("LTS + rec every step, codes only", 1, "lts", False),
             ("LTS + rec every step, codes + exact raw distances", 1, "lts", True)]
    time_mode("cpu", 20, 128, 5, tmp, None, None)  # process warm-up (allocator, threads)
    ms = {m[0]: [] for m in modes}
    for _ in range(rounds):
        for label, every, rule, raw in modes:
            ms[label].append(time_mode("cpu", steps, 128, 10, tmp, every, rule, True, "store", raw)["ms"])
    med = {k: float(np.median(v)) for k, v in ms.items()}
    print(f"## 4. Recording cost of exact replays (1M weights, batch 128, {steps} steps, median of {rounds} "
          "interleaved rounds)\n")
    print("| mode | ms/step | × same step without recording | × codes only |")
    print("|---|---:|---:|---:|")
    for label, every, rule, raw in modes:
        base = med["LTS rule step" if rule else "plain QAT step"]
        codes = med["LTS + rec every step, codes only" if rule else "+ rec every step, codes only"]
        print(f"| {label} | {med[label]:.2f} | {med[label] / base:.2f} | "
              f"{med[label] / codes:.2f} |" if every else f"| {label} | {med[label]:.2f} | – | – |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--headline-only", action="store_true")
    ap.add_argument("--replay-only", action="store_true")
    ap.add_argument("--recording-cost", action="store_true", help="only section 4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.recording_cost:
            recording_cost(args.rounds, args.steps, Path(tmp))
            return
        if not args.headline_only:
            reference_traces()
            self_replay(args.dataset, args.epochs, Path(tmp))
        if not args.replay_only:
            headline(args.epochs, Path(tmp))


if __name__ == "__main__":
    main()
