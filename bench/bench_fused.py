"""The per-step cost around the GEMMs, before and after the fused path (issue 10, item 5), on the CPU.

    python bench/bench_fused.py [--models mlp1m,mlp4m,resnet20] [--rounds 7] [--steps 5] [--threads 2]
                                [--compile] [--glibc-defaults]
    python bench/bench_fused.py --kernels [--compile] [--threads 1]     (single ops; compiled vs eager by size)
    python bench/bench_fused.py --profile mlp4m [--compile | --modes eager] [--threads 1]   (where LTS's time goes)

One process, batch 128, SGD (momentum 0.9, weight decay 1e-4) on every parameter. Per model it builds, from
the same seed, the variants

- `FP`: the float model;
- `QAT`: 2-bit learned-interval quantizer on the hidden layers (first and last stay float), no rule;
- `LTS`: QAT + `LTSRule` with a fixed ρ = 0.05 from step 0 (its costliest phase: the rule decides every step
  and a few weights freeze on most steps);
- (MLP 1M only) `QAT + rec`: QAT + a `Recorder` recording every step, distance codes only (the recorder's
  old every-step target, ≤ 1.15× QAT); `QAT + rec + raw`: the same storing the exact float32 raw distances too
  (the default when recording every step: exact replays); `LTS + rec + raw`: LTS + that recorder reading the
  rule's own measurement (what an exact-replay LTS run costs over LTS alone);

each in the modes **eager** (the fused path with its per-weight work as eager torch ops,
`fused.use_numba(False)`: the default before the numba loops), **numba** (the default: the rule's step, the
gradient mask, the restore and the recorder's encoding as numba loops, `lts_core.fused_cpu`), with `--unfused`
**unfused** (`fused.use_fused(False)`: autograd's chain for the quantizer and the rule's bool-masked
operations, the code path before the fused one) and with `--compile` **compiled** (`fused.use_compile(True)`;
kernels are compiled before timing). `--modes` picks any of them. Rounds interleave all
variants (A, B, C, … A, B, C, …); in a round each variant runs one untimed step and then `--steps` timed steps,
and its figure is the median of those. A ratio is taken inside each round (variant ÷ its denominator, both
measured seconds apart) and the table gives the median over rounds with the range, for wall-clock time and for
the process's CPU time (`time.process_time`: all its threads; on a machine shared with other jobs the CPU
time does not count the waits for a core, so it is the steadier figure of the work a step does).
`malloc.keep_freed_memory()` is applied first (as the CLI does) unless `--glibc-defaults`. On a machine shared
with other jobs run it with `OMP_WAIT_POLICY=passive` (as BENCHMARKS.md's figures were): with OpenMP's default
spin-waiting an idle thread keeps its core busy while the other jobs wait for it. Models: `mlp1m`
(the `mlp` model, width 1024, on mnist1d's 40 features: fc2 holds 1024·1024 quantized weights), `mlp4m`
(width 2048: 4.2M), `resnet20` (3×32×32 input, 0.27M quantized weights).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lts_core import LTSRule, Recorder, quantize_model  # noqa: E402
from lts_core.fused import use_compile, use_fused, use_numba  # noqa: E402
from lts_core.malloc import keep_freed_memory  # noqa: E402
from lts_core.models import build_model  # noqa: E402

MODELS = {"mlp1m": ("mlp", (40,), 1024), "mlp4m": ("mlp", (40,), 2048), "resnet20": ("resnet20", (3, 32, 32), None)}
RATIOS = [  # (label, numerator, denominator)
    ("QAT ÷ FP", "QAT", "FP"), ("LTS ÷ QAT", "LTS", "QAT"),
    ("QAT + rec every step (codes) ÷ QAT", "QAT + rec", "QAT"),
    ("QAT + rec every step (codes + raw) ÷ QAT", "QAT + rec + raw", "QAT"),
    ("QAT + rec (codes + raw) ÷ QAT + rec (codes)", "QAT + rec + raw", "QAT + rec"),
    ("LTS + rec every step (codes + raw) ÷ LTS", "LTS + rec + raw", "LTS")]
REC_KINDS = ["QAT + rec", "QAT + rec + raw", "LTS + rec + raw"]


def mode_context(mode: str) -> ExitStack:
    stack = ExitStack()
    stack.enter_context(use_fused(mode != "unfused"))
    stack.enter_context(use_compile(mode == "compiled"))
    stack.enter_context(use_numba(mode == "numba"))
    return stack


def make_step(arch: str, shape, width, kind: str, mode: str, batch: int, runs_dir: str):
    """A closure running one training step of variant `kind` ("FP", "QAT", "LTS" or one of `REC_KINDS`) in
    `mode`."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    with mode_context(mode):
        model = build_model(arch, shape, 10, **({} if width is None else {"width": width}))
        if kind != "FP":
            quantize_model(model, bits=2, example_input=x[:2])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        rule = LTSRule(model, opt, total_steps=10 ** 6, warmup_steps=0, schedule="fixed", ratio=0.05) \
            if kind.startswith("LTS") else None
        rec = Recorder.create(runs_dir, model, config={"name": f"bench-{kind}-{mode}"}, rule=rule, every=1,
                              steps_per_epoch=1000, raw_distances=kind.endswith("raw")) \
            if kind in REC_KINDS else None

    def step():
        with mode_context(mode):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if rule is not None:
                rule.step()
            if rec is not None:
                rec.step()
            opt.step()

    step.recorder = rec
    return step


