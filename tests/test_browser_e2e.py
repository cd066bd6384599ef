"""End-to-end test of the scratchoff Streamlit app in a real headless Chromium.

The app is started with `streamlit run` on a free port over a temporary copy of the shipped example runs
($SCRATCHOFF_RUNS) and an empty data folder ($SCRATCHOFF_DATA; digits is generated offline), then driven
through Playwright with Debian's Chromium (/usr/bin/chromium; `playwright install` is not needed).

Screenshots of every step land in <repo>/screenshots/ (git-ignored).

Run:  python -m pytest tests/test_browser_e2e.py -q -x -s          (or  -m browser)
"""
from __future__ import annotations

import json
import re
import time

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


@pytest.fixture
def page(browser, server):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        ctx.close()


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
@pytest.mark.parametrize("url_path,title,plot", B.PAGES, ids=[p[0] for p in B.PAGES])
def test_page_renders(page, server, url_path, title, plot):
    """Each page opened by its URL path renders its title (and a chart) without a traceback."""
    open_page(page, server, url_path, title, plot)
    assert_clean(page, server, url_path)
    i = [p[0] for p in B.PAGES].index(url_path)
    B.screenshot(page, f"{i + 1:02d}-{url_path}")


def test_sidebar_navigation(page, server):
    """The st.navigation sidebar links reach every page within one session (URL and title follow)."""
    from playwright.sync_api import expect

    open_page(page, server, "", "Runs", plot=True)  # the default page
    for url_path, title, plot in B.PAGES:
        link = B.nav_link(page, title)
        expect(link).to_be_visible()
        link.click()
        # the default page (st.Page(default=True)) lives at the root URL
        path_re = rf"/({url_path})?/?$" if url_path == B.PAGES[0][0] else rf"/{url_path}/?$"
        expect(page).to_have_url(re.compile(path_re))
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


# ---- threshold sweep: the slider drives the replay ---------------------------------------------------------
def test_threshold_slider_updates_metric(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "sweep", "Threshold sweep", plot=True)
    metric = B.metric_locator(page, "Updates eliminated")
    expect(metric).to_be_visible()
    before = metric.inner_text().strip()
    thumb = B.slider_thumb(page, "Threshold ratio")
    start = B.slider_value(thumb)
    B.screenshot(page, "sweep-before")

    thumb.focus()
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    expect(metric).not_to_have_text(before, timeout=30_000)
    B.wait_idle(page)
    moved = B.slider_value(thumb)
    after = metric.inner_text().strip()
    assert moved != start, f"the threshold slider did not move ({start})"
    assert after != before, f"'Updates eliminated' stayed {before} after moving ρ {start} → {moved}"
    assert_clean(page, server, "sweep after the slider move")
    B.screenshot(page, "sweep-after")

    # the extreme: ρ = 0 freezes nothing at all
    thumb.focus()
    page.keyboard.press("Home")
    expect(metric).to_have_text(re.compile(r"^0(\.0+)?%$"), timeout=30_000)
    B.wait_idle(page)
    assert float(B.slider_value(thumb)) == 0.0
    print(f"\nthreshold sweep: ρ {start} → {moved}: updates eliminated {before} → {after}; ρ 0 → "
          f"{metric.inner_text().strip()}")


# ---- train a short run, see it on the Runs page ----------------------------------------------------------
def test_train_short_run(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "train", "Train", plot=False)
    form = page.locator("[data-testid='stForm']").filter(has=page.get_by_role("button", name="Start training"))
    expect(form).to_be_visible()
    for label, value in (("QAT epochs", "2"), ("FP pre-training epochs", "1"), ("Run name", RUN_NAME)):
        box = form.get_by_label(label, exact=False).first
        expect(box).to_be_visible()
        box.fill(value)
        box.blur()
    B.screenshot(page, "train-form")
    t0 = time.perf_counter()
    form.get_by_role("button", name="Start training").click()

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
    n_examples = len(list(B.EXAMPLE_RUNS.glob("example-*")))
    expect(B.metric_locator(page, "Runs")).to_have_text(str(n_examples + 1))
    # the run picker of "One run" offers it; choosing it shows its figures
    B.choose(page, "Run", RUN_NAME)
    assert RUN_NAME in B.selectbox_value(page, "Run")
    B.wait_idle(page)
    expect(page.locator("[data-testid='stMarkdownContainer']").filter(has_text=RUN_NAME).first).to_be_visible()
    expect(page.locator(B.PLOT).first).to_be_visible()
    assert_clean(page, server, "runs page with the new run")
    B.screenshot(page, "runs-with-new-run")
