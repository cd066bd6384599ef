"""Overhead of recording trajectories: a QAT step without a recorder vs with `rec.step()` every step and once
per epoch, on a synthetic MLP of ~1M 2-bit quantized weights (in one process, CPU by default).

    python bench/bench_recording.py [--steps 200] [--batch 128] [--device cpu] [--every 50]

Prints a markdown table: ms per step (best of --repeats; includes chunk flushes amortised), ratios to the
plain step and to the same rule without recorder, time spent inside rec.step() alone (robust to other load
on the machine), records written and bytes on disk.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lts_core.layers import quantize_model, quantized_layers  # noqa: E402
from lts_core.recorder import Recorder  # noqa: E402


def build(device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # first and last layers stay full precision (quantize_model's default); the two hidden ones hold
    # 1024·512 + 512·1024 = 1,048,576 quantized weights.
    model = nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                          nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(device)
    quantize_model(model, bits=2, example_input=torch.randn(2, 128, device=device))
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_mode(device: str, steps: int, batch: int, warmup: int, runs_dir: Path | None, every: int | None,
              rule_name: str | None, background: bool = True) -> dict:
    model = build(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    total = warmup + steps
    rule = None
    if rule_name == "lts":
        from lts_core.rules import LTSRule
        rule = LTSRule(model, opt, total_steps=total, warmup_steps=total // 2, ratio=0.3)
    rec = None
    if every is not None:
        rec = Recorder.create(runs_dir, model, {"bench": True}, rule=rule, every=every, steps_per_epoch=every,
                              total_steps=total, background=background)
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = torch.randn(8, batch, 128, generator=g).to(device)
    ys = torch.randint(0, 10, (8, batch), generator=g).to(device)
    rec_s = 0.0
    for t in range(total):
        if t == warmup:
            sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xs[t % 8]), ys[t % 8])
        loss.backward()
        if rule is not None:
            rule.step()
        if rec is not None:
            if t >= warmup:
                sync(device)  # on CUDA, charge only the recorder's own work to it
                r0 = time.perf_counter()
                rec.step()
                rec_s += time.perf_counter() - r0
            else:
                rec.step()
        opt.step()
    sync(device)
    elapsed = time.perf_counter() - t0
    out = {"ms": 1000 * elapsed / steps, "rec_ms": 1000 * rec_s / steps, "records": 0, "bytes": 0}
    if rec is not None:
        rec.finish()
        out["records"] = rec.n_written
        out["bytes"] = sum(p.stat().st_size for p in rec.path.rglob("*") if p.is_file())
        out["chunk_records"] = rec.chunk_records
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--every", type=int, default=50, help="'once per epoch' cadence")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    ap.add_argument("--no-rule", action="store_true", help="skip the LTS-rule rows")
    ap.add_argument("--runs-dir", default=None, help="where to write the bench runs (default: a temp dir)")
    args = ap.parse_args()

    n_q = sum(m.weight.numel() for _, m in quantized_layers(build("cpu")))
    modes = [("plain QAT step", None, None, True), ("+ rec.step() every step", 1, None, True),
             ("+ rec.step() every step, synchronous writes", 1, None, False),
             (f"+ rec.step() every {args.every} steps", args.every, None, True)]
    if not args.no_rule:
        modes += [("LTS rule", None, "lts", True), ("LTS rule + rec every step", 1, "lts", True),
                  (f"LTS rule + rec every {args.every}", args.every, "lts", True)]
    tmp = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="bench-rec-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        time_mode(args.device, 20, args.batch, 5, tmp, None, None)  # process warm-up (allocator, threads)
        results = {}
        for _ in range(args.repeats):  # interleave repeats so drifts hit every mode alike
            for label, every, rule, background in modes:
                r = time_mode(args.device, args.steps, args.batch, args.warmup, tmp, every, rule, background)
                best = results.setdefault(label, r)
                best["ms"] = min(best["ms"], r["ms"])  # best of N: other load on the machine only adds
                best["rec_ms"] = min(best["rec_ms"], r["rec_ms"])
    finally:
        if not args.runs_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    base = results["plain QAT step"]["ms"]
    rule_base = results.get("LTS rule", {}).get("ms")
    print(f"\n{n_q:,} quantized 2-bit weights, batch {args.batch}, {args.steps} timed steps, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| mode | ms/step | × plain | × same rule, no rec | in rec.step() ms/step | records | MB on disk |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, every, rule, _ in modes:
        r = results[label]
        same = (rule_base if rule else base)
        print(f"| {label} | {r['ms']:.2f} | {r['ms'] / base:.2f} | {r['ms'] / same:.2f} | {r['rec_ms']:.2f} | {r['records']} | "
              f"{r['bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
