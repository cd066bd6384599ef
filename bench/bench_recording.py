"""Overhead of recording trajectories: a QAT step without a recorder vs with `rec.step()` every step and once
per epoch, on a synthetic MLP of ~1M 2-bit quantized weights (`--width W`: W² weights; 3200 gives 10.24M) (in
one process, CPU by default).

    python bench/bench_recording.py [--steps 200] [--batch 128] [--device cpu] [--every 50] [--width 1024]

Prints a markdown table: ms per step (best of --repeats; includes chunk flushes amortised), ratios to the
plain step and to the same rule without recorder, time spent inside rec.step() alone (robust to other load
on the machine), records written and bytes on disk.

A control row times the plain QAT step while *another process* writes to disk, with O_DIRECT and almost
no CPU of its own, as many bytes per step as every-step recording wrote. On a virtual machine whose disk
is emulated on the host's cores, that slowdown is the price of the bytes alone, whoever writes them.

Two what-if rows take the recorder's pieces apart: chunks discarded instead of written (the cost of
measuring and buffering alone), and distances stored as losslessly compressed step-to-step differences
(zstd level 1 if the optional `zstandard` package is installed, else zlib level 1): does spending CPU on
compression buy back more than the bytes it saves?

    python bench/bench_recording.py --batch-sweep 64,128,256,512 --no-rule

prints instead the every-step overhead at several batch sizes: the recorder's work per step depends on the
number of weights only, the step's on the batch too.

    python bench/bench_recording.py --per-epoch --width 3200 --steps 100

prints only the once-per-epoch rows (plain, + record every `--every` steps, LTS, LTS + record), for big
models where every-step recording is not the question.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lts_core.layers import quantize_model, quantized_layers  # noqa: E402
from lts_core.recorder import Recorder  # noqa: E402
from lts_core.store import RunError  # noqa: E402


def build(device: str, seed: int = 0, width: int = 1024) -> nn.Module:
    torch.manual_seed(seed)
    # first and last layers stay full precision (quantize_model's default); the two hidden ones hold
    # W·W/2 + W/2·W = W² quantized weights (1,048,576 at the default W = 1024).
    W, H = int(width), int(width) // 2
    model = nn.Sequential(nn.Linear(128, W), nn.ReLU(), nn.Linear(W, H), nn.ReLU(),
                          nn.Linear(H, W), nn.ReLU(), nn.Linear(W, 10)).to(device)
    quantize_model(model, bits=2, example_input=torch.randn(2, 128, device=device))
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def distance_codec():
    """(name, compress) of the fastest lossless codec at hand: zstd level 1 when the optional `zstandard`
    package is installed, else the standard library's zlib level 1."""
    try:
        import zstandard
        return "zstd-1", zstandard.ZstdCompressor(level=1).compress
    except ImportError:
        import zlib
        return "zlib-1", lambda b: zlib.compress(b, 1)


def divert_chunks(rec: Recorder, chunks: str) -> None:
    """What-if variants of the record writer, for the bench only. "discard": records are dropped (the cost of
    measuring and buffering alone). "compress": the distance rows are stored as their step-to-step
    differences (uint8, wrapping), losslessly compressed, appended to a side file as records come; the other
    arrays go to the store as usual."""
    store_append = rec._append
    if chunks != "store":  # what-if runs are timed, never read: skip the per-weight summaries at finish
        rec._write_summaries = lambda: None
    if chunks == "discard":
        rec._append = lambda buf, n, seal: None
    elif chunks == "compress":
        _, compress = distance_codec()
        state = {"done": 0, "file": None}

        def append(buf, n, seal):
            dist = buf["dist"]
            start = state["done"]
            diff = dist[start:n].copy()
            if start:
                np.subtract(dist[start:n], dist[start - 1:n - 1], out=diff)
            if state["file"] is None:
                state["file"] = open(rec.path / "traj" / f"side-{rec._sealed:06d}.dist-compressed", "ab")
            state["file"].write(compress(diff.tobytes()))
            state["file"].flush()
            state["done"] = 0 if seal else n
            if seal:
                state["file"].close()
                state["file"] = None
            store_append({k: v for k, v in buf.items() if k != "dist"}, n, seal)
        rec._append = append