def bench_model(name: str, modes: list[str], rounds: int, steps: int, batch: int, runs_dir: str) -> dict:
    arch, shape, width = MODELS[name]
    kinds = ["FP", "QAT", "LTS"] + (REC_KINDS if name == "mlp1m" else [])
    variants = {(kind, mode): make_step(arch, shape, width, kind, mode, batch, runs_dir)
                for kind in kinds for mode in (["numba"] if kind == "FP" else modes)}
    for step in variants.values():   # compile (and warm) everything before timing
        step()
        step()
    times = {key: [] for key in variants}
    cpu = {key: [] for key in variants}
    for _ in range(rounds):
        for key, step in variants.items():
            step()
            ts, cs = [], []
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
            times[key].append(statistics.median(ts))
            cpu[key].append(statistics.median(cs))
    for step in variants.values():
        if step.recorder is not None:
            step.recorder.finish()
    return {"times": times, "cpu": cpu, "kinds": kinds}


def ratio_cell(times: dict, num: tuple, den: tuple) -> str:
    per_round = [a / b for a, b in zip(times[num], times[den])]
    return f"{statistics.median(per_round):.2f} ({min(per_round):.2f}–{max(per_round):.2f})"


def kernels_table(rounds: int, compiled: bool) -> None:
    """Single ops on 1M float32 values (best of `rounds`, CPU time per call), and the compiled quantizer forward
    against the eager fused one by size: what the design choices rest on."""
    from lts_core import fused
    n = 1 << 20
    a, b = torch.randn(n), torch.randn(n)
    m = a > 1.0
    mf = m.float()
    out, outb = torch.empty(n), torch.empty(n, dtype=torch.bool)
    ops = {"mul (float32, out=)": lambda: torch.mul(a, 2.0, out=out),
           "lerp (float32 weight 0/1, out=)": lambda: torch.lerp(a, b, mf, out=out),
           "le → float32 (out=)": lambda: torch.le(a, 0.3, out=out),
           "le → bool (out=)": lambda: torch.le(a, 0.3, out=outb),
           "masked_fill_ (bool mask)": lambda: out.masked_fill_(m, 0.0),
           "where (bool mask, out=)": lambda: torch.where(m, a, b, out=out),
           "float32 → int16 → uint8": lambda: mf.to(torch.int16).to(torch.uint8),
           "float32 → uint8": lambda: mf.to(torch.uint8)}

    def best(fn, calls=10):
        fn()
        times = []
        for _ in range(rounds):
            c0 = time.process_time()
            for _ in range(calls):
                fn()
            times.append((time.process_time() - c0) / calls)
        return min(times) * 1e3

    print("| op on 1M float32 | ms (CPU time, best of rounds) |\n|---|---:|")
    for name, fn in ops.items():
        print(f"| {name} | {best(fn):.3f} |")
    big, big_out = torch.randn(4 * n), torch.empty(4 * n)
    print(f"| mul (float32, out=) on **4M** values (out of cache) | {best(lambda: torch.mul(big, 2.0, out=big_out)):.3f} |")
    numba_table(4 * n, best)
    if not compiled:
        return
    print("\n| weights | eager fused quantizer forward (µs) | compiled (µs) |\n|---:|---:|---:|")
    lo, up = torch.tensor(-1.0), torch.tensor(1.0)
    for size in (1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20):
        w = torch.randn(size)

        def eager():
            x = torch.sub(w, lo).div_(up - lo)
            xc = torch.clamp(x, 0, 1)
            fused.in_range_mask(x, xc)
            q = torch.div(xc.mul_(3).round_(), 3)
            return torch.mul(q, up - lo).add_(lo)

        k, n1 = fused.kernel("quant_fwd"), fused.const(3)
        print(f"| {size:,} | {best(eager, 50) * 1e3:.0f} | {best(lambda: k(w, lo, up - lo, n1), 50) * 1e3:.0f} |")


