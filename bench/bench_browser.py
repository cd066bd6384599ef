"""Benchmark of the scratchoff app in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

(a) cold start: time from launching `streamlit run app/scratchoff_app.py` to the first chart visible on
    the default page (Runs), a fresh server each repetition; broken down into launch → /_stcore/health ok and
    page load → chart.
(b) threshold round trip on the Threshold sweep page, on the largest run of the runs folder (by n_weights in
    the manifests): time from the key press on the threshold slider to the "Updates eliminated" metric showing
    a new value, measured inside the browser (keydown listener + MutationObserver, performance.now()), and to
    the end of the rerun (every chart of the fragment redrawn).

Runs over a temporary copy of the shipped example runs (data/runs/example-*), or --runs DIR (read in place).

    /work/venv/bin/python bench/bench_browser.py [--starts 3] [--moves 10] [--runs DIR] [--run RUN_ID]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import browser_util as B  # noqa: E402

METRIC = "Updates eliminated"
SLIDER = "Threshold ratio"

# In-page probe: keydown stamps t0 and the metric text; the first DOM mutation that changes the metric text
# stamps t1; the script state returning to notRunning after that stamps t2.
PROBE = """
([label]) => {
  const metricText = () => {
    for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
      const l = m.querySelector('[data-testid="stMetricLabel"]');
      if (l && l.innerText.includes(label)) {
        const v = m.querySelector('[data-testid="stMetricValue"]');
        return v ? v.innerText.trim() : null;
      }
    }
    return null;
  };
  const app = document.querySelector('[data-testid="stApp"]');
  window.__rt = {t0: null, t1: null, t2: null, before: null, after: null};
  document.addEventListener('keydown', () => {
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


def median_row(name: str, xs: list[float], unit: str, target: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not xs:
        return f"| {name} | — | — | — | 0 | {target} |"
    ys = [x * scale for x in xs]
    return (f"| {name} | {fmt.format(statistics.median(ys))} {unit} | {fmt.format(min(ys))} {unit} | "
            f"{fmt.format(max(ys))} {unit} | {len(ys)} | {target} |")


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


# ---- (b) threshold round trip ------------------------------------------------------------------------------
def select_run(page, run_id: str) -> None:
    B.choose(page, "Recorded run to replay on", run_id)
    page.locator(B.PLOT).first.wait_for(state="visible", timeout=60_000)
    B.wait_idle(page)
    chosen = B.selectbox_value(page, "Recorded run to replay on")
    assert run_id in chosen, f"could not select {run_id} (shows {chosen!r})"


def round_trips(browser, srv: B.Server, run_id: str, moves: int, keys: tuple[str, str]) -> dict:
    page = B.new_page(browser)
    try:
        B.goto(page, srv.url, "sweep", title="Threshold sweep")
        page.locator(B.PLOT).first.wait_for(state="visible", timeout=60_000)
        B.wait_idle(page)
        select_run(page, run_id)
        thumb = B.slider_thumb(page, SLIDER)
        page.evaluate(PROBE, [METRIC])
        thumb.focus()
        # warm-up move (first query after a run switch may build caches), not counted
        page.keyboard.press(keys[0])
        page.wait_for_function("() => window.__rt.t2 !== null", timeout=60_000)
        B.wait_idle(page)
        metric_ms, rerun_ms, changes = [], [], []
        for i in range(moves):
            thumb.focus()
            before_val = B.slider_value(thumb)
            page.keyboard.press(keys[(i + 1) % 2])
            page.wait_for_function("() => window.__rt.t1 !== null && window.__rt.t2 !== null", timeout=30_000)
            r = page.evaluate("() => window.__rt")
            metric_ms.append(r["t1"] - r["t0"])
            rerun_ms.append(r["t2"] - r["t0"])
            B.wait_idle(page, settle_ms=50)
            changes.append(f"ρ {before_val}→{B.slider_value(thumb)}: {r['before']}→{r['after']}")
        B.screenshot(page, "bench-sweep")
        return {"metric": metric_ms, "rerun": rerun_ms, "changes": changes}
    finally:
        page.context.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=3, help="cold starts for (a)")
    ap.add_argument("--moves", type=int, default=10, help="threshold moves for (b)")
    ap.add_argument("--runs", type=Path, default=None, help="runs folder (default: a copy of the examples)")
    ap.add_argument("--run", default=None, help="run id for (b) (default: the largest by n_weights)")
    ap.add_argument("--keys", default="PageUp,PageDown",
                    help="the two keys alternated on the slider (PageUp/PageDown move ρ by a tenth of its range)")
    args = ap.parse_args()
    reason = B.browser_unavailable_reason()
    if reason:
        raise SystemExit(reason)

    with tempfile.TemporaryDirectory(prefix="scratchoff-bench-browser-", ignore_cleanup_errors=True) as d:
        run(args, Path(d))


def run(args, tmp: Path) -> None:
    from playwright.sync_api import sync_playwright

    runs_dir = args.runs or B.copy_example_runs(tmp / "runs")
    data_dir = tmp / "data"
    run_id, n_weights = (args.run, -1) if args.run else largest_run(runs_dir)
    keys = tuple(args.keys.split(","))[:2]

    with sync_playwright() as pw:
        browser = B.launch_browser(pw)
        try:
            starts = []
            for i in range(args.starts):
                s = cold_start(browser, runs_dir, data_dir)
                starts.append(s)
                print(f"cold start {i + 1}: {s['total']:.2f} s (health {s['health']:.2f} s, page → chart "
                      f"{s['page']:.2f} s)", flush=True)
            srv = B.Server(runs_dir, data_dir).start()
            try:
                srv.wait_healthy(timeout=60)
                rt = round_trips(browser, srv, run_id, args.moves, keys)
            finally:
                srv.stop()
        finally:
            browser.close()
    for c in rt["changes"]:
        print("  move:", c)

    print()
    print(f"Browser benchmark — Chromium headless, {os.cpu_count()} CPUs; run for (b): `{run_id}`"
          + (f" ({n_weights:,} weights)" if n_weights >= 0 else "") + f"; keys {'/'.join(keys)}")
    print()
    print("| measurement | median | min | max | n | target |")
    print("|---|---|---|---|---|---|")
    print(median_row("(a) `streamlit run` → first chart visible (Runs page)", [s["total"] for s in starts],
                     "s", "< 5 s"))
    print(median_row("  · launch → /_stcore/health ok", [s["health"] for s in starts], "s", ""))
    print(median_row("  · page load → first chart", [s["page"] for s in starts], "s", ""))
    print(median_row("(b) threshold key press → metric text changed", rt["metric"], "ms", "< 300 ms",
                     fmt="{:.0f}"))
    print(median_row("  · key press → rerun finished (all charts redrawn)", rt["rerun"], "ms", "", fmt="{:.0f}"))


if __name__ == "__main__":
    main()
