"""End-to-end test of the scratchoff Streamlit app in a real headless Chromium.

The app is started with `streamlit run` from another folder on a free port (its own config binds localhost)
over a temporary copy of the shipped example runs ($SCRATCHOFF_RUNS) and an empty data folder
($SCRATCHOFF_DATA; digits is generated offline), then driven through Playwright with Debian's Chromium
(/usr/bin/chromium; `playwright install` is not needed). Every page checks that the browser requested nothing
outside the app (no favicon, font or statistics from the internet), in the light and the dark theme.

Screenshots of every step land in <repo>/screenshots/ (git-ignored).

Run:  python -m pytest tests/test_browser_e2e.py -q -x -s          (or  -m browser)
"""
from __future__ import annotations

import json
import re
import shutil
import time
from urllib.parse import urlparse

import pytest

import browser_util as B

_REASON = B.browser_unavailable_reason()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

RUN_NAME = "e2e-browser-run"


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-e2e")
    runs = B.copy_example_runs(root / "runs")
    assert any(runs.iterdir()), "no shipped example runs under data/runs/example-*"
    srv = B.Server(runs, root / "data", log=root / "streamlit.log").start()
    try:
        srv.wait_healthy(timeout=60)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        br = B.launch_browser(pw)
        try:
            yield br
        finally:
            br.close()


