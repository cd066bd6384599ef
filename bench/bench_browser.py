"""Benchmark of the scratchoff app in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

(a) cold start: time from launching `streamlit run app/scratchoff_app.py` to the first chart visible on
    the default page (Runs), a fresh server each repetition; broken down into launch → /_stcore/health ok and
    page load → chart.
(b) threshold round trip on the Threshold sweep page, on the largest run of the runs folder: time from the Enter
    key that commits a typed ρ to the "Updates eliminated" metric showing a new value, measured inside the
    browser (keydown listener + MutationObserver, performance.now()), and to the end of the rerun.
(c) distributions view on a synthetic LTS-like run of `--weights` weights in one layer × `--records` records
    (EMA, side and freeze steps recorded; written once under --big-dir through the public RunWriter, then its
    first view's counts kept in its cache as the recorder keeps them at finish): on a fresh server, the Runs page
    loaded, time from the click on "Distributions" in the navigation to every chart drawn (script idle): the
    first time (the counts read from the run's cache; with --no-cache, the one pass over the run) and again
    (cached on the server); and a fresh browser page opening the view's URL.
(d) record move on that view: arrow key on the record slider → the "Frozen" metric changed / the rerun (a
    fragment) finished.

Runs (a) and (b) over a temporary copy of the shipped example runs (data/runs/example-*), or --runs DIR.

    python bench/bench_browser.py [--starts 3] [--moves 10] [--weights 1000000] [--records 100] [--no-cache]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import browser_util as B  # noqa: E402

# In-page probe: a key in `keys` stamps t0 and the metric text; the first DOM mutation that changes the metric
# text stamps t1; the script state returning to notRunning after that stamps t2.
PROBE = """
([label, keys]) => {
  const metricText = () => {
    for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
      const l = m.querySelector('[data-testid="stMetricLabel"]');
      if (l && l.innerText.trim().startsWith(label)) {
        const v = m.querySelector('[data-testid="stMetricValue"]');
        return v ? v.innerText.trim() : null;
      }
    }
    return null;
  };
  const app = document.querySelector('[data-testid="stApp"]');
  window.__rt = {t0: null, t1: null, t2: null, before: null, after: null};
  document.addEventListener('keydown', (e) => {
    if (!keys.includes(e.key)) return;
    window.__rt = {t0: performance.now(), t1: null, t2: null, before: metricText(), after: null};
  }, true);
  new MutationObserver(() => {
    const r = window.__rt;
    if (r.t0 === null) return;
    if (r.t1 === null) {
      const v = metricText();
      if (v !== null && v !== r.before) { r.t1 = performance.now(); r.after = v; }
    }
    if (r.t1 !== null && r.t2 === null && app.getAttribute('data-test-script-state') === 'notRunning') {
      r.t2 = performance.now();
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true,
                             attributeFilter: ['data-test-script-state']});
}
"""


def median_row(name: str, xs: list[float], unit: str, target: str, fmt: str = "{:.2f}") -> str:
    if not xs:
        return f"| {name} | — | — | — | 0 | {target} |"
    return (f"| {name} | {fmt.format(statistics.median(xs))} {unit} | {fmt.format(min(xs))} {unit} | "
            f"{fmt.format(max(xs))} {unit} | {len(xs)} | {target} |")


def largest_run(runs_dir: Path) -> tuple[str, int]:
    best = ("", -1)
    for m in sorted(runs_dir.glob("*/manifest.json")):
        try:
            man = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if man.get("status") != "complete":
            continue
        n = int(man.get("n_weights") or 0)
        if n > best[1]:
            best = (m.parent.name, n)
    if best[1] < 0:
        raise SystemExit(f"no complete run in {runs_dir}")
    return best


# ---- the synthetic LTS run for (c) and (d) -----------------------------------------------------------------
def write_lts_run(out: Path, n: int, R: int, spe: int = 10, seed: int = 0) -> Path:
    """An LTS-like run of one 2-bit layer of `n` weights × `R` records (level, distance, EMA, side, bounds,
    freeze steps), written through the public RunWriter: positions relax towards per-weight targets while the
    learned bounds drift, weights freeze under a linear-growth threshold on their EMA."""
    from lts_core.store import RunWriter

    rng = np.random.default_rng(seed)
    L, W, T = 4, 2 * spe, R * spe
    w = rng.normal(0, 1, n).astype(np.float32)
    target = rng.normal(0, 1, n).astype(np.float32)
    ema = np.ones(n, np.float32)
    fs = np.full(n, -1, np.int64)
    side = int(np.sqrt(n))
    writer = RunWriter.create(out.parent, out.name, {
        "config": {"model": "synthetic", "dataset": "synthetic", "bits": 2, "rule": "lts", "schedule": "linear",
                   "epochs": R, "seed": seed},
        "layers": [{"name": "fc", "shape": [side, n // side] if side * (n // side) == n else [n], "numel": n,
                    "n_levels": L, "bits": 2, "flops": 2 * n, "kind": "liq"}],
        "steps_per_epoch": spe, "total_steps": T, "record_every": spe, "warmup_steps": W,
        "rule": {"name": "lts", "settings": {"schedule": "linear", "ratio": 1.0, "decay": 0.9, "warmup_steps": W,
                                            "total_steps": T}},
        "state_arrays": ["ema", "side"], "status": "running"})
    per_chunk = max(1, (32 << 20) // (2 * 4 * n))   # what the recorder would put in a chunk (two halves)
    for a in range(0, R, per_chunk):
        rows = {k: [] for k in ("step", "level", "dist", "ema", "side", "bounds")}
        for r in range(a, min(R, a + per_chunk)):
            moving = fs < 0
            w[moving] += 0.1 * (target[moving] - w[moving]) + 0.02 * rng.normal(0, 1, int(moving.sum())
                                                                                  ).astype(np.float32)
            lo, up = -2.0 - 0.004 * r, 2.0 + 0.002 * r
            pos = (w - lo) / (up - lo) * (L - 1)
            lev = np.clip(np.rint(pos), 0, L - 1)
            d = np.abs(pos - lev)
            ema = 0.9 * ema + 0.1 * d
            rho = -1.0 if r * spe <= W else (r * spe - W) / (T - W)
            new = moving & (ema <= rho)
            fs[new] = r * spe
            rows["step"].append(r * spe)
            rows["level"].append(lev.astype(np.uint8))
            rows["dist"].append(np.clip(np.rint(d * 128), 0, 255).astype(np.uint8))
            rows["ema"].append(np.clip(np.rint(ema * 128), 0, 255).astype(np.uint8))
            rows["side"].append((pos >= lev).astype(np.uint8))
            rows["bounds"].append(np.array([[lo, up]], np.float32))
        writer.append_chunk({k: np.stack(v) for k, v in rows.items()})
    writer.write_summary("freeze_step", fs)
    writer.set_status("complete")
    return out


# ---- (a) cold start ----------------------------------------------------------------------------------------
def cold_start(browser, runs_dir: Path, data_dir: Path) -> dict:
    srv = B.Server(runs_dir, data_dir).start()
    try:
        t_health = srv.wait_healthy(timeout=60)
        page = B.new_page(browser)
        try:
            t_goto = time.perf_counter()
            page.goto(srv.url + "/", wait_until="domcontentloaded", timeout=60_000)
            page.locator(B.PLOT).first.wait_for(state="visible", timeout=60_000)
            t_plot = time.perf_counter()
        finally:
            page.context.close()
        return {"total": t_plot - srv.started_at, "health": t_health, "page": t_plot - t_goto}
    finally:
        srv.stop()


def measure_moves(page, metric: str, n: int, act, keys: list[str]) -> dict:
    """`act(i)` performs move i (ending with one of `keys`); returns the in-page times of every move."""
    page.evaluate(PROBE, [metric, keys])
    act(0)   # warm-up move, not counted (the first query after a switch may build caches)
    page.wait_for_function("() => window.__rt.t2 !== null", timeout=120_000)
    B.wait_idle(page)
    metric_ms, rerun_ms, changes = [], [], []
    for i in range(1, n + 1):
        act(i)
        page.wait_for_function("() => window.__rt.t1 !== null && window.__rt.t2 !== null", timeout=60_000)
        r = page.evaluate("() => window.__rt")
        metric_ms.append(r["t1"] - r["t0"])
        rerun_ms.append(r["t2"] - r["t0"])
        changes.append(f"{r['before']} → {r['after']}")
        B.wait_idle(page, settle_ms=50)
    return {"metric": metric_ms, "rerun": rerun_ms, "changes": changes}


# ---- (b) threshold round trip ------------------------------------------------------------------------------
def round_trips(browser, srv: B.Server, run_id: str, moves: int) -> dict:
    page = B.new_page(browser)
    try:
        B.goto(page, srv.url, f"sweep?run={run_id}", title="Threshold sweep")
        page.locator(B.PLOT).first.wait_for(state="visible", timeout=60_000)
        B.wait_idle(page)
        box = B.number_input(page, "Threshold ratio")
        values = ["0.1", "0.3"]

        def act(i):
            box.fill(values[i % 2])
            box.press("Enter")

        out = measure_moves(page, "Updates eliminated", moves, act, ["Enter"])
        B.screenshot(page, "bench-sweep")
        return out
    finally:
        page.context.close()


# ---- (c) and (d) the distributions view --------------------------------------------------------------------
def open_distributions(browser, srv: B.Server, run_id: str) -> dict:
    """Open the view from the app's navigation (the Runs page loaded first, as a user would): seconds from the
    click on "Distributions" to every chart drawn and the script idle; twice (the second time the counts are
    cached). Also the seconds of a fresh browser page loading the view's URL (Streamlit's JavaScript included)."""
    page = B.new_page(browser)
    out = {}
    try:
        B.goto(page, srv.url, "runs", title="Runs", timeout=120)
        for key in ("click", "click_again"):
            t0 = time.perf_counter()
            B.nav_link(page, "Distributions").click()
            page.locator("h1").filter(has_text="Distributions").first.wait_for(timeout=120_000)
            page.wait_for_function("s => document.querySelectorAll(s).length >= 5", arg=B.DRAWN, timeout=120_000)
            B.wait_idle(page, timeout=120, settle_ms=0)
            out[key] = time.perf_counter() - t0
            B.nav_link(page, "Runs").click()
            page.locator("h1").filter(has_text="Runs").first.wait_for(timeout=120_000)
            B.wait_idle(page, timeout=120)
    finally:
        page.context.close()
    page = B.new_page(browser)
    try:
        t0 = time.perf_counter()
        page.goto(f"{srv.url}/distributions?run={run_id}&layer=fc", wait_until="domcontentloaded", timeout=120_000)
        page.locator("h1").filter(has_text="Distributions").first.wait_for(timeout=120_000)
        page.wait_for_function("s => document.querySelectorAll(s).length >= 5", arg=B.DRAWN, timeout=120_000)
        B.wait_idle(page, timeout=120, settle_ms=0)
        out["url"] = time.perf_counter() - t0
    finally:
        page.context.close()
    return out


def record_moves(browser, srv: B.Server, run_id: str, moves: int) -> dict:
    page = B.new_page(browser)
    try:
        B.goto(page, srv.url, f"distributions?run={run_id}&layer=fc", title="Distributions", timeout=120)
        page.wait_for_function("s => document.querySelectorAll(s).length >= 5", arg=B.DRAWN, timeout=120_000)
        B.wait_idle(page)
        thumb = B.slider_thumb(page, "Record (epoch)")
        keys = ["ArrowRight", "ArrowLeft"]

        def act(i):
            thumb.focus()
            page.keyboard.press(keys[i % 2] if i else "ArrowRight")

        out = measure_moves(page, "Frozen", moves, act, keys)
        B.screenshot(page, "bench-distributions")
        return out
    finally:
        page.context.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=3, help="cold starts for (a) and cold opens for (c)")
    ap.add_argument("--moves", type=int, default=10, help="threshold moves (b) and record moves (d)")
    ap.add_argument("--runs", type=Path, default=None, help="runs folder for (a), (b) (default: the examples)")
    ap.add_argument("--run", default=None, help="run id for (b) (default: the largest by n_weights)")
    ap.add_argument("--weights", type=int, default=1_000_000, help="weights of the synthetic run for (c), (d)")
    ap.add_argument("--records", type=int, default=100, help="records of the synthetic run")
    ap.add_argument("--big-dir", type=Path, default=Path(tempfile.gettempdir()) / "scratchoff-bench-browser",
                    help="where the synthetic run is written (once; reused when present)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
    ap.add_argument("--no-cache", action="store_true",
                    help="(c) without the run's cached first-view counts (deleted before every open): the page "
                         "makes its pass over the run, as for a run recorded before they were kept")
    args = ap.parse_args()
    reason = B.browser_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="scratchoff-bench-browser-", ignore_cleanup_errors=True) as d:
        run(args, Path(d))


def run(args, tmp: Path) -> None:
    from playwright.sync_api import sync_playwright

    skip = set(args.skip.split(",")) - {""}
    runs_dir = args.runs or B.copy_example_runs(tmp / "runs")
    data_dir = tmp / "data"
    run_id, n_weights = (args.run, -1) if args.run else largest_run(runs_dir)
    big_runs = args.big_dir / "runs"
    big_id = f"lts-{args.weights}x{args.records}"
    if not {"c", "d"} <= skip and not (big_runs / big_id / "manifest.json").is_file():
        t0 = time.perf_counter()
        big_runs.mkdir(parents=True, exist_ok=True)
        write_lts_run(big_runs / big_id, args.weights, args.records)
        print(f"wrote {big_runs / big_id} in {time.perf_counter() - t0:.1f} s", flush=True)
    if not {"c", "d"} <= skip and not args.no_cache:   # what the recorder keeps in the run's cache at finish
        from lts_core.analysis import first_view_distributions
        from lts_core.store import open_run
        t0 = time.perf_counter()
        first_view_distributions(open_run(big_runs / big_id))
        print(f"first view's distributions in {big_runs / big_id}/cache: {time.perf_counter() - t0:.1f} s "
              "(computed now, or read when already there)", flush=True)
    res: dict = {"starts": [], "opens_cold": [], "opens_warm": [], "opens_url": []}
    with sync_playwright() as pw:
        browser = B.launch_browser(pw)
        try:
            if "a" not in skip:
                for i in range(args.starts):
                    s = cold_start(browser, runs_dir, data_dir)
                    res["starts"].append(s)
                    print(f"cold start {i + 1}: {s['total']:.2f} s (health {s['health']:.2f} s, page → chart "
                          f"{s['page']:.2f} s)", flush=True)
            if "b" not in skip:
                with B.running_server(runs_dir, data_dir) as srv:
                    res["rt"] = round_trips(browser, srv, run_id, args.moves)
            if "c" not in skip:
                for i in range(args.starts):   # a fresh server each time: the first open reads (or counts) them
                    if args.no_cache:
                        shutil.rmtree(big_runs / big_id / "cache", ignore_errors=True)
                    with B.running_server(big_runs, data_dir) as srv:
                        o = open_distributions(browser, srv, big_id)
                    res["opens_cold"].append(o["click"])
                    res["opens_warm"].append(o["click_again"])
                    res["opens_url"].append(o["url"])
                    print(f"distributions open {i + 1}: first click {o['click']:.2f} s, again "
                          f"{o['click_again']:.2f} s, fresh page by URL {o['url']:.2f} s", flush=True)
            if "d" not in skip:
                with B.running_server(big_runs, data_dir) as srv:
                    open_distributions(browser, srv, big_id)
                    res["moves"] = record_moves(browser, srv, big_id, args.moves)
        finally:
            browser.close()
    report(args, res, run_id, n_weights, big_id)


def report(args, res: dict, run_id: str, n_weights: int, big_id: str) -> None:
    for key in ("rt", "moves"):
        for c in res.get(key, {}).get("changes", []):
            print(f"  {key}: {c}")
    load = os.getloadavg()
    print()
    print(f"Browser benchmark — Chromium headless, {os.cpu_count()} CPUs, load average at the end "
          f"{load[0]:.1f}/{load[1]:.1f}; (b) on `{run_id}`" + (f" ({n_weights:,} weights)" if n_weights >= 0 else "")
          + f"; (c), (d) on `{big_id}` ({args.weights:,} weights in one layer × {args.records} records)")
    print()
    print("| measurement | median | min | max | n | target |")
    print("|---|---|---|---|---|---|")
    st = res["starts"]
    print(median_row("(a) `streamlit run` → first chart visible (Runs page)", [s["total"] for s in st], "s",
                     "< 5 s idle"))
    print(median_row("  · launch → /_stcore/health ok", [s["health"] for s in st], "s", ""))
    print(median_row("  · page load → first chart", [s["page"] for s in st], "s", ""))
    rt = res.get("rt", {})
    print(median_row("(b) typed ρ + Enter → 'Updates eliminated' changed", rt.get("metric", []), "ms", "< 300 ms",
                     fmt="{:.0f}"))
    print(median_row("  · Enter → rerun finished (all charts redrawn)", rt.get("rerun", []), "ms", "", fmt="{:.0f}"))
    print(median_row("(c) click 'Distributions' → every chart drawn, fresh server (one pass over the run)",
                     res["opens_cold"], "s", "< 2 s"))
    print(median_row("  · clicked again (counts cached)", res["opens_warm"], "s", ""))
    print(median_row("  · a fresh browser page opening the view's URL (JavaScript loaded too)", res["opens_url"],
                     "s", ""))
    mv = res.get("moves", {})
    print(median_row("(d) record slider key → 'Frozen' changed", mv.get("metric", []), "ms", "< 300 ms",
                     fmt="{:.0f}"))
    print(median_row("  · key → fragment rerun finished (every chart of the record redrawn)", mv.get("rerun", []),
                     "ms", "", fmt="{:.0f}"))


if __name__ == "__main__":
    main()
