"""Helpers shared by the real-browser end-to-end test and `bench/bench_browser.py`.

Start the Streamlit app as a subprocess on a free port, launch Debian's headless Chromium through Playwright,
wait for Streamlit reruns to finish. Playwright cannot download its own browsers here, so the system
Chromium (`/usr/bin/chromium`, from apt) is always used.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app" / "scratchoff_app.py"
EXAMPLE_RUNS = REPO / "data" / "runs"
SCREENSHOTS = REPO / "screenshots"
CHROMIUM = os.environ.get("SCRATCHOFF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]

# (url path, text in the page's <h1>, whether the page shows a plotly chart without any interaction)
PAGES = [
    ("runs", "Runs", True),
    ("settling", "Settling", True),
    ("distributions", "Distributions", True),
    ("sweep", "Threshold sweep", True),
    ("trajectories", "Trajectories", True),
    ("compare", "Compare", True),
    ("train", "Train", False),
    ("learn", "Learn", True),
]

APP_READY = "[data-testid='stApp'][data-test-connection-state='CONNECTED']"
SCRIPT_IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
PLOT = ".js-plotly-plot, [data-testid=stVegaLiteChart] canvas, [data-testid=stVegaLiteChart] svg"  # any chart
CHART = ".js-plotly-plot, [data-testid=stVegaLiteChart]"   # a chart's container (one per chart)
# charts drawn: a Plotly chart's svg, a Vega-Lite chart's canvas or svg marks (a JS expression's selector)
DRAWN = ".js-plotly-plot .main-svg:first-of-type, [data-testid=stVegaLiteChart] canvas, " \
        "[data-testid=stVegaLiteChart] svg.marks"


def browser_unavailable_reason() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (install Debian's `chromium` package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"playwright is not importable ({e}); pip install playwright"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_example_runs(dest: Path) -> Path:
    """Copy the shipped example runs (data/runs/example-*) into `dest` (created)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(EXAMPLE_RUNS.glob("example-*")):
        if src.is_dir():
            shutil.copytree(src, dest / src.name, dirs_exist_ok=True)
    return dest