@pytest.fixture(params=["light"])
def page(browser, server, request):
    """A fresh browser page; after the test, nothing may have been requested outside the app."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    pg = B.new_page(browser, dark=request.param == "dark")
    outside = B.track_requests(pg, server.url)
    pg.set_default_timeout(30_000)
    try:
        yield pg
        assert not outside, f"requests outside the app (no network at run time): {outside}"
    finally:
        pg.context.close()


def assert_clean(page, server, where: str) -> None:
    """No Streamlit traceback and no error box on the page."""
    exc = B.exceptions(page)
    assert not exc, f"{where}: Streamlit exception shown:\n{exc[0]}\n--- server log ---\n{server.log_tail()}"
    err = B.error_alerts(page)
    assert not err, f"{where}: error message shown: {err}\n--- server log ---\n{server.log_tail()}"


def open_page(page, server, url_path: str, title: str, plot: bool) -> None:
    from playwright.sync_api import expect

    B.goto(page, server.url, url_path, title=title)
    expect(page.locator("h1").filter(has_text=title).first).to_be_visible()
    if plot:
        expect(page.locator(B.PLOT).first).to_be_visible(timeout=60_000)
    B.wait_idle(page)


# ---- every page -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["light", "dark"], indirect=True)
@pytest.mark.parametrize("url_path,title,plot", B.PAGES, ids=[p[0] for p in B.PAGES])
def test_page_renders(page, server, url_path, title, plot):
    """Each page opened by its URL path renders its title (and a chart) without a traceback, in the light and
    the dark theme (the app follows the browser's colour scheme)."""
    open_page(page, server, url_path, title, plot)
    assert_clean(page, server, url_path)
    assert urlparse(page.url).path.rstrip("/") == "/" + url_path, f"{url_path} opened as {page.url}"
    dark = page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
    lum = B.background_luminance(page)
    assert (lum < 0.3) if dark else (lum > 0.7), f"{url_path}: background luminance {lum:.2f}, dark={dark}"
    i = [p[0] for p in B.PAGES].index(url_path)
    B.screenshot(page, f"{i + 1:02d}-{url_path}{'-dark' if dark else ''}")


def test_root_opens_the_runs_page_at_its_address(page, server):
    open_page(page, server, "", "Runs", plot=True)
    assert urlparse(page.url).path.rstrip("/") == "/runs", page.url


def test_sidebar_navigation(page, server):
    """The st.navigation sidebar links reach every page within one session (URL and title follow)."""
    from playwright.sync_api import expect

    open_page(page, server, "", "Runs", plot=True)  # the default page
    for url_path, title, plot in B.PAGES:
        link = B.nav_link(page, title)
        expect(link).to_be_visible()
        link.click()
        expect(page).to_have_url(re.compile(rf"/{url_path}/?(\?.*)?$"))
        expect(page.locator("h1").filter(has_text=title).first).to_be_visible()
        B.wait_idle(page)
        if plot:
            expect(page.locator(B.PLOT).first).to_be_visible(timeout=60_000)
        assert_clean(page, server, f"sidebar → {title}")


def test_learn_tabs(page, server):
    """Every step (tab) of the guided Learn page renders without a traceback."""
    from playwright.sync_api import expect

    open_page(page, server, "learn", "Learn", plot=True)
    tabs = page.get_by_role("tab")
    n = tabs.count()
    assert n >= 2, f"Learn page: expected its steps as tabs, found {n}"
    for i in range(n):
        name = tabs.nth(i).inner_text().strip()
        tabs.nth(i).click()
        expect(tabs.nth(i)).to_have_attribute("aria-selected", "true")
        B.wait_idle(page)
        panel = page.locator("[role='tabpanel']:visible").first
        expect(panel).to_be_visible()
        assert_clean(page, server, f"learn tab {name!r}")
        B.screenshot(page, f"learn-tab{i + 1}")


# ---- threshold sweep: the typed threshold drives the replay ---------------------------------------------
def test_threshold_input_updates_metric(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "sweep", "Threshold sweep", plot=True)
    metric = B.metric_locator(page, "Updates eliminated")
    expect(metric).to_be_visible()
    before = metric.inner_text().strip()
    box = B.number_input(page, "Threshold ratio")
    start = box.input_value()
    B.screenshot(page, "sweep-before")
    box.fill("0.02")
    box.press("Enter")
    expect(metric).not_to_have_text(before, timeout=30_000)
    B.wait_idle(page)
    assert box.input_value() == "0.0195", "the typed ρ shows as the value the replay uses (1/1024 Δ grid)"
    # the legend (drawn by Vega-Lite on a canvas) names the same ρ: test_app checks the chart's spec
    after = metric.inner_text().strip()
    assert after != before, f"'Updates eliminated' stayed {before} after ρ {start} → 0.0195"
    assert "rho=0.01953125" in page.url
    assert_clean(page, server, "sweep after typing ρ")
    B.screenshot(page, "sweep-after")
    box.fill("0")
    box.press("Enter")
    expect(metric).to_have_text(re.compile(r"^0(\.0+)?%$"), timeout=30_000)
    print(f"\nthreshold sweep: ρ {start} → 0.0195: updates eliminated {before} → {after}")


# ---- distributions: record moves, a shared URL reopens the same view ----------------------------------------
def test_distributions_record_move_and_shared_url(page, browser, server):
    from playwright.sync_api import expect

    open_page(page, server, "distributions?run=example-mnist1d-mlp-2b-lts", "Distributions", plot=True)
    frozen = B.metric_locator(page, "Frozen")
    expect(frozen).to_be_visible()
    before = frozen.inner_text().strip()
    thumb = B.slider_thumb(page, "Record (epoch)")
    thumb.focus()
    for _ in range(6):
        page.keyboard.press("ArrowRight")
    expect(frozen).not_to_have_text(before, timeout=30_000)
    B.wait_idle(page)
    assert page.locator(B.CHART).count() >= 5, "heat map, histograms, weights, EMA, occupancy"
    assert_clean(page, server, "distributions after a record move")
    B.screenshot(page, "distributions-moved")
    view = (frozen.inner_text().strip(), B.slider_value(thumb))
    expect(page).to_have_url(re.compile(rf"record={re.escape(view[1])}"))  # the URL follows the control
    shared = page.url
    assert "run=example-mnist1d-mlp-2b-lts" in shared
    # a teacher shares the URL: a fresh browser opens the same view
    other = B.new_page(browser)
    try:
        other.goto(shared, wait_until="domcontentloaded")
        other.locator("h1").filter(has_text="Distributions").first.wait_for()
        B.wait_idle(other)
        expect(B.metric_locator(other, "Frozen")).to_have_text(view[0])
        assert B.slider_value(B.slider_thumb(other, "Record (epoch)")) == view[1]
        assert "example-mnist1d-mlp-2b-lts" in B.selectbox_value(other, "Run")
    finally:
        other.context.close()


# ---- the runs folder is polled; names from disk stay plain text ----------------------------------------------
def test_new_runs_appear_by_themselves_and_names_are_text(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "runs", "Runs", plot=True)
    count = B.metric_locator(page, "Runs")
    n = int(count.inner_text())
    hostile = "![x](t.png)"
    src = next(p for p in sorted(server.runs_dir.glob("example-*")) if p.is_dir())
    shutil.copytree(src, server.runs_dir / hostile)
    try:
        expect(count).to_have_text(str(n + 1), timeout=20_000)   # no click: the page polls the folder
        expect(page.get_by_text(hostile, exact=True).first).to_be_attached()  # a table cell, as typed
        assert page.locator("img[src*='t.png']").count() == 0
        B.screenshot(page, "runs-polled")
    finally:
        shutil.rmtree(server.runs_dir / hostile)
    expect(count).to_have_text(str(n), timeout=20_000)


# ---- train a short run, see it on the Runs page ----------------------------------------------------------
def test_train_short_run(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "train", "Train", plot=False)
    tab = page.locator("[role='tabpanel']:visible").first
    # the data folder: asked for the datasets read from files, checked before anything starts
    B.choose(page, "Dataset", "mnist", exact=True)
    folder = tab.get_by_label("Data folder", exact=False).first
    expect(folder).to_be_visible()
    tab.get_by_role("button", name="Start training").click()
    B.wait_idle(page)
    expect(page.locator("[data-testid='stAlertContentError']").filter(has_text="needs a data folder")).to_be_visible()
    B.screenshot(page, "train-data-folder")
    B.choose(page, "Dataset", "digits", exact=True)
    expect(folder).to_have_count(0)
    for label, value in (("QAT epochs", "2"), ("FP pre-training epochs", "1"), ("Run name", RUN_NAME)):
        box = tab.get_by_role("textbox", name=label) if label == "Run name" else B.number_input(page, label)
        expect(box).to_be_visible()
        box.fill(value)
        box.press("Enter")
        B.wait_idle(page)
    expect(tab.locator("[data-testid='stCode']").first).to_contain_text(f"--epochs 2")
    expect(tab.locator("[data-testid='stCode']").first).to_contain_text(RUN_NAME)
    B.screenshot(page, "train-form")
    t0 = time.perf_counter()
    tab.get_by_role("button", name="Start training").click()

    done = page.locator("[data-testid='stAlertContentSuccess']").filter(has_text=re.compile("complete", re.I))
    failed = page.locator("[data-testid='stAlertContentError']").or_(
        page.locator("[data-testid='stAlertContentWarning']").filter(has_text=re.compile("interrupted", re.I)))
    expect(done.or_(failed).first).to_be_visible(timeout=120_000)
    assert not failed.count(), f"training did not complete: {failed.first.inner_text()}\n{server.log_tail()}"
    took = time.perf_counter() - t0
    expect(page.get_by_text(RUN_NAME).first).to_be_visible()
    B.wait_idle(page)
    assert_clean(page, server, "train after the run")
    B.screenshot(page, "train-complete")

    manifest = json.loads((server.runs_dir / RUN_NAME / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["epochs"] == 2 and manifest["config"]["fp_epochs"] == 1
    print(f"\ntraining {RUN_NAME}: complete in the browser after {took:.1f} s")

    # the new run appears on the Runs page (same session, through the sidebar)
    B.nav_link(page, "Runs").click()
    expect(page.locator("h1").filter(has_text="Runs").first).to_be_visible()
    B.wait_idle(page)
    n_examples = len([p for p in server.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]) - 1
    expect(B.metric_locator(page, "Runs")).to_have_text(str(n_examples + 1))
    # the run picker of "One run" offers it; choosing it shows its figures
    B.choose(page, "Run", RUN_NAME)
    assert RUN_NAME in B.selectbox_value(page, "Run")
    B.wait_idle(page)
    expect(page.locator("[data-testid='stMarkdownContainer']").filter(has_text=RUN_NAME).first).to_be_visible()
    expect(page.locator(B.PLOT).first).to_be_visible()
    assert_clean(page, server, "runs page with the new run")
    B.screenshot(page, "runs-with-new-run")
