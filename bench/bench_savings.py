"""Measured savings of frozen channels: backward and step wall-clock of LTS variants ÷ baseline QAT, on CPU.

Usage: python bench/bench_savings.py [--model resnet20|mlp1m|all|convgrad] [--epochs 30] [--rounds 5] [--steps 4]
                                     [--states 5] [--weight-states 3] [--work DIR] [--threads 2]
                                     [--quantiles 0.25[,q…]] [--variants all|channel|weight] [--seeds 0[,s…]]
                                     [--model partial]

`--work DIR` keeps the real runs (one pickle per model, epochs and variant) and a later call with the same DIR
loads them instead of training: a re-measure then costs only the timing part. `--quantiles` lists the channel
statistics measured (one channel-LTS variant per q; default: the library's default), `--variants` restricts
the table to the channel or the per-weight variants, `--seeds 0,1,2` trains more seeds for the accuracy column
(the first seed's runs give the timed states). `--model partial` times ResNet-20 with the same share of every
layer's filters frozen, the planned backward before and after `channel_grad.conv_gather_pays` (see
`partial_freezing_costs`).

Two parts, one process:
1. **Real runs** (default settings: 2 bits, linear growth ρ = 1, warm-up 20 %, EMA 0.99, 30 QAT epochs after
   20 full-precision ones) give the frozen state each epoch ends in and the test accuracy: ResNet-20 on the
   shipped `digits` seen as 1×8×8 images (`resnet_digits_run`: the trainer's loop written out, since the
   trainer feeds digits flat) and a 1M-weight MLP (`mlp`, width 1024: its fc2 holds 1024·1024 quantized weights;
   first and last layers full precision) on `mnist1d` through the trainer; for baseline QAT, channel-LTS with
   `bound_grad="active"` at each `--quantiles` q, per-weight LTS (the paper, `all`) and per-weight LTS with
   `active`. The quantized layers of ResNet-20 have the same shapes at 8×8 and 32×32 (the first convolution,
   whose input differs, stays full precision).
2. **Timing** at the timing shape (ResNet-20: batch 128 of 3×32×32, CIFAR's; the MLP: batch 128 of mnist1d's
   40 features): a fresh model of the variant is put into the frozen state of a run's epoch
   (`rule.freeze_weights`, the same masks per layer; ResNet-20's quantized layers have the same shapes at
   8×8 and 32×32), then rounds alternate baseline, variant, baseline, variant … (`--rounds`), each the median
   of `--steps` full steps (zero_grad, forward, backward, rule.step, optimizer steps; the backward timed
   separately). The ratio at that state is median(variant) ÷ median(baseline) over the rounds, for wall-clock
   and for the process's CPU time (`time.process_time`: on a machine shared with other processes the CPU time
   a step consumes moves far less with the load than its wall-clock does; with `--threads 1` it is the work).
   `--states` epochs are measured (`--weight-states` for per-weight freezing, whose skippable share hardly moves:
   spread over its frozen fraction instead), chosen to span the run's structurally skippable share; every other epoch
   takes the ratio interpolated linearly in that share between the measured ones (nothing frozen = the first
   state). **Whole-run ratio** = mean over epochs of the per-epoch ratio (every epoch has the same number of
   steps and the baseline's step cost does not change over the run), i.e. Σ_e t_variant(e) ÷ Σ_e t_base.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lts_core import LTSRule, open_run, quantize_model
from lts_core.channels import DEFAULT_CHANNEL_QUANTILE, check_quantile
from lts_core.config import make_config
from lts_core.layers import quantized_layers
from lts_core.models import build_model
from lts_core.trainer import train

WEIGHT_VARIANTS = {  # name → (TrainConfig fields, LTSRule keyword arguments)
    "weight / all (paper)": (dict(), dict()),
    "weight / active": (dict(bound_grad="active"), dict(bound_grad="active")),
}


def channel_variant(q: float) -> tuple[str, tuple[dict, dict]]:
    """Channel-LTS with `active` bounds and channel statistic q (the q-quantile of the channel's EMA distances)."""
    kw = dict(granularity="channel", bound_grad="active", channel_quantile=q)
    return f"channel q{q:g} / active", (kw, kw)


def variants(quantiles: list[float], which: str = "all") -> dict:
    """The variants measured: channel-LTS at each quantile, then (unless which == "channel") per weight."""
    out = dict(channel_variant(q) for q in quantiles) if which in ("all", "channel") else {}
    return out | (WEIGHT_VARIANTS if which in ("all", "weight") else {})
MODELS = {  # name → (train config, timing input shape, model width)
    "resnet20": (None, (3, 32, 32), None),    # trained on digits as 1×8×8 images: resnet_digits_run
    "mlp1m": (dict(model="mlp", dataset="mnist1d", width=1024), (40,), 1024),
}


def _record(acc, rule, layers, spe, epochs, metrics) -> dict:
    """What the timing part needs from a real run (per-weight freeze steps per quantized layer, …)."""
    return {"acc": acc, "spe": spe, "epochs": epochs, "layers": layers, **metrics,
            "freeze_steps": None if rule is None else [f.numpy().copy() for f in rule.freeze_step]}


def resnet_digits_run(rule_kw: dict | None, epochs: int, seed: int = 0) -> dict:
    """ResNet-20 on digits seen as 1×8×8 images (a shipped dataset; the trainer feeds digits flat, so this is
    the trainer's loop, written out: same defaults: FP pre-training 20 epochs SGD 0.1 cosine, then QAT at 2 bits,
    SGD 0.05 momentum 0.9 wd 1e-4 cosine, Adam 1e-3 for the bounds, batch 128, warm-up 20 %, linear ρ = 1)."""
    from lts_core.datasets import load_dataset
    from lts_core.trainer import batches, epoch_order, evaluate, lr_factor, steps_per_epoch
    data = load_dataset("digits", seed=seed)
    xtr, xte = data.x_train.reshape(-1, 1, 8, 8), data.x_test.reshape(-1, 1, 8, 8)
    n, bs = len(xtr), 128
    spe = steps_per_epoch(n, bs)
    torch.manual_seed(seed)
    model = build_model("resnet20", (1, 8, 8), 10)

    def run_epochs(opts, n_epochs, lr0, phase, rule=None, bopt=None):
        t, total = 0, spe * n_epochs
        for epoch in range(n_epochs):
            for idx in batches(epoch_order(n, seed, epoch, phase), bs):
                for g in opts.param_groups:
                    g["lr"] = lr0 * lr_factor("cosine", t, total)
                opts.zero_grad(set_to_none=True)
                if bopt is not None:
                    bopt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xtr[idx]), data.y_train[idx]).backward()
                if rule is not None:
                    rule.step()
                opts.step()
                if bopt is not None:
                    bopt.step()
                t += 1

    model.train()
    run_epochs(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), 20, 0.1, "fp")
    quantize_model(model, bits=2, example_input=xte[:2])
    model.train()
    wparams = [p for n_, p in model.named_parameters() if "quantizer" not in n_]
    bparams = [p for n_, p in model.named_parameters() if "quantizer" in n_]
    opt = torch.optim.SGD(wparams, lr=0.05, momentum=0.9, weight_decay=1e-4)
    bopt = torch.optim.Adam(bparams, lr=1e-3)
    rule = None if rule_kw is None else LTSRule(model, opt, spe * epochs, warmup_steps=round(0.2 * epochs * spe),
                                                schedule="linear", **rule_kw)
    run_epochs(opt, epochs, 0.05, "qat", rule, bopt)
    acc = evaluate(model, xte, data.y_test, torch.device("cpu"))
    layers = [(list(m.weight.shape), int(m.flops)) for _, m in quantized_layers(model)]
    metrics = {} if rule is None else {"updates_eliminated": rule.updates_eliminated(),
                                       "backward_flops_saved": rule.backward_flops_saved(),
                                       "backward_flops_skippable": rule.backward_flops_skippable()}
    return _record(acc, rule, layers, spe, epochs, metrics)