def time_mode(device: str, steps: int, batch: int, warmup: int, runs_dir: Path | None, every: int | None,
              rule_name: str | None, background: bool = True, chunks: str = "store", raw: bool = False,
              width: int = 1024) -> dict:
    model = build(device, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    total = warmup + steps
    rule = None
    if rule_name == "lts":
        from lts_core.rules import LTSRule
        rule = LTSRule(model, opt, total_steps=total, warmup_steps=total // 2, ratio=0.3)
    rec = None
    if every is not None:
        rec = Recorder.create(runs_dir, model, {"bench": True}, rule=rule, every=every, steps_per_epoch=every,
                              total_steps=total, background=background, raw_distances=raw)
        divert_chunks(rec, chunks)
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = torch.randn(8, batch, 128, generator=g).to(device)
    ys = torch.randint(0, 10, (8, batch), generator=g).to(device)
    rec_s, timed_records = 0.0, 0
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
                timed_records += rec.step()
                rec_s += time.perf_counter() - r0
            else:
                rec.step()
        opt.step()
    sync(device)
    elapsed = time.perf_counter() - t0
    out = {"ms": 1000 * elapsed / steps, "rec_ms": 1000 * rec_s / steps, "records": 0, "bytes": 0,
           "timed_records": timed_records}
    if rec is not None:
        try:
            rec.finish()
        except RunError:
            if chunks != "compress":  # that what-if's run keeps no 'dist' array, so it does not read back
                raise
        out["records"] = rec.n_written
        out["bytes"] = sum(p.stat().st_size for p in rec.path.rglob("*") if p.is_file())
        out["traj_bytes"] = sum(p.stat().st_size for p in (rec.path / "traj").glob("*") if p.is_file())
        out["chunk_records"] = rec.chunk_records
    return out


def write_load(mb_per_s: float, seconds: float, folder: str) -> None:
    """Write `mb_per_s` MB per second to `folder` for `seconds`, in 8 MB O_DIRECT files (fsynced), as the
    recorder's background writer does."""
    from lts_core.npy_direct import aligned_empty, write_npy_direct
    buf = aligned_empty(8 << 20, np.uint8)
    buf[:] = 7
    t0 = time.perf_counter()
    written = 0
    while (now := time.perf_counter()) - t0 < seconds:
        due = mb_per_s * (now - t0) * 2**20
        if written < due:
            path = Path(folder) / f"load{written // buf.nbytes % 4}.npy"
            if not write_npy_direct(path, buf):
                np.save(path, buf)
            written += buf.nbytes
        else:
            time.sleep(0.002)


def time_plain_under_write_load(device: str, steps: int, batch: int, warmup: int, mb_per_step: float,
                                ms_per_step: float, folder: Path, width: int = 1024) -> float:
    """ms per plain QAT step while another process writes `mb_per_step` per `ms_per_step`."""
    seconds = (warmup + steps) * ms_per_step / 1000 * 3 + 5
    load = subprocess.Popen([sys.executable, __file__, "--write-load", str(mb_per_step / ms_per_step * 1000),
                             str(seconds), str(folder)])
    try:
        time.sleep(0.5)
        return time_mode(device, steps, batch, warmup, None, None, None, width=width)["ms"]
    finally:
        load.kill()
        load.wait()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--write-load":  # the control's writer process
        write_load(float(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--every", type=int, default=50, help="'once per epoch' cadence")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    ap.add_argument("--no-rule", action="store_true", help="skip the LTS-rule rows")
    ap.add_argument("--width", type=int, default=1024, help="hidden width W: W² quantized weights")
    ap.add_argument("--per-epoch", action="store_true", help="only the once-per-epoch rows")
    ap.add_argument("--runs-dir", default=None, help="where to write the bench runs (default: a temp dir)")

    ap.add_argument("--batch-sweep", default=None, metavar="B1,B2,...",
                    help="instead of the table: plain vs every-step recording at each of these batch sizes")
    ap.add_argument("--path", choices=("fused", "unfused", "compiled"), default="fused",
                    help="the quantizer / rule / recorder code path (lts_core.fused): the default fused one, the "
                         "unfused reference (`use_fused(False)`), or the compiled kernels (`set_compile(True)`)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="apply lts_core.malloc.keep_freed_memory() first, as `python -m lts_core train` does")
    args = ap.parse_args()
    from lts_core.fused import set_compile, set_fused
    set_fused(args.path != "unfused")
    set_compile(args.path == "compiled")
    if args.keep_freed_memory:
        from lts_core.malloc import keep_freed_memory
        keep_freed_memory()

    n_q = sum(m.weight.numel() for _, m in quantized_layers(build("cpu", width=args.width)))
    print(f"\n{n_q:,} quantized 2-bit weights, {args.steps} timed steps, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.path} path"
          f"{', keep_freed_memory' if args.keep_freed_memory else ''}, load average {os.getloadavg()[0]:.1f}\n")
    tmp = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="bench-rec-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        time_mode(args.device, 20, args.batch, 5, tmp, None, None, width=args.width)  # process warm-up
        if args.path == "compiled":   # compile every kernel before anything is timed
            for every, rule, raw in ((1, None, False), (1, None, True), (1, "lts", True), (3, "lts", False)):
                time_mode(args.device, 6, args.batch, 2, tmp, every, rule, raw=raw, width=args.width)
        if args.per_epoch:
            per_epoch_table(args, tmp)
        elif args.batch_sweep:
            batch_sweep(args, [int(b) for b in args.batch_sweep.split(",")], tmp)
        else:
            overhead_table(args, tmp)
    finally:
        if not args.runs_dir:
            shutil.rmtree(tmp, ignore_errors=True)


def best_of(args, modes, tmp: Path, batch: int, results: dict) -> None:
    """One round over `modes` (label, every, rule, background, chunks[, raw]), keeping each one's best time."""
    for label, every, rule, background, chunks, *raw in modes:
        r = time_mode(args.device, args.steps, batch, args.warmup, tmp, every, rule, background, chunks, *raw,
                      width=args.width)
        best = results.setdefault(label, r)
        best["ms"] = min(best["ms"], r["ms"])  # best of N: other load on the machine only adds
        best["rec_ms"] = min(best["rec_ms"], r["rec_ms"])


def overhead_table(args, tmp: Path) -> None:
    codec, _ = distance_codec()
    modes = [("plain QAT step", None, None, True, "store"), ("+ rec.step() every step", 1, None, True, "store"),
             ("+ rec.step() every step, synchronous writes", 1, None, False, "store"),
             (f"+ rec.step() every {args.every} steps", args.every, None, True, "store"),
             ("*what-if:* every step, chunks discarded (measuring and buffering only)", 1, None, True, "discard"),
             (f"*what-if:* every step, distances stored as {codec}-compressed step differences", 1, None, True,
              "compress"),
             ("+ rec.step() every step with exact raw distances (+4 B/weight, the default every step)", 1, None,
              True, "store", True)]
    if not args.no_rule:
        modes += [("LTS rule", None, "lts", True, "store"), ("LTS rule + rec every step", 1, "lts", True, "store"),
                  ("LTS rule + rec every step with exact raw distances", 1, "lts", True, "store", True),
                  (f"LTS rule + rec every {args.every}", args.every, "lts", True, "store")]
    results = {}
    control = "*control:* plain QAT step, another process writing as many bytes"
    for _ in range(args.repeats):  # interleave repeats so drifts hit every mode alike
        best_of(args, modes, tmp, args.batch, results)
        every_step = results["+ rec.step() every step"]
        mb_per_step = every_step["bytes"] / 2**20 / every_step["records"]
        ms = time_plain_under_write_load(args.device, args.steps, args.batch, args.warmup, mb_per_step,
                                         results["plain QAT step"]["ms"], tmp, args.width)
        r = results.setdefault(control, {"ms": ms, "rec_ms": 0.0, "records": 0, "bytes": every_step["bytes"]})
        r["ms"] = min(r["ms"], ms)

    base = results["plain QAT step"]["ms"]
    rule_base = results.get("LTS rule", {}).get("ms")
    print(f"batch {args.batch}\n")
    print("| mode | ms/step | × plain | × same rule, no rec | in rec.step() ms/step | records | MB on disk |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, every, rule, *_ in modes[:7] + [(control, None, None)] + modes[7:]:
        r = results[label]
        same = (rule_base if rule else base)
        print(f"| {label} | {r['ms']:.2f} | {r['ms'] / base:.2f} | {r['ms'] / same:.2f} | {r['rec_ms']:.2f} | "
              f"{r['records']} | {r['bytes'] / 2**20:.1f} |")


def per_epoch_table(args, tmp: Path) -> None:
    """Plain QAT and LTS steps, each without and with one record every `--every` steps; rounds interleaved.
    Every row's ratio, and the per-round ratios, compare it with the same rule's step without a recorder. The
    timed window also holds the run's last step, which is always recorded: one record more than once per
    `--every` steps, so the ratio errs high."""
    modes = [("plain QAT step", None, None, True, "store"),
             (f"+ rec.step() every {args.every} steps", args.every, None, True, "store")]
    if not args.no_rule:
        modes += [("LTS rule", None, "lts", True, "store"),
                  (f"LTS rule + rec every {args.every}", args.every, "lts", True, "store")]
    results, rounds = {}, []
    for _ in range(args.repeats):
        before = {}
        for label, every, rule, background, chunks in modes:
            r = time_mode(args.device, args.steps, args.batch, args.warmup, tmp, every, rule, background, chunks,
                          width=args.width)
            before[label] = r
            best = results.setdefault(label, dict(r))
            best["ms"], best["rec_ms"] = min(best["ms"], r["ms"]), min(best["rec_ms"], r["rec_ms"])
        rounds.append(before)
    labels = [m[0] for m in modes]
    print(f"batch {args.batch}; best of {args.repeats} interleaved rounds\n")
    print("| mode | ms/step | × same rule, no rec | per round | in rec.step() ms per record | records | "
          "MB per record (traj/) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for i, label in enumerate(labels):
        r = results[label]
        base = labels[i - 1] if modes[i][1] is not None else label
        per_round = ", ".join(f"{x[label]['ms'] / x[base]['ms']:.3f}" for x in rounds)
        per_rec = r["rec_ms"] * args.steps / r["timed_records"] if r["timed_records"] else 0.0
        mb = r["traj_bytes"] / 2**20 / r["records"] if r["records"] else 0.0
        print(f"| {label} | {r['ms']:.2f} | {r['ms'] / results[base]['ms']:.3f} | {per_round} | {per_rec:.1f} | "
              f"{r['timed_records']} in {args.steps} timed steps | {mb:.1f} |")


def batch_sweep(args, batches: list[int], tmp: Path) -> None:
    """Recording costs about the same per step at any batch size; the step itself grows with the batch.
    The overhead ratio therefore falls as the step does more work per weight."""
    print("| batch | plain ms/step | every step ms/step | × plain | in rec.step() ms/step |")
    print("|---:|---:|---:|---:|---:|")
    for batch in batches:
        results = {}
        modes = [("plain", None, None, True, "store"), ("every", 1, None, True, "store")]
        for _ in range(args.repeats):
            best_of(args, modes, tmp, batch, results)
        p, e = results["plain"], results["every"]
        print(f"| {batch} | {p['ms']:.2f} | {e['ms']:.2f} | {e['ms'] / p['ms']:.2f} | {e['rec_ms']:.2f} |",
              flush=True)

if __name__ == "__main__":
    main()
