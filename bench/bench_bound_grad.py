"""Accuracy and savings of LTS variants on the shipped datasets: per weight vs per channel (max or a quantile),
bounds learning from all weights (the reference) or only the active ones (what makes the saving real).

Usage: python bench/bench_bound_grad.py [--epochs 30] [--seeds 0] [--jobs 2] [--variants all|quantiles|NAMES]
                                       [--pairs all|model:dataset,…] [--out /tmp/bound_grad.jsonl]
Each configuration is a real training run through the trainer (default schedule: linear growth, ρ = 1,
warm-up 20 % of epochs; full-precision pre-training cached and shared by the variants of a seed). Results are
appended to --out as JSON lines (a rerun skips what is there) and printed as a Markdown table: final test
accuracy (mean over seeds), its difference to baseline QAT of the same seed (mean, and the worst seed's), updates
eliminated (over quantized weights),
backward FLOPs saved (accounted, as the paper counts) and the structurally skippable share. Wall-clock time is
not compared here (runs train side by side on a shared machine): bench_savings.py measures it interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PAIRS = [("mlp", "digits"), ("mlp", "mnist1d"), ("cnn1d", "mnist1d")]
VARIANTS = [  # name, config fields
    ("baseline QAT", dict(rule="none")),
    ("weight / all (paper)", dict(rule="lts")),
    ("weight / active", dict(rule="lts", bound_grad="active")),
    ("channel max / all", dict(rule="lts", granularity="channel", channel_quantile=1.0)),
    ("channel max / active", dict(rule="lts", granularity="channel", channel_quantile=1.0, bound_grad="active")),
    ("channel q0.9 / active", dict(rule="lts", granularity="channel", channel_quantile=0.9, bound_grad="active")),
    ("channel q0.75 / active", dict(rule="lts", granularity="channel", channel_quantile=0.75,
                                    bound_grad="active")),
    ("channel q0.5 / active", dict(rule="lts", granularity="channel", channel_quantile=0.5, bound_grad="active")),
    ("channel q0.25 / active", dict(rule="lts", granularity="channel", channel_quantile=0.25,
                                    bound_grad="active")),
    ("channel q0.1 / active", dict(rule="lts", granularity="channel", channel_quantile=0.1, bound_grad="active")),
]
# --variants quantiles: the channel statistic study (baseline and channel-LTS with `active` bounds at q = 0.1, 0.25,
# 0.5, 0.75 and 1, the maximum)
QUANTILE_STUDY = ("baseline QAT", "channel max / active", "channel q0.75 / active", "channel q0.5 / active",
                  "channel q0.25 / active", "channel q0.1 / active")


def run_one(job: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from lts_core.config import make_config
    from lts_core.trainer import train
    cfg = make_config(model=job["model"], dataset=job["dataset"], epochs=job["epochs"], seed=job["seed"],
                      device="cpu", record=False, **job["fields"])
    res = train(cfg, progress=False)
    last = res.metrics[-1]
    return {**{k: job[k] for k in ("model", "dataset", "seed", "variant")},
            "fp_acc": res.fp_test_acc, "acc": last["test_acc"],
            "updates_eliminated": last["updates_eliminated"],
            "updates_eliminated_all_params": last["updates_eliminated_all_params"],
            "backward_flops_saved": last["backward_flops_saved"],
            "backward_flops_skippable": last["backward_flops_skippable"],
            "backward_seconds": sum(m["backward_seconds"] for m in res.metrics),
            "step_seconds": sum(m["step_seconds"] for m in res.metrics)}


def table(rows: list[dict]) -> str:
    out = ["| model / dataset | variant | test acc (%) | Δ acc vs baseline | worst seed's Δ | updates elim. "
           "(quantized w.) | bwd FLOPs saved (accounted) | structurally skippable |",
           "|---|---|---|---|---|---|---|---|"]
    for model, dataset in PAIRS:
        for name, _ in VARIANTS:
            sel = [r for r in rows if (r["model"], r["dataset"], r["variant"]) == (model, dataset, name)]
            if not sel:
                continue
            accs, dacc = [], []
            for r in sel:
                base = [b for b in rows if (b["model"], b["dataset"], b["seed"], b["variant"]) ==
                        (model, dataset, r["seed"], "baseline QAT")]
                accs.append(r["acc"])
                if base:
                    dacc.append(r["acc"] - base[0]["acc"])
            mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
            f = lambda k: mean([r[k] for r in sel])
            out.append(f"| {model} / {dataset} | {name} | {mean(accs):.2f} | {mean(dacc):+.2f} | "
                       f"{min(dacc, default=float('nan')):+.2f} | "
                       f"{f('updates_eliminated'):.1%} | {f('backward_flops_saved'):.1%} | "
                       f"{f('backward_flops_skippable'):.1%} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--pairs", default="all", help="comma-separated model:dataset, or all")
    ap.add_argument("--variants", default="all", help="all, quantiles (the channel statistic study) or a "
                    "comma-separated list of variant names")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bound_grad.jsonl"))
    args = ap.parse_args()
    names = ([n for n, _ in VARIANTS] if args.variants == "all" else list(QUANTILE_STUDY)
             if args.variants == "quantiles" else [v.strip() for v in args.variants.split(",")])
    unknown = sorted(set(names) - {n for n, _ in VARIANTS})
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {[n for n, _ in VARIANTS]}")
    pairs = PAIRS if args.pairs == "all" else [tuple(p.split(":")) for p in args.pairs.split(",")]
    done = [json.loads(x) for x in args.out.read_text().splitlines()] if args.out.exists() else []
    have = {(r["model"], r["dataset"], r["seed"], r["variant"]) for r in done}
    jobs = [dict(model=m, dataset=d, seed=int(s), variant=name, fields=fields, epochs=args.epochs)
            for s in args.seeds.split(",") for m, d in pairs for name, fields in VARIANTS
            if name in names and (m, d, int(s), name) not in have]
    # the baselines first: each seed's FP checkpoint is trained once, before the variants that share it
    jobs.sort(key=lambda j: j["variant"] != "baseline QAT")
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run_one, jobs):
            done.append(row)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['model']}/{row['dataset']} s{row['seed']} {row['variant']}: acc {row['acc']:.2f}",
                  flush=True)
    print(f"epochs {args.epochs}, seeds {args.seeds}, CPU, os.cpu_count() = {os.cpu_count()}")
    print(table([r for r in done if r["variant"] in names]))


if __name__ == "__main__":
    main()