def trainer_run(model: str, fields: dict, rule: str, epochs: int, run_dir: Path, seed: int = 0) -> dict:
    """A real run through the trainer (recorded in `run_dir`, reused when there)."""
    base = dict(MODELS[model][0], epochs=epochs, device="cpu", bits=2, seed=seed)
    if not (run_dir / "manifest.json").exists():
        train(make_config(**base, rule=rule, **fields), run_dir=run_dir, progress=False)
    run = open_run(run_dir)
    last = run.metrics.iloc[-1]
    layers = [(list(lay["shape"]), int(lay["flops"])) for lay in run.layers]
    out = _record(float(last["test_acc"]), None, layers, int(run.manifest["steps_per_epoch"]), epochs,
                  {k: float(last[k]) for k in ("updates_eliminated", "backward_flops_saved",
                                               "backward_flops_skippable")})
    if rule != "none":
        fs, off, parts = run.freeze_steps(), 0, []
        for shape, _ in layers:
            k = int(np.prod(shape))
            parts.append(fs[off:off + k])
            off += k
        out["freeze_steps"] = parts
    return out


def real_runs(model: str, epochs: int, work: Path, measured: dict, seed: int = 0) -> dict:
    """Baseline and each variant of `measured` trained for real with `seed`: {name: record} (+ 'baseline QAT');
    cached in `work` (a later run with the same --work loads them instead of training)."""
    import pickle
    out = {}
    for name, (fields, rule_kw) in [("baseline QAT", ({}, None))] + list(measured.items()):
        cache = work / f"{model}-{epochs}-s{seed}-{name.replace(' ', '_').replace('/', '-')}.pkl"
        if cache.exists():
            out[name] = pickle.loads(cache.read_bytes())
            print(f"  {model} seed {seed} {name}: acc {out[name]['acc']:.2f} (run loaded from {work})", flush=True)
            continue
        t0 = time.perf_counter()
        if model == "resnet20":
            rec = resnet_digits_run(rule_kw, epochs, seed)
        else:
            rec = trainer_run(model, fields, "none" if rule_kw is None else "lts", epochs,
                              work / f"{model}-{epochs}-s{seed}-{name.split()[0]}-{fields.get('bound_grad', 'all')}"
                                     f"-q{fields.get('channel_quantile', 'x')}", seed)
        cache.write_bytes(pickle.dumps(rec))
        print(f"  trained {model} seed {seed} {name} in {time.perf_counter() - t0:.0f} s: acc {rec['acc']:.2f}",
              flush=True)
        out[name] = rec
    return out


