"""First views of big runs in a real browser (headless Chromium via Playwright): Settling and Threshold sweep.

For each run given (e.g. the synthetic 1M- and 10M-weight runs of `bench/synthetic_run.py`), a fresh
`streamlit run app/scratchoff_app.py` serves a runs folder holding a small run (`--warm-run`, a symbolic link)
and draws its Runs page, then the first views of Settling and Sweep on that small run (the server's own
start-up: imports, first script runs; and a control: the same pages on a run of a few thousand weights).
Then the big run appears in the folder and a new browser session opens /settling?run=<run>, then another
opens /sweep?run=<run>: a first view is the time from `page.goto` to every chart of the page
drawn and the script idle, on a server that never opened this run before. The server's peak resident memory (VmHWM
of the streamlit process, which counts the pages of memory-mapped files it touched) is read after both. Rounds
are interleaved (run A, run B, run A, …), a fresh server each. `--no-cache` deletes `<run>/cache/` first: the
first open of a run whose summaries were never computed (a run recorded before this version, or written by
hand). Then, on the last run, threshold moves on the Sweep page as `bench_browser.py` measures
them (a new ratio typed + Enter → the "Updates eliminated" metric changed).

`--script-only` times instead the server's share of those first views: each page's script run by Streamlit's
AppTest (no browser, no network), in a fresh process, on the small run first and then on the big one.

    python bench/bench_scale_browser.py --warm-run /work/bigruns/example-16k /work/bigruns/syn-1m \
        /work/bigruns/syn-10m [--rounds 3] [--no-cache]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import browser_util as B  # noqa: E402
from bench_browser import round_trips  # noqa: E402

CHARTS = {"settling": 3, "sweep": 4}   # charts each page draws without interaction


def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_page(browser, srv, page_name: str, run_id: str) -> tuple[float, int]:
    """Seconds from `page.goto` of the page's URL for `run_id` (a new browser context) to every chart of the
    page drawn and the script idle; and the number of error boxes shown."""
    page = B.new_page(browser)
    try:
        t0 = time.perf_counter()
        page.goto(f"{srv.url}/{page_name}?run={run_id}", wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length >= n",
                               arg=[B.DRAWN, CHARTS[page_name]], timeout=300_000)
        page.locator(B.SCRIPT_IDLE).wait_for(timeout=300_000)
        t = time.perf_counter() - t0
        errors = page.locator("[data-testid=stException], [data-testid=stAlertContentError]").count()
        B.screenshot(page, f"bench-scale-{page_name}-{run_id}")
        return t, errors
    finally:
        page.context.close()


def first_views(browser, run: Path, tmp: Path, warm_run: Path) -> dict:
    """A fresh server on a runs folder holding only `warm_run` (small): the Runs, Settling and Threshold sweep
    pages are drawn once (the server's own start-up: imports, first script runs). Then `run` appears in the
    folder, and new browser sessions open Settling, then Threshold sweep, by their URLs for that run:
    their first views of a run this server never opened."""
    runs_dir = tmp / f"runs-{run.name}-{time.monotonic_ns()}"
    runs_dir.mkdir()
    (runs_dir / warm_run.name).symlink_to(warm_run.resolve())
    srv = B.Server(runs_dir, tmp / "data").start()
    try:
        srv.wait_healthy(timeout=120)
        page = B.new_page(browser)
        try:
            page.goto(f"{srv.url}/", wait_until="domcontentloaded", timeout=120_000)
            page.locator("h1").first.wait_for(state="visible", timeout=120_000)
            page.locator(B.SCRIPT_IDLE).wait_for(timeout=120_000)
        finally:
            page.context.close()
        out = {"server_ready": time.perf_counter() - srv.started_at}
        for name in ("settling", "sweep"):      # the small run's first views: the control
            out[f"{name}_small"] = open_page(browser, srv, name, warm_run.name)[0]
        (runs_dir / run.name).symlink_to(run.resolve())
        time.sleep(6)   # the app's run list is cached for 5 s
        for name in ("settling", "sweep"):
            out[name], out[f"{name}_errors"] = open_page(browser, srv, name, run.name)
        out["hwm_mb"] = vm_hwm_mb(srv.proc.pid)
        return out
    finally:
        srv.stop()


SCRIPT = """
import os, sys, time
from pathlib import Path
from streamlit.testing.v1 import AppTest
app = Path(sys.argv[1]); sys.path.insert(0, str(app))
out = []
for page, run in [(p, r) for p in ("settling", "sweep") for r in sys.argv[2:4]]:
    at = AppTest.from_file(str(app / "app_pages" / f"{page}.py"), default_timeout=600)
    at.query_params["run"] = run
    t0 = time.perf_counter()
    at.run()
    out.append(f"{time.perf_counter() - t0:.3f}")
    assert not at.exception, at.exception
print(" ".join(out))
"""


def script_times(run: Path, tmp: Path, warm_run: Path) -> dict:
    """Seconds of the server's script alone (Streamlit's AppTest, no browser) for the first view of Settling
    and Threshold sweep: in a fresh process, each page is run on `warm_run` first (imports, the page's first
    run), then on `run` (this process never opened it)."""
    import os
    import subprocess
    runs_dir = tmp / f"script-{run.name}-{time.monotonic_ns()}"
    runs_dir.mkdir()
    for r in (warm_run, run):
        (runs_dir / r.name).symlink_to(r.resolve())
    app = Path(__file__).resolve().parents[1] / "app"
    env = dict(os.environ, SCRATCHOFF_RUNS=str(runs_dir), SCRATCHOFF_DATA=str(tmp / "data"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(app), warm_run.name, run.name], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"AppTest on {run} failed:\n{out.stderr[-3000:]}")
    t = [float(x) for x in out.stdout.split()[-4:]]
    return {"settling_small": t[0], "settling": t[1], "sweep_small": t[2], "sweep": t[3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--warm-run", type=Path, required=True, help="a small run the server opens first")
    ap.add_argument("--script-only", action="store_true",
                    help="only the server's script times (AppTest, no browser), interleaved rounds")
    args = ap.parse_args()
    if args.script_only:
        res: dict = {}
        with tempfile.TemporaryDirectory(prefix="scratchoff-bench-scale-") as tmp:
            for rnd in range(args.rounds):
                for run in args.runs:
                    r = script_times(run, Path(tmp), args.warm_run)
                    res.setdefault(run.name, []).append(r)
                    print(f"round {rnd + 1} {run.name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()),
                          flush=True)
        print(f"\n| run | Settling script, first view | same process, {args.warm_run.name} | Threshold sweep "
              f"script, first view | same process, {args.warm_run.name} |")
        print("|---|---|---|---|---|")
        for run, rs in res.items():
            def med(k):
                xs = [r[k] for r in rs]
                return f"{statistics.median(xs):.2f} s ({min(xs):.2f}–{max(xs):.2f})"
            print(f"| {run} | {med('settling')} | {med('settling_small')} | {med('sweep')} | {med('sweep_small')} |")
        return
    reason = B.browser_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    from playwright.sync_api import sync_playwright
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="scratchoff-bench-scale-") as tmp, sync_playwright() as pw:
        tmp = Path(tmp)
        browser = B.launch_browser(pw)
        try:
            for rnd in range(args.rounds):
                for run in args.runs:
                    if args.no_cache:
                        shutil.rmtree(run / "cache", ignore_errors=True)
                    r = first_views(browser, run, tmp, args.warm_run)
                    results.setdefault(run.name, []).append(r)
                    print(f"round {rnd + 1} {run.name}: server start → Runs page drawn {r['server_ready']:.2f} s; "
                          f"first view settling {r['settling']:.2f} s (small run {r['settling_small']:.2f} s), "
                          f"sweep {r['sweep']:.2f} s (small run {r['sweep_small']:.2f} s); server peak "
                          f"{r['hwm_mb']:.0f} MB; errors shown {r['settling_errors'] + r['sweep_errors']}",
                          flush=True)
            last = args.runs[-1]
            (tmp / "last").mkdir()
            (tmp / "last" / last.name).symlink_to(last.resolve())
            srv = B.Server(tmp / "last", tmp / "data").start()
            try:
                srv.wait_healthy(timeout=60)
                rt = round_trips(browser, srv, last.name, args.moves)
                hwm = vm_hwm_mb(srv.proc.pid)
            finally:
                srv.stop()
        finally:
            browser.close()
    print()
    print(f"| run | Settling first view | same server, {args.warm_run.name} | Threshold sweep first view | same "
          f"server, {args.warm_run.name} | server peak memory | (server start → Runs page drawn) |")
    print("|---|---|---|---|---|---|---|")
    for run, rs in results.items():
        def med(k):
            xs = [r[k] for r in rs]
            return f"{statistics.median(xs):.2f} s ({min(xs):.2f}–{max(xs):.2f})"
        print(f"| {run} | {med('settling')} | {med('settling_small')} | {med('sweep')} | {med('sweep_small')} | "
              f"{max(r['hwm_mb'] for r in rs):.0f} MB | {med('server_ready')} |")
    print(f"\nthreshold moves on {last.name}: Enter → metric changed median "
          f"{statistics.median(rt['metric']):.0f} ms (min {min(rt['metric']):.0f}, max {max(rt['metric']):.0f}, "
          f"n {len(rt['metric'])}); → rerun finished median {statistics.median(rt['rerun']):.0f} ms; server peak "
          f"{hwm:.0f} MB")


if __name__ == "__main__":
    main()
