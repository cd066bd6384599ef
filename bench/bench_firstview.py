"""Where a first view's time goes in a real browser (headless Chromium via Playwright): a timeline per view.

For each view (a URL path of the app, e.g. `runs` or `settling?run=syn-10m`), a new browser context opens it
on a running server and this script records, in seconds from `page.goto`:
- the HTML document's response, DOMContentLoaded and load (Navigation Timing), and every JavaScript and CSS
  file fetched (Resource Timing: how many, how many bytes, when the last one arrived);
- the websocket: when it opened, when the first script delta arrived, when the script finished
  (`script_finished`), every message's kind decoded from Streamlit's protobuf (`ForwardMsg`), the elements
  the script sent (how many Plotly and Vega-Lite charts, their bytes);
- when each chart was drawn in the page (Plotly: its `.main-svg`; Vega-Lite: its canvas or svg), the first
  `<h1>`, and the script state returning to idle;
- with `--trace`, the renderer main thread's busy time split by kind (script compile and evaluation, style and
  layout, paint, garbage collection) from a Chromium trace.

`--fresh-server` starts a new `streamlit run` for every view (the cold start of issue 11: the time from the
launch to the first chart, with the server's imports and first script run); otherwise one server serves
all views, after a warm-up view of `--warm` (default: the first view).

    python bench/bench_firstview.py --runs /work/bigruns/... --view runs --view 'settling?run=syn-10m' \
        [--rounds 3] [--trace] [--fresh-server] [--charts 3]
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

# In-page probe, installed before any of the page's scripts: stamps (performance.now(), ms since navigation
# start) the first <h1>, every chart drawn, and the script state going back to idle after it ran.
PROBE = """
(() => {
  const t = window.__fv = {h1: null, charts: [], idle: [], running: null};
  const seen = new WeakSet();
  const scan = () => {
    if (t.h1 === null && document.querySelector('h1')) t.h1 = performance.now();
    for (const el of document.querySelectorAll('.js-plotly-plot .main-svg, [data-testid=stVegaLiteChart] canvas,'
                                              + ' [data-testid=stVegaLiteChart] svg.marks')) {
      const host = el.closest('.js-plotly-plot, [data-testid=stVegaLiteChart]');
      if (host && !seen.has(host)) {
        seen.add(host);
        t.charts.push([performance.now(), host.classList.contains('js-plotly-plot') ? 'plotly' : 'vega']);
      }
    }
    const app = document.querySelector('[data-testid=stApp]');
    if (app) {
      const s = app.getAttribute('data-test-script-state');
      if (s === 'running' && t.running === null) t.running = performance.now();
      if (s === 'notRunning' && t.running !== null) { t.idle.push(performance.now()); t.running = null; }
    }
  };
  new MutationObserver(scan).observe(document, {subtree: true, childList: true, attributes: true,
                                                attributeFilter: ['data-test-script-state', 'class']});
})();
"""

TIMINGS = """
() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource').map(r => ({
    name: r.name, type: r.initiatorType, start: r.startTime, end: r.responseEnd,
    bytes: r.encodedBodySize, decoded: r.decodedBodySize}));
  return {nav: {response: nav.responseEnd, dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd},
          res, fv: window.__fv, now: performance.now()};
}
"""

TRACE_CATEGORIES = ["devtools.timeline", "v8", "v8.execute", "disabled-by-default-devtools.timeline", "blink",
                    "loading"]
# trace event name -> what it is (complete events on the renderer main thread, self time attributed)
KINDS = {"v8.compile": "compile", "v8.compileModule": "compile", "V8.CompileCode": "compile",
         "v8.parseOnBackground": "compile", "EvaluateScript": "script", "v8.evaluateModule": "script",
         "FunctionCall": "script", "EventDispatch": "script", "TimerFire": "script", "FireAnimationFrame": "script",
         "RunMicrotasks": "script", "v8.run": "script",
         "UpdateLayoutTree": "style+layout", "Layout": "style+layout", "RecalculateStyles": "style+layout",
         "ParseAuthorStyleSheet": "style+layout", "Paint": "paint", "PrePaint": "paint", "Layerize": "paint",
         "UpdateLayer": "paint", "CompositeLayers": "paint", "MinorGC": "gc", "MajorGC": "gc",
         "V8.GCScavenger": "gc", "V8.GC_MARK_COMPACTOR": "gc", "ParseHTML": "html"}


def decode(payload: bytes) -> tuple[str, str, int]:
    """(message kind, element kind or '', bytes) of one websocket frame from the server."""
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    msg = ForwardMsg()
    try:
        msg.ParseFromString(payload)
    except Exception:  # noqa: BLE001 - not a ForwardMsg
        return "?", "", len(payload)
    kind = msg.WhichOneof("type") or "?"
    elem = ""
    if kind == "delta":
        d = msg.delta.WhichOneof("type")
        elem = msg.delta.new_element.WhichOneof("type") if d == "new_element" else d or ""
    return kind, elem, len(payload)


def main_thread_busy(trace: bytes, t0_us: float, t1_us: float) -> dict:
    """Seconds of the renderer main thread per kind within [t0, t1] (trace clock, µs): top-level tasks split by
    the self time of the kinds above."""
    events = json.loads(trace)
    events = events["traceEvents"] if isinstance(events, dict) else events
    main = {(e["pid"], e["tid"]) for e in events if e.get("name") == "thread_name"
            and e.get("args", {}).get("name") == "CrRendererMain"}
    out: dict[str, float] = {}
    by_thread: dict = {}
    for e in events:
        if (e.get("pid"), e.get("tid")) in main and e.get("ph") == "X" and "dur" in e and t0_us <= e["ts"] <= t1_us:
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list = []   # (end, kind or None)
        last_ts = None
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                stack.pop()
            kind = KINDS.get(e["name"])
            if e["name"] in ("RunTask", "ThreadControllerImpl::RunTask") and not stack:
                out["busy (tasks)"] = out.get("busy (tasks)", 0.0) + e["dur"] / 1e6
            if kind:
                # self time: subtract from the innermost enclosing classified event
                for i in range(len(stack) - 1, -1, -1):
                    if stack[i][1]:
                        out[stack[i][1]] = out.get(stack[i][1], 0.0) - e["dur"] / 1e6
                        break
                out[kind] = out.get(kind, 0.0) + e["dur"] / 1e6
            stack.append((e["ts"] + e["dur"], kind))
            last_ts = e["ts"]
        del last_ts
    return out


def first_view(browser, srv, view: str, charts: int, trace: bool, t_launch: float | None = None,
               dark: bool = False) -> dict:
    page = B.new_page(browser, dark=dark)
    frames: list[tuple[float, str, str, int]] = []
    ws_open: list[float] = []
    t0 = None

    def on_ws(ws):
        if "_stcore/stream" in ws.url:
            ws_open.append(time.perf_counter())
            ws.on("framereceived", lambda p: frames.append((time.perf_counter(),) + decode(
                p if isinstance(p, bytes) else p.encode())))

    page.on("websocket", on_ws)
    page.add_init_script(PROBE)
    try:
        if trace:
            browser.start_tracing(page=page, categories=TRACE_CATEGORIES)
        t0 = time.perf_counter()
        page.goto(f"{srv.url}/{view}", wait_until="commit", timeout=120_000)
        page.wait_for_function("n => window.__fv && window.__fv.charts.length >= n", arg=charts, timeout=120_000)
        page.locator(B.SCRIPT_IDLE).wait_for(timeout=120_000)
        t_end = time.perf_counter()
        tm = page.evaluate(TIMINGS)
        tr = browser.stop_tracing() if trace else None
    finally:
        page.context.close()
    # the page's performance clock starts at navigation; align the websocket stamps (Python clock) on `goto`
    ms = lambda x: None if x is None else x / 1000.0  # noqa: E731
    js = [r for r in tm["res"] if r["name"].endswith(".js")]
    css = [r for r in tm["res"] if r["name"].endswith(".css")]
    fv = tm["fv"]
    script_done = [t - t0 for t, k, _, _ in frames if k == "script_finished"]
    deltas = [(t - t0, e, n) for t, k, e, n in frames if k == "delta"]
    out = {
        "total": t_end - t0, "launch_to_chart": None if t_launch is None else t_end - t_launch,
        "html": ms(tm["nav"]["response"]), "dcl": ms(tm["nav"]["dcl"]), "load": ms(tm["nav"]["load"]),
        "js_files": len(js), "js_mb": sum(r["bytes"] for r in js) / 1e6,
        "js_last": max((ms(r["end"]) for r in js), default=None),
        "css_files": len(css),
        "plotly_js": next((ms(r["end"]) for r in js if "PlotlyChart" in r["name"]), None),
        "vega_js": next((ms(r["end"]) for r in js if "/embed." in r["name"] or "VegaLite" in r["name"]), None),
        "ws_open": ws_open[0] - t0 if ws_open else None,
        "first_delta": deltas[0][0] if deltas else None,
        "script_finished": script_done,
        "n_deltas": len(deltas), "delta_kb": sum(n for _, _, n in deltas) / 1e3,
        "plotly_sent": sum(e == "plotly_chart" for _, e, _ in deltas),
        "plotly_kb": sum(n for _, e, n in deltas if e == "plotly_chart") / 1e3,
        "vega_sent": sum(e == "vega_lite_chart" for _, e, _ in deltas),
        "h1": ms(fv["h1"]), "charts": [(ms(t), k) for t, k in fv["charts"]],
        "idle": [ms(t) for t in fv["idle"]],
        "messages": sorted([(t - t0, f"ws {k}{'/' + e if e else ''} {n}B") for t, k, e, n in frames]
                           + [(ms(r["start"]), f"fetch {r['name'].rsplit('/', 1)[-1]} {r['bytes'] / 1e3:.0f}kB → "
                               f"{ms(r['end']):.2f}") for r in js + css if r["bytes"] > 100_000]
                           + [(ms(t), f"drawn {k}") for t, k in fv["charts"]]),
    }
    if tr is not None:
        ev = json.loads(tr)
        ev = ev["traceEvents"] if isinstance(ev, dict) else ev
        nav = [e["ts"] for e in ev if e.get("name") in ("navigationStart", "NavigationStart", "fetchStart")]
        start = min(nav) if nav else min(e["ts"] for e in ev if "ts" in e and e["ts"] > 0)
        out["main_thread"] = main_thread_busy(tr, start, start + out["total"] * 1e6)
        if os.environ.get("FV_SAVE_TRACE"):
            Path(os.environ["FV_SAVE_TRACE"]).write_bytes(tr)
    return out


def summary(rs: list[dict]) -> list[str]:
    def med(key, fmt="{:.2f}"):
        xs = [r[key] for r in rs if r.get(key) is not None]
        return "—" if not xs else fmt.format(statistics.median(xs)) + (
            f" ({fmt.format(min(xs))}–{fmt.format(max(xs))})" if len(xs) > 1 else "")

    def nth_chart(i):
        xs = [r["charts"][i][0] for r in rs if len(r["charts"]) > i]
        return f"{statistics.median(xs):.2f}" if xs else "—"

    lines = [f"  goto → every chart drawn, script idle: {med('total')} s"]
    if any(r.get("launch_to_chart") for r in rs):
        lines.append(f"  launch → every chart drawn: {med('launch_to_chart')} s")
    lines += [
        f"  HTML {med('html')} · DOMContentLoaded {med('dcl')} · load {med('load')} · websocket open "
        f"{med('ws_open')} · first delta {med('first_delta')} s",
        f"  JavaScript: {med('js_files', '{:.0f}')} files, {med('js_mb')} MB, last arrived {med('js_last')} s; "
        f"Plotly bundle arrived {med('plotly_js')} s, Vega {med('vega_js')} s",
        f"  deltas: {med('n_deltas', '{:.0f}')} ({med('delta_kb', '{:.0f}')} kB), Plotly charts sent "
        f"{med('plotly_sent', '{:.0f}')} ({med('plotly_kb', '{:.0f}')} kB), Vega-Lite {med('vega_sent', '{:.0f}')}",
        f"  first h1 {med('h1')} s; charts drawn at " + ", ".join(
            f"{nth_chart(i)}" for i in range(max(len(r['charts']) for r in rs))) + " s ("
        + ", ".join(k for _, k in rs[0]["charts"]) + ")",
        "  script_finished at " + "; ".join(", ".join(f"{t:.2f}" for t in r["script_finished"]) for r in rs) + " s",
    ]
    mt = [r["main_thread"] for r in rs if "main_thread" in r]
    if mt:
        keys = sorted({k for m in mt for k in m}, key=lambda k: -statistics.median(m.get(k, 0) for m in mt))
        lines.append("  renderer main thread (s, median): " + ", ".join(
            f"{k} {statistics.median(m.get(k, 0.0) for m in mt):.2f}" for k in keys))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=None, help="runs folder (default: a copy of the examples)")
    ap.add_argument("--view", action="append", required=True,
                    help="URL path of a view, e.g. runs or 'sweep?run=x'; N charts with 'path#N'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trace", action="store_true", help="Chromium trace: the renderer main thread's busy time")
    ap.add_argument("--fresh-server", action="store_true", help="a new streamlit run for every view")
    ap.add_argument("--warm", default=None, help="view opened once first on a shared server (default: first)")
    ap.add_argument("--dark", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print every websocket message")
    ap.add_argument("--app", action="append", default=[], metavar="LABEL=CHECKOUT",
                    help="also measure another checkout's app (e.g. before=/tmp/main), interleaved: for every "
                         "view, this checkout then each other one")
    args = ap.parse_args()
    reason = B.browser_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    from playwright.sync_api import sync_playwright

    views = []
    for v in args.view:
        path, _, n = v.partition("#")
        views.append((path, int(n or 1)))
    apps = [("this", B.APP)] + [(a.partition("=")[0], Path(a.partition("=")[2]) / "app" / "scratchoff_app.py")
                                for a in args.app]
    print(f"load average at the start {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="scratchoff-bench-fv-") as tmp, sync_playwright() as pw:
        tmp = Path(tmp)
        runs = args.runs or B.copy_example_runs(tmp / "runs")
        browser = B.launch_browser(pw)
        servers: dict = {}
        try:
            if not args.fresh_server:
                wp, wn = (args.warm.partition("#")[0], int(args.warm.partition("#")[2] or 1)) if args.warm \
                    else views[0]
                for label, app in apps:
                    servers[label] = B.Server(runs, tmp / "data", app=app).start()
                    servers[label].wait_healthy(timeout=120)
                    first_view(browser, servers[label], wp, wn, False)
            for rnd in range(args.rounds):
                for path, n in views:
                    for label, app in apps:
                        if args.fresh_server:
                            s = B.Server(runs, tmp / "data", app=app).start()
                            try:
                                s.wait_healthy(timeout=120)
                                r = first_view(browser, s, path, n, args.trace, t_launch=s.started_at,
                                               dark=args.dark)
                            finally:
                                s.stop()
                        else:
                            r = first_view(browser, servers[label], path, n, args.trace, dark=args.dark)
                        results.setdefault((label, path), []).append(r)
                        print(f"round {rnd + 1} {label} {path}: {r['total']:.2f} s"
                              + (f" (launch → chart {r['launch_to_chart']:.2f} s)" if r["launch_to_chart"] else "")
                              + f"; charts at {', '.join(f'{t:.2f}' for t, _ in r['charts'])}", flush=True)
                        if args.verbose:
                            print("\n".join(f"   {t:6.2f} {m}" for t, m in r["messages"]))
        finally:
            for srv in servers.values():
                srv.stop()
            browser.close()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; medians (min–max) of {args.rounds} rounds, "
          "seconds from page.goto")
    for (label, path), rs in results.items():
        print(f"\n{label}: {path}")
        print("\n".join(summary(rs)))
    if len(apps) > 1:
        print("\nratios to the first app, per round (interleaved), median:")
        key = "launch_to_chart" if args.fresh_server else "total"
        for path, _ in views:
            base = [r[key] for r in results[("this", path)]]
            for label, _ in apps[1:]:
                other = [r[key] for r in results[(label, path)]]
                ratios = [a / b for a, b in zip(base, other)]
                print(f"  {path}: this ÷ {label} = {statistics.median(ratios):.2f} "
                      f"({min(ratios):.2f}–{max(ratios):.2f}); {key} this {statistics.median(base):.2f} s, "
                      f"{label} {statistics.median(other):.2f} s")


if __name__ == "__main__":
    main()