def epoch_states(rec: dict) -> list[list[np.ndarray]]:
    """Per epoch e = 1 … E: per quantized layer, the bool mask of weights frozen by the end of epoch e."""
    S, E = rec["spe"], rec["epochs"]
    return [[((f >= 0) & (f < e * S)).reshape(shape) for f, (shape, _) in zip(rec["freeze_steps"], rec["layers"])]
            for e in range(1, E + 1)]


def skippable_share(masks, flops) -> float:
    """Σ_l c_l·F_l / (2·Σ F): the structurally skippable share of backward FLOPs of a frozen state."""
    tot = sum(flops)
    return sum(m.reshape(m.shape[0], -1).all(axis=1).mean() * f for m, f in zip(masks, flops)) / (2 * tot)


def make_step(model_name: str, shape, width, rule_kw: dict | None, masks=None, batch: int = 128):
    """A closure running one training step, returning (step seconds, backward seconds) of wall-clock, then the
    same two of the process's CPU time (`time.process_time`, all its threads)."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    kw = {} if width is None else {"width": width}
    arch = "resnet20" if model_name == "resnet20" else "mlp"
    model = quantize_model(build_model(arch, shape, 10, **kw), bits=2, example_input=x[:2])
    wparams = [p for n, p in model.named_parameters() if "quantizer" not in n]
    bparams = [p for n, p in model.named_parameters() if "quantizer" in n]
    opt = torch.optim.SGD(wparams, lr=0.01, momentum=0.9, weight_decay=1e-4)
    bopt = torch.optim.Adam(bparams, lr=1e-4)
    rule = None
    if rule_kw is not None:   # fixed ρ = 0: the decision runs every step and freezes nothing new
        rule = LTSRule(model, opt, total_steps=10 ** 6, warmup_steps=0, schedule="fixed", ratio=0.0, **rule_kw)
        names = [n for n, _ in quantized_layers(model)]
        assert names == rule.layer_names
        for i, m in enumerate(masks):
            rule.freeze_weights(i, torch.from_numpy(np.ascontiguousarray(m)))

    def step():
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        bopt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        b0, cb0 = time.perf_counter(), time.process_time()
        loss.backward()
        b1, cb1 = time.perf_counter(), time.process_time()
        if rule is not None:
            rule.step()
        opt.step()
        bopt.step()
        return time.perf_counter() - t0, b1 - b0, time.process_time() - c0, cb1 - cb0
    for _ in range(2):   # warm-up (allocator, the rule's EMA start)
        step()
    return step


MEASURES = ("step", "backward", "cpu step", "cpu backward")   # what a step returns, in that order


def measure_group(base_step, var_steps: dict, rounds: int, steps: int) -> dict:
    """Interleaved rounds (baseline, each variant, baseline, each variant …), each the median of `steps` steps;
    returns per variant and measure the variant ÷ baseline ratio of the medians over the rounds, and per
    variant 'base <measure>' (seconds)."""
    fns = {"base": base_step, **var_steps}
    times = {name: {k: [] for k in MEASURES} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ts = [fn() for _ in range(steps)]
            for i, k in enumerate(MEASURES):
                times[name][k].append(statistics.median(t[i] for t in ts))
    base = {k: statistics.median(times["base"][k]) for k in MEASURES}
    return {name: {**{k: statistics.median(times[name][k]) / base[k] for k in MEASURES},
                   **{f"base {k}": base[k] for k in MEASURES}} for name in var_steps}


def measure_pair(base_step, var_step, rounds: int, steps: int) -> dict:
    """`measure_group` of one variant: interleaved baseline, variant, baseline, variant …"""
    return measure_group(base_step, {"variant": var_step}, rounds, steps)["variant"]


def with_conv_block(step, block: int | None):
    """`step` run with `channel_grad.CONV_CHANNEL_BLOCK = block` (1: gather the active filters whenever one is
    frozen, the planned backward before the block rule; None: by device, the default)."""
    from lts_core import channel_grad

    def run():
        previous, channel_grad.CONV_CHANNEL_BLOCK = channel_grad.CONV_CHANNEL_BLOCK, block
        try:
            return step()
        finally:
            channel_grad.CONV_CHANNEL_BLOCK = previous
    return run


def partial_freezing_costs(rounds: int, steps: int) -> list[str]:
    """ResNet-20 (batch 128, 3×32×32) with the same filters of every quantized layer frozen, channel-LTS with
    `active` bounds: the step with the planned backward gathering the active filters whenever one is frozen
    (the behaviour before `conv_gather_pays`) and as it is now (gathering only when a whole block of filters
    drops out, else dense autograd's single call with the frozen filters zeroed), both ÷ baseline QAT,
    interleaved (baseline, before, now …); wall-clock and CPU time."""
    shapes = [tuple(m.weight.shape) for _, m in quantized_layers(
        quantize_model(build_model("resnet20", (3, 32, 32), 10), bits=2))]
    kw = dict(granularity="channel", bound_grad="active")
    base = make_step("resnet20", (3, 32, 32), None, None)
    lines = ["| filters frozen in every quantized layer | before: backward / step (wall · CPU) | now: backward / "
             "step (wall · CPU) |", "|---|---|---|"]
    for label, n_frozen in (("one", lambda c: 1), ("a quarter", lambda c: c // 4), ("half", lambda c: c // 2),
                            ("all but one", lambda c: c - 1)):
        masks = []
        for s in shapes:
            m = np.zeros(s, dtype=bool)
            m[:n_frozen(s[0])] = True
            masks.append(m)
        var = make_step("resnet20", (3, 32, 32), None, kw, masks)
        res = measure_group(base, {"before": with_conv_block(var, 1), "now": with_conv_block(var, None)},
                            rounds, steps)
        cell = lambda r: (f"{r['backward']:.2f} / {r['step']:.2f} · {r['cpu backward']:.2f} / "
                          f"{r['cpu step']:.2f}")
        lines.append(f"| {label} | {cell(res['before'])} | {cell(res['now'])} |")
        print(lines[-1], f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return lines


def pick_states(shares: list[float], k: int) -> list[int]:
    """Epoch indices spanning `shares` (a per-epoch measure of the frozen state): the first epoch, the last,
    and k−2 between at even steps of it (no duplicates)."""
    order = [0, len(shares) - 1]
    targets = np.linspace(min(shares), max(shares), k)[1:-1]
    for t in targets:
        order.append(int(np.argmin([abs(s - t) for s in shares])))
    return sorted(set(order))


def bench_model(model_name: str, args) -> list[str]:
    work = args.work
    measured = variants(args.quantiles, args.variants)
    runs = real_runs(model_name, args.epochs, work, measured)     # seed 0: accuracy and the timed states
    # more seeds: accuracy only, Δ against the baseline of the same seed
    deltas = {name: [runs[name]["acc"] - runs["baseline QAT"]["acc"]] for name in measured}
    for seed in args.seeds[1:]:
        more = real_runs(model_name, args.epochs, work, measured, seed)
        for name in measured:
            deltas[name].append(more[name]["acc"] - more["baseline QAT"]["acc"])
    _, shape, width = MODELS[model_name]
    base_acc = runs["baseline QAT"]["acc"]
    base_step = make_step(model_name, shape, width, None)
    lines = []
    for name, (_, rule_kw) in measured.items():
        rec = runs[name]
        acc = rec["acc"]
        states = epoch_states(rec)
        flops = [f for _, f in rec["layers"]]
        shares = [skippable_share(m, flops) for m in states]
        frozen = [float(np.mean(np.concatenate([m.ravel() for m in ms]))) for ms in states]
        # states are spread over (and interpolated in) the skippable share; where it hardly moves
        # (per-weight freezing) over the frozen fraction
        xvar = shares if max(shares) - min(shares) > 0.01 else frozen
        print(f"  {model_name} {name}: skippable share by epoch " + " ".join(f"{x:.0%}" for x in shares), flush=True)
        picked = pick_states(xvar, args.states if name.startswith("channel") else args.weight_states)
        meas = {}
        for e in picked:
            var_step = make_step(model_name, shape, width, rule_kw, states[e])
            meas[e] = measure_pair(base_step, var_step, args.rounds, args.steps)
            print(f"  {model_name} {name} epoch {e + 1}: frozen {frozen[e]:.1%}, skippable {shares[e]:.1%}, "
                  f"ratios wall step {meas[e]['step']:.3f} backward {meas[e]['backward']:.3f}, CPU step "
                  f"{meas[e]['cpu step']:.3f} backward {meas[e]['cpu backward']:.3f} (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        xs = np.array([xvar[e] for e in picked])
        order = np.argsort(xs, kind="stable")
        xs = xs[order]
        saved = {k: 1 - float(np.mean(np.interp(xvar, xs, np.array([meas[e][k] for e in picked])[order])))
                 for k in MEASURES}
        more = "" if len(deltas[name]) == 1 else \
            f"; {len(deltas[name])} seeds: mean {np.mean(deltas[name]):+.2f}, worst {min(deltas[name]):+.2f}"
        lines.append(f"| {model_name} | {name} | {acc:.2f} ({acc - base_acc:+.2f}{more}) | "
                     f"{rec['updates_eliminated']:.1%} | {rec['backward_flops_saved']:.1%} | "
                     f"{rec['backward_flops_skippable']:.1%} | "
                     f"{saved['backward']:.1%} / {saved['cpu backward']:.1%} | "
                     f"{saved['step']:.1%} / {saved['cpu step']:.1%} | "
                     + ", ".join(f"e{e + 1}: {meas[e]['backward']:.2f}/{meas[e]['step']:.2f} · "
                                 f"{meas[e]['cpu backward']:.2f}/{meas[e]['cpu step']:.2f}" for e in picked) + " |")
    b = meas[picked[0]]
    lines.append(f"| {model_name} | baseline QAT | {base_acc:.2f} | – | – | – | – | – | "
                 f"wall: step {b['base step'] * 1e3:.0f} ms, backward {b['base backward'] * 1e3:.0f} ms · CPU: "
                 f"step {b['base cpu step'] * 1e3:.0f} ms, backward {b['base cpu backward'] * 1e3:.0f} ms |")
    return lines


def conv_weight_grad_costs(rounds: int = 7) -> list[str]:
    """Why partly frozen convolutions save little: one ResNet-20-sized convolution (batch 128, 3×3, stride 1):
    dense autograd's single call (input and weight gradient), the input gradient alone, and the weight gradient
    alone of all filters and of the first k (`channel_grad.conv_weight_grad_active`), in process CPU time;
    interleaved rounds, medians; ratios over the weight gradient of all filters."""
    from lts_core.channel_grad import ConvSpec, conv_weight_grad_active
    spec, cb = ConvSpec((1, 1), (1, 1), (1, 1), 1), torch.ops.aten.convolution_backward
    lines = ["| filters × input size | input + weight, one call | input gradient | weight gradient, all filters | "
             "all but one | three quarters | half | a quarter | one |", "|---|---|---|---|---|---|---|---|---|"]
    for c, h in ((16, 32), (32, 16), (64, 8)):
        torch.manual_seed(0)
        x, w, g = torch.randn(128, c, h, h), torch.randn(c, c, 3, 3), torch.randn(128, c, h, h)
        args = (None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        fns = {"both": lambda: cb(g, x, w, *args, (True, True, False)),
               "input": lambda: cb(g, x, w, *args, (True, False, False)),
               "all": lambda: cb(g, x, w, *args, (False, True, False))}
        ks = {"all but one": c - 1, "three quarters": 3 * c // 4, "half": c // 2, "a quarter": c // 4, "one": 1}
        for name, k in ks.items():
            fns[name] = (lambda a=torch.arange(k): conv_weight_grad_active(x, g, w, spec, a))
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                c0 = time.process_time()
                fn()
                times[k].append(time.process_time() - c0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        lines.append(f"| {c} × {h}×{h} | {med['both']:.1f} ms | {med['input']:.1f} ms | {med['all']:.1f} ms | "
                     + " | ".join(f"{med[n] / med['all']:.2f}" for n in ks) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all", choices=["all", "convgrad", "partial", *MODELS],
                    help="convgrad: only the cost of one convolution's weight gradient, all vs half its filters; "
                         "partial: ResNet-20 with the same share of every layer's filters frozen, the planned "
                         "backward before and after the block rule")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--states", type=int, default=5, help="epochs measured for channel freezing")
    ap.add_argument("--weight-states", type=int, default=3, help="epochs measured for per-weight freezing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the real runs (kept; reused if there)")
    ap.add_argument("--quantiles", default=str(DEFAULT_CHANNEL_QUANTILE),
                    help="channel statistics measured, comma-separated (1 = max); default: the library's default")
    ap.add_argument("--variants", default="all", choices=["all", "channel", "weight"],
                    help="channel: only channel-LTS at --quantiles; weight: only the per-weight variants")
    ap.add_argument("--seeds", default="0", help="seeds trained, comma-separated: the first gives the timed "
                    "states, the others only accuracy (Δ vs the baseline of the same seed)")
    args = ap.parse_args()
    try:
        args.quantiles = [check_quantile(float(q)) for q in args.quantiles.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        ap.error(f"--quantiles/--seeds: {e}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    if args.model in ("convgrad", "partial"):
        lines = conv_weight_grad_costs(args.rounds) if args.model == "convgrad" else \
            partial_freezing_costs(args.rounds, args.steps)
        print("\n".join(lines))
        print(f"{args.threads} threads, CPU time, load average {load[0]:.1f} / {os.getloadavg()[0]:.1f}")
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="bench_savings_"))
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in (MODELS if args.model == "all" else [args.model]):
        rows += bench_model(m, args)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, epochs {args.epochs}, rounds {args.rounds} × "
          f"{args.steps} steps, load average at start {load[0]:.1f} / end {os.getloadavg()[0]:.1f}")
    print("| model | variant | test acc (Δ vs baseline) | updates elim. (quantized w.) | bwd FLOPs saved "
          "(accounted) | structurally skippable | whole-run backward time saved (wall / CPU) | whole-run step "
          "time saved (wall / CPU) | measured backward/step ratio at epochs (wall · CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
