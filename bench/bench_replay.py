"""Benchmark of the LTS replay: ReplayIndex build / query / heatmap against the direct replay.

Synthetic run: 1M weights in 20 layers × 100 records, 50 optimizer steps between records (one record per
epoch, 100 epochs, 20 warm-up epochs), 2-bit levels following random walks that settle progressively, distance
codes correlated with settling. Runs on 2 CPU threads (torch.set_num_threads(2)) unless --threads is given.

    /work/venv/bin/python bench/bench_replay.py [--weights 1000000] [--records 100] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lts_core.analysis import ReplayIndex, replay_freeze_steps, replay_oscillation  # noqa: E402


def synthetic_run(n_weights: int, n_records: int, seed: int = 0):
    """Levels: ±1 random walk on 0..3 until a per-weight settle record, constant after. Distance codes:
    uniform in [0, 64] (≤ 0.5 Δ) while moving, then drifting towards a small per-weight floor."""
    rng = np.random.default_rng(seed)
    settle = (n_records * rng.random(n_weights) ** 2).astype(np.int64)       # early settling is common
    levels = np.empty((n_records, n_weights), dtype=np.uint8)
    codes = np.empty((n_records, n_weights), dtype=np.uint8)
    lv = rng.integers(0, 4, size=n_weights).astype(np.int16)
    dist = rng.integers(0, 65, size=n_weights).astype(np.float32)
    floor = rng.integers(0, 24, size=n_weights).astype(np.float32)
    for r in range(n_records):
        moving = r < settle
        step = rng.integers(-1, 2, size=n_weights).astype(np.int16) * (rng.random(n_weights) < 0.3)
        lv = np.where(moving, np.clip(lv + step, 0, 3), lv)
        fresh = rng.integers(0, 65, size=n_weights).astype(np.float32)
        dist = np.where(moving, fresh, 0.7 * dist + 0.3 * floor + rng.normal(0, 2, n_weights).astype(np.float32))
        levels[r] = lv
        codes[r] = np.clip(np.rint(dist), 0, 64).astype(np.uint8)
    sizes = np.full(20, n_weights // 20)
    sizes[-1] += n_weights - sizes.sum()
    flops = rng.integers(10**6, 10**8, size=20)
    return levels, codes, sizes.tolist(), flops.tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=int, default=1_000_000)
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--steps-between", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--schedule", default="linear")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    R, N, S = args.records, args.weights, args.steps_between
    t0 = time.perf_counter()
    levels, codes, sizes, flops = synthetic_run(N, R)
    t_gen = time.perf_counter() - t0
    steps = np.arange(R, dtype=np.int64) * S
    T = R * S
    W = T // 5
    decay = 0.99
    common = dict(schedule=args.schedule, warmup_steps=W, total_steps=T, decay=decay)

    t0 = time.perf_counter()
    idx = ReplayIndex.build(steps, levels, codes, sizes, flops, device=args.device, steps_per_epoch=S, **common)
    t_build = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    ratios = rng.uniform(0.05, 1.5, size=20)
    lat = []
    for x in ratios:
        t0 = time.perf_counter()
        res = idx.query(float(x))
        lat.append(time.perf_counter() - t0)
    t_query = statistics.median(lat)

    heat_ratios = np.linspace(0.0, 2.0, 50)
    t0 = time.perf_counter()
    heat = idx.heatmap(heat_ratios)          # first call also sums the layers once (cached)
    t_heat_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx.heatmap(heat_ratios[::-1] * 0.7)
    t_heat = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep = idx.sweep()
    t_sweep = time.perf_counter() - t0

    ratio = 1.0
    t0 = time.perf_counter()
    fs = replay_freeze_steps(steps, levels, codes, ratio=ratio, device=args.device, **common)
    t_direct = time.perf_counter() - t0
    res = idx.query(ratio)
    direct_frac = ((fs[None] >= 0) & (fs[None] <= steps[:, None])).mean(1)
    consistent = bool(np.allclose(direct_frac, res.frozen_fraction, rtol=0, atol=1e-12))

    t0 = time.perf_counter()
    osc = replay_oscillation(steps, levels, T, device=args.device)
    t_osc = time.perf_counter() - t0

    print(f"\nReplay benchmark: {N:,} weights × {R} records ({S} steps between records, T = {T} steps, "
          f"W = {W}, schedule {args.schedule}, m = {decay}), device {args.device}, "
          f"{torch.get_num_threads()} torch threads; synthetic data generated in {t_gen:.1f} s\n")
    print("| operation | time | target |")
    print("|---|---|---|")
    print(f"| `ReplayIndex.build` (once) | {t_build:.2f} s | – |")
    print(f"| `index.query(ratio)` median of 20 ratios | {t_query * 1e3:.2f} ms | < 100 ms |")
    print(f"| `index.heatmap(50 ratios)` (first call / later) | {t_heat_cold * 1e3:.1f} ms / {t_heat * 1e3:.2f} ms"
          f" | < 1 s |")
    print(f"| `index.sweep()` (all {idx.max_bin + 1} grid ratios) | {t_sweep * 1e3:.1f} ms | – |")
    print(f"| `replay_freeze_steps` (one ratio, direct) | {t_direct:.2f} s | – |")
    print(f"| `replay_oscillation` | {t_osc:.2f} s | – |")
    print(f"\nindex memory {idx.nbytes / 2**20:.1f} MiB; query(1.0) == direct replay per record: {consistent}; "
          f"ratio 1.0 → updates eliminated {res.updates_eliminated:.3f}, backward FLOPs saved "
          f"{res.backward_flops_saved:.3f}, ticket precision {res.ticket_precision:.3f}, "
          f"final frozen {res.frozen_fraction[-1]:.3f}; osc frozen {np.mean(osc.freeze_steps >= 0):.3f}; "
          f"heatmap shape {heat.shape}; sweep max updates eliminated {np.nanmax(sweep['updates_eliminated']):.3f}")
    if not consistent:
        raise SystemExit("index and direct replay disagree")


if __name__ == "__main__":
    main()
