"""Write a synthetic recorded run of any size through the public run-store API (`RunWriter`), for benchmarks.

The run looks like a baseline QAT run (rule none) recorded once per epoch: `--layers` quantized 2-bit layers
of about equal size, `--records` records `--steps-between` optimizer steps apart, 20% warm-up. Per weight the
level takes ±1 steps on 0..3 (10% of records) until a settle record drawn early-heavy (r = R·u², u uniform),
then stays; the distance code is uniform in 0..64 (≤ 0.5 Δ) while the weight moves and then drifts towards a
per-weight floor. Chunks hold as many records as the recorder would put in them (32 MiB of buffers, two
halves), so a 10M-weight run gets one record per chunk, as a real one would. Generation streams over column
blocks of the weights, so memory stays about 10 bytes per weight of one block plus one chunk.

    python bench/synthetic_run.py --weights 10000000 --records 100 --out /work/bigruns/syn-10m
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lts_core.store import RunWriter  # noqa: E402

CHUNK_BYTES = 32 << 20


def layer_sizes(n_weights: int, n_layers: int) -> list[int]:
    sizes = [n_weights // n_layers] * n_layers
    sizes[-1] += n_weights - sum(sizes)
    return sizes


def records_per_chunk(n_weights: int, n_layers: int, n_state: int = 0) -> int:
    """What `Recorder` would choose: two buffer halves of CHUNK_BYTES in all."""
    per_record = 8 + (2 + n_state) * n_weights + 8 * n_layers
    return max(1, CHUNK_BYTES // (2 * per_record))


def write_synthetic_run(out: str | Path, n_weights: int, n_records: int, n_layers: int = 20,
                        steps_between: int = 50, seed: int = 0, block: int = 1 << 24) -> Path:
    """Create the run folder `out` (must not exist or be empty) and return its path."""
    out = Path(out)
    sizes = layer_sizes(n_weights, n_layers)
    layers = [{"name": f"block{i}.conv", "shape": [n], "numel": n, "n_levels": 4, "bits": 2, "kind": "liq",
               "flops": int(n * 2 * 64)} for i, n in enumerate(sizes)]
    R, S = int(n_records), int(steps_between)
    T = R * S
    manifest = {
        "config": {"name": out.name, "model": "synthetic", "dataset": "synthetic", "bits": 2, "rule": "none",
                   "epochs": R, "seed": seed},
        "layers": layers, "steps_per_epoch": S, "total_steps": T, "record_every": S, "warmup_steps": T // 5,
        "rule": {"name": "none"}, "label": f"synthetic-{n_weights}x{R}", "status": "running",
    }
    writer = RunWriter.create(out.parent, out.name, manifest)
    k = records_per_chunk(n_weights, n_layers)
    # per-weight state, block by block of columns (one random stream per block: a run is reproducible for a
    # given seed and block size)
    n_blocks = -(-n_weights // block)
    states = []
    for bi in range(n_blocks):
        n = min(block, n_weights - bi * block)
        brng = np.random.default_rng([seed, bi])
        settle = (R * brng.random(n, dtype=np.float32) ** 2).astype(np.int32)
        states.append({"rng": brng, "settle": settle, "lv": brng.integers(0, 4, n, dtype=np.int16),
                       "dist": brng.integers(0, 65, n, dtype=np.int16),
                       "floor": brng.integers(0, 24, n, dtype=np.int16)})
    for a in range(0, R, k):
        r = min(k, R - a)
        level = np.empty((r, n_weights), np.uint8)
        dist = np.empty((r, n_weights), np.uint8)
        for i in range(r):
            rec = a + i
            for bi, s in enumerate(states):
                c0 = bi * block
                n = s["lv"].size
                g = s["rng"]
                moving = s["settle"] > rec
                u = g.integers(0, 20, n, dtype=np.uint8)
                step = (u == 1).astype(np.int16) - (u == 0)
                np.clip(s["lv"] + step * moving, 0, 3, out=s["lv"])
                fresh = g.integers(0, 65, n, dtype=np.int16)
                noise = g.integers(-2, 3, n, dtype=np.int16)
                drift = (7 * s["dist"] + 3 * s["floor"]) // 10 + noise
                s["dist"] = np.clip(np.where(moving, fresh, drift), 0, 64).astype(np.int16)
                level[i, c0:c0 + n] = s["lv"]
                dist[i, c0:c0 + n] = s["dist"]
        writer.append_chunk({"step": (np.arange(a, a + r) * S).astype(np.int64), "level": level, "dist": dist,
                             "bounds": np.tile(np.array([-1.0, 1.0], np.float32), (r, n_layers, 1))})
        del level, dist
    writer.update_manifest(n_records=R, steps_taken=T)
    writer.set_status("complete")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=int, required=True)
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--steps-between", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = write_synthetic_run(args.out, args.weights, args.records, args.layers, args.steps_between, args.seed)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"{path}: {args.weights:,} weights × {args.records} records, {size / 2**30:.2f} GiB, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