class Server:
    """`streamlit run <repo>/app/scratchoff_app.py --server.port <port>`, started from another folder (the runs
    folder's parent), so that the app's own config (app/.streamlit/config.toml: localhost, no usage statistics)
    is what binds it. A subprocess; stop() always kills it."""

    def __init__(self, runs_dir: Path, data_dir: Path, port: int | None = None, log: Path | None = None,
                 app: Path | None = None):
        """`app`: another checkout's `app/scratchoff_app.py` (benchmarks compare two versions; its repository
        goes first on PYTHONPATH), default this one's."""
        self.runs_dir, self.data_dir = Path(runs_dir), Path(data_dir)
        self.app = Path(app).resolve() if app else APP
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log) if log else self.data_dir / f"streamlit-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None

    def start(self) -> "Server":
        env = dict(os.environ, SCRATCHOFF_RUNS=str(self.runs_dir), SCRATCHOFF_DATA=str(self.data_dir),
                   PYTHONUNBUFFERED="1")
        env.pop("SCRATCHOFF_DEBUG", None)
        for k in [k for k in env if k.startswith("STREAMLIT_")]:
            env.pop(k)
        env["PYTHONPATH"] = str(self.app.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "streamlit", "run", str(self.app), "--server.port", str(self.port),
               # no file watcher: edits to app/ during a test must not pop up "source changed" prompts
               "--server.fileWatcherType", "none"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=str(self.runs_dir.parent), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Poll /_stcore/health until it answers `ok`; returns seconds since start()."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200 and r.read().decode().strip() == "ok":
                        return time.perf_counter() - self.started_at
            except Exception as e:  # not listening yet
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"streamlit not healthy after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except Exception:
            return ""

    def stop(self) -> None:
        """Terminate the server (and the training subprocesses it started, same session), then kill."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, 15)  # its own session: streamlit + the training jobs it launched
            except (ProcessLookupError, PermissionError):
                p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, 9)
                p.wait(timeout=5)
        with contextlib.suppress(Exception):
            self._log.close()


@contextlib.contextmanager
def running_server(runs_dir: Path, data_dir: Path, timeout: float = 60.0) -> Iterator[Server]:
    srv = Server(runs_dir, data_dir).start()
    try:
        srv.wait_healthy(timeout)
        yield srv
    finally:
        srv.stop()


def launch_browser(pw):
    """Headless system Chromium through Playwright."""
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def new_page(browser, width: int = 1400, height: int = 900, dark: bool = False):
    """A page in a fresh context; `dark` asks for the dark colour scheme (the app follows the browser)."""
    ctx = browser.new_context(viewport={"width": width, "height": height},
                              color_scheme="dark" if dark else "light")
    return ctx.new_page()


def track_requests(page, base_url: str) -> list[str]:
    """Collect the URLs the page requests outside `base_url` (data: and blob: URLs are local)."""
    outside: list[str] = []

    def seen(request):
        url = request.url
        if not url.startswith(base_url) and not url.startswith(("data:", "blob:", "about:")):
            outside.append(url)

    page.on("request", seen)
    return outside


def background_luminance(page) -> float:
    """Relative luminance (0 black … 1 white) of the app's background colour."""
    rgb = page.evaluate("""() => getComputedStyle(document.querySelector('[data-testid="stApp"]'))
                                 .backgroundColor.match(/\\d+/g).slice(0, 3).map(Number)""")
    return (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255


def wait_idle(page, timeout: float = 60.0, settle_ms: int = 150) -> None:
    """Wait until Streamlit is connected and no script run is in progress (and no 'Running…' widget shows).

    The status attribute is flipped by the frontend: after an interaction a short pause lets the rerun start
    before we wait for it to end.
    """
    page.wait_for_timeout(settle_ms)
    page.wait_for_selector(APP_READY, timeout=timeout * 1000)
    page.wait_for_selector(SCRIPT_IDLE, timeout=timeout * 1000)
    page.locator("[data-testid='stStatusWidget']").filter(has_text="Running").wait_for(
        state="hidden", timeout=timeout * 1000)


def goto(page, base_url: str, url_path: str = "", title: str | None = None, timeout: float = 60.0) -> None:
    """Open a page by its URL path; wait for its <h1> (when `title` is given) and for the runs to finish.

    A fresh session may rerun the script once (the app's st.navigation takes over), so the script state
    alone can read "notRunning" between two runs: the title is the reliable sign the page rendered.
    """
    page.goto(f"{base_url}/{url_path}", wait_until="domcontentloaded", timeout=timeout * 1000)
    wait_idle(page, timeout)
    if title:
        page.locator("h1").filter(has_text=title).first.wait_for(state="visible", timeout=timeout * 1000)
        wait_idle(page, timeout)


def no_stale(page, timeout: float = 60.0) -> None:
    """Wait until no element is marked stale (greyed out while a rerun replaces it)."""
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')", timeout=timeout * 1000)


def exceptions(page) -> list[str]:
    """Texts of the Streamlit exception boxes (tracebacks) on the page."""
    loc = page.locator("[data-testid='stException']")
    return [loc.nth(i).inner_text() for i in range(loc.count())]


def screenshot(page, name: str, max_height: int = 12000) -> Path:
    """A screenshot of the whole page.

    Streamlit scrolls inside `[data-testid=stMain]`, not the document, so Playwright's full_page alone
    captures one viewport: the viewport is grown to the main area's scroll height for the shot, then restored.
    """
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    vp = page.viewport_size
    h = page.evaluate("""() => { const m = document.querySelector('[data-testid="stMain"]');
                                 return m ? m.scrollHeight : document.documentElement.scrollHeight; }""")
    if vp and h > vp["height"]:
        page.set_viewport_size({"width": vp["width"], "height": min(int(h) + 20, max_height)})
        page.wait_for_timeout(400)  # let plotly charts relayout to the new size
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        if vp and h > vp["height"]:
            page.set_viewport_size(vp)
    return path


def metric_locator(page, label: str):
    """The value element of the (first) st.metric whose label contains `label`."""
    m = page.locator("[data-testid='stMetric']").filter(
        has=page.locator("[data-testid='stMetricLabel']", has_text=label)).first
    return m.locator("[data-testid='stMetricValue']")


def metric_value(page, label: str) -> str:
    """The displayed value of the st.metric whose label contains `label`."""
    return metric_locator(page, label).inner_text().strip()


def error_alerts(page) -> list[str]:
    """Texts of the st.error boxes on the page (the app turns engine errors into these, not tracebacks)."""
    loc = page.locator("[data-testid='stAlertContentError']")
    return [loc.nth(i).inner_text() for i in range(loc.count())]


def selectbox(page, label: str):
    """The combobox (the text input showing the chosen option) of the st.selectbox labelled `label`.

    Streamlit ≥ 1.50 renders st.selectbox as a React Aria ComboBox: `<input role="combobox" aria-label=LABEL
    value=CHOSEN-OPTION-TEXT>` with a listbox of `role="option"` popping up when opened.
    """
    return page.get_by_role("combobox", name=label, exact=True).first


def selectbox_value(page, label: str) -> str:
    return selectbox(page, label).input_value()


def choose(page, label: str, option_text: str, timeout: float = 30.0, exact: bool = False) -> None:
    """Pick the option containing `option_text` (equal to it with `exact`) in the st.selectbox labelled
    `label` (no-op if chosen)."""
    import re

    box = selectbox(page, label)
    box.wait_for(state="visible", timeout=timeout * 1000)
    current = box.input_value()
    if (current == option_text) if exact else (option_text in current):
        return
    box.click()
    pattern = re.compile(rf"^\s*{re.escape(option_text)}\s*$") if exact else option_text
    page.get_by_role("option").filter(has_text=pattern).first.click(timeout=timeout * 1000)
    page.wait_for_function(
        """([label, text, exact]) => [...document.querySelectorAll('input[role="combobox"]')]
             .some(e => e.getAttribute('aria-label') === label && (exact ? e.value === text : e.value.includes(text)))""",
        arg=[label, option_text, exact], timeout=timeout * 1000)
    wait_idle(page, timeout)


def nav_link(page, title: str):
    """The sidebar navigation link of a page (st.navigation), by its title."""
    return page.locator("[data-testid='stSidebarNav'] a, [data-testid='stSidebarNavLink']").filter(
        has_text=title).first


def slider_thumb(page, label: str):
    """The keyboard-focusable thumb of the st.slider whose label contains `label`.

    Streamlit ≥ 1.50 renders sliders with React Aria: the thumb is a visually hidden
    `<input type="range" aria-label=LABEL>` (implicit ARIA role "slider"), older versions a baseweb
    `<div role="slider">`; both are found by role.
    """
    box = page.locator("[data-testid='stSlider']").filter(
        has=page.locator("[data-testid='stWidgetLabel']", has_text=label)).first
    return box.get_by_role("slider").first


def slider_value(thumb) -> str:
    """The slider's current value as text (aria-valuetext / aria-valuenow / the input's value)."""
    for attr in ("aria-valuetext", "aria-valuenow"):
        v = thumb.get_attribute(attr)
        if v:
            return v
    return thumb.input_value()


def number_input(page, label: str):
    """The <input> of the st.number_input whose label contains `label`."""
    return page.locator("[data-testid='stNumberInput']").filter(
        has=page.locator("[data-testid='stWidgetLabel']", has_text=label)).first.locator("input").first