def numba_table(n: int, best) -> None:
    """The numba loops (`lts_core.fused_cpu`) on n weights (one call, the caller's thread: `run_split` is not used),
    beside the eager torch ops they replace."""
    import numpy as np
    from lts_core import fused_cpu as cpu
    from lts_core.distance import ema_update
    f = np.float32
    g = torch.Generator().manual_seed(0)
    w, grad, val = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    ema, prev = torch.rand(n, generator=g) * 0.3, torch.zeros(n)
    live = torch.rand(n, generator=g) > 0.12            # 12 % frozen, scattered
    live_f, frozen = live.float(), ~live
    fv, fs_f, fs = torch.zeros(n), torch.full((n,), -1.0), torch.full((n,), -1, dtype=torch.int64)
    chan, lv, cd = torch.zeros(n // 2048), torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    out, x, q, gw, t, gq = (torch.empty(n) for _ in range(6))
    lo, b = torch.tensor(-1.0), torch.tensor(2.0)
    scratch, changed = torch.empty(n), torch.empty(n)

    def eager_rule():   # the eager fused rule's ops for one layer (t ≥ 2, no freeze): measure, EMA, decide, mask
        xx = torch.sub(w, lo).div_(b)
        k = torch.clamp(xx, 0, 1).mul_(3).round_()
        r = torch.sub(xx, torch.div(k, 3)).abs_()
        torch.ne(k, prev, out=changed)
        ema_update(ema.clone(), r, changed, 0.99, 1 / 3, scratch=scratch)
        torch.le(ema, 0.01, out=scratch).mul_(live_f)
        grad.mul_(live_f)

    rows = {
        "LTS rule, one layer: eager fused ops (measure, EMA, decide, mask)": eager_rule,
        "LTS rule, one layer: `lts_step`": lambda: cpu.lts_step(
            0, n, w.numpy(), f(-1), f(2), f(3), 2, ema.numpy(), prev.numpy(), f(0.99), f(0.01), f(1 / 3),
            f(0.01), True, live.numpy(), frozen.numpy(), live_f.numpy(), fv.numpy(), fs_f.numpy(), fs.numpy(),
            9, f(9), chan.numpy(), 2048, grad.numpy(), True, cpu.empty_f32(), False, cpu.empty_i32(),
            cpu.empty_i64()),
        "restore: `torch.lerp` over the float32 live mask": lambda: torch.lerp(val, w, live_f, out=out),
        "restore: `restore`": lambda: cpu.restore(0, n, out.numpy(), val.numpy(), live.numpy()),
        "quantizer forward: `quant_fwd` (ŵ, x, q)": lambda: cpu.quant_fwd(
            0, n, w.numpy(), f(-1), f(2), f(3), False, out.numpy(), x.numpy(), q.numpy()),
        "quantizer backward: `quant_bwd` (g_w and the bounds' sum terms)": lambda: cpu.quant_bwd(
            0, n, grad.numpy(), x.numpy(), q.numpy(), f(2), f(2), True, gw.numpy(), t.numpy(), gq.numpy()),
        "recorder: `encode` (uint8 level and code)": lambda: cpu.encode(
            0, n, w.numpy(), f(-1), f(2), f(3), lv.numpy(), cd.numpy(), cpu.empty_f32(), False),
    }
    print(f"\n| on {n:,} weights, one thread (12 % frozen) | ms (CPU time, best of rounds) |\n|---|---:|")
    for name, fn in rows.items():
        print(f"| {name} | {best(fn, 5):.2f} |")


def profile_rule(name: str, mode: str, steps: int = 10) -> None:
    """Where the LTS variant's `rule.step()` and `optimizer.step()` (which restores frozen weights) spend their
    time, per op (torch.profiler over `steps` steps after 4 unprofiled ones), beside the CPU time of the step's
    parts."""
    from collections import Counter
    from torch.profiler import ProfilerActivity, profile
    arch, shape, width = MODELS[name]
    torch.manual_seed(0)
    x, y = torch.randn(128, *shape), torch.randint(0, 10, (128,))
    with mode_context(mode):
        model = build_model(arch, shape, 10, **({} if width is None else {"width": width}))
        quantize_model(model, bits=2, example_input=x[:2])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        rule = LTSRule(model, opt, total_steps=10 ** 6, warmup_steps=0, schedule="fixed", ratio=0.05)
        self_us, calls, parts = Counter(), Counter(), Counter()
        for s in range(4 + steps):
            c0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if s >= 4:
                parts["forward + backward"] += time.process_time() - c0
            n0 = rule.frozen_count()
            for part, fn in (("rule.step()", rule.step), ("optimizer.step() + restore", opt.step)):
                if s < 4:
                    fn()
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    c0 = time.process_time()
                    fn()
                    parts[part] += time.process_time() - c0
                for e in prof.key_averages():
                    self_us[(part, e.key)] += e.self_cpu_time_total
                    calls[(part, e.key)] += e.count
            if s >= 4:
                parts["steps with a freeze"] += rule.frozen_count() > n0
    print(f"{name}, LTS, mode {mode}, {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}; ms of CPU per step:\n")
    print(" · ".join(f"{k} {v / steps * 1e3:.1f}" for k, v in parts.items() if k != "steps with a freeze")
          + f" · steps with a freeze: {parts['steps with a freeze']} of {steps}\n")
    # the profiler's self times are wall-clock (on a shared machine they include waiting for a core): give each
    # op's share of its part and that share of the part's CPU time
    total = Counter()
    for (part, _), us in self_us.items():
        total[part] += us
    print("| part | op | share of the part's profiled time | ≈ CPU ms per step | calls per step |\n"
          "|---|---|---:|---:|---:|")
    for (part, key), us in sorted(self_us.items(), key=lambda kv: -kv[1])[:20]:
        share = us / total[part]
        print(f"| {part} | {key[:60]} | {share:.0%} | {share * parts[part] / steps * 1e3:.2f} | "
              f"{calls[(part, key)] / steps:.1f} |")


def split_setting() -> str:
    from lts_core import fused_cpu
    n = fused_cpu.SPLIT_MIN_NUMEL
    return "never" if n >= 1 << 62 else f"layers of ≥ {n:,} weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp1m,mlp4m,resnet20")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the compiled kernels (needs a C++ compiler)")
    ap.add_argument("--unfused", action="store_true", help="also time the unfused path (autograd's chain)")
    ap.add_argument("--modes", default=None, help="comma-separated modes (unfused, eager, numba, compiled)")
    ap.add_argument("--split-min", type=int, default=None, metavar="N",
                    help="numba mode: run layers of ≥ N weights as two halves on two threads (default "
                         "fused_cpu.SPLIT_MIN_NUMEL, 65536; 0 = never split)")
    ap.add_argument("--kernels", action="store_true",
                    help="instead: single ops on 1M values (bool-masked vs float kernels) and, with --compile, "
                         "the compiled quantizer forward against the eager one by layer size")
    ap.add_argument("--profile", metavar="MODEL", default=None,
                    help="instead: profile the LTS rule's step and the optimizer's restore on MODEL (mlp1m, …)")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave glibc malloc at its defaults (no `malloc.keep_freed_memory()`, as the CLI applies)")
    args = ap.parse_args()
    kept = False if args.glibc_defaults else keep_freed_memory()
    if args.split_min is not None:
        from lts_core import fused_cpu
        fused_cpu.SPLIT_MIN_NUMEL = args.split_min if args.split_min > 0 else 1 << 62
    torch.set_num_threads(args.threads)
    if args.profile:
        profile_rule(args.profile, "compiled" if args.compile else (args.modes or "numba").split(",")[0])
        return
    if args.kernels:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
        kernels_table(args.rounds, args.compile)
        return
    modes = args.modes.split(",") if args.modes else (
        (["unfused"] if args.unfused else []) + ["eager", "numba"] + (["compiled"] if args.compile else []))
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), batch {args.batch}, {args.rounds} rounds "
          f"× {args.steps} steps, malloc.keep_freed_memory: {kept}, two-thread split: {split_setting()}, "
          f"load average at start "
          f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}\n", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        for name in args.models.split(","):
            results[name] = bench_model(name, modes, args.rounds, args.steps, args.batch, tmp)
            print(f"{name} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print("\nms per step (median over rounds of the per-round median), wall-clock / CPU time:\n")
    print("| model | variant | " + " | ".join(modes) + " |")
    print("|---|---|" + "---:|" * len(modes))
    for name, r in results.items():
        for kind in r["kinds"]:
            cells = [f"{statistics.median(r['times'][(kind, m)]) * 1e3:.1f} / "
                     f"{statistics.median(r['cpu'][(kind, m)]) * 1e3:.1f}" if (kind, m) in r["times"] else "–"
                     for m in modes]
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    for clock, label in (("times", "wall-clock"), ("cpu", "CPU time")):
        print(f"\nratios, {label} (median over rounds, range):\n")
        print("| model | ratio | " + " | ".join(modes) + " |")
        print("|---|---|" + "---:|" * len(modes))
        for name, r in results.items():
            for lab, num, den in RATIOS:
                if (num, modes[-1]) not in r[clock]:
                    continue
                cells = [ratio_cell(r[clock], (num, m), (den, "numba" if den == "FP" else m)) for m in modes]
                print(f"| {name} | {lab} | " + " | ".join(cells) + " |")
    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}")


if __name__ == "__main__":
    main()
