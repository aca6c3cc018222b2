"""Real-browser smoke tests: Playwright drives Debian's chromium against `cmbbench leaderboard`
started as a subprocess on 127.0.0.1.

Marked ``e2e`` (not ``slow``): the default selection and CI run them. Without chromium
(``apt-get install chromium``) or the playwright package they skip and say why; never run
``playwright install``. Screenshots are saved under pytest's temporary folder and copied to
``$CMBBENCH_ARTIFACTS`` when it is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from leaderboard_store import SCRIPT_NAME, SYNTH, build_store

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium executable: install Debian's package (apt-get install -y "
                "chromium) to run the real-browser tests", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed (pip install "
                                      "-e '.[dev]')")
pytest.importorskip("streamlit", reason="the [leaderboard] extra is not installed")

TIMEOUT_MS = 60_000  # a loaded 2-core machine: plotly.js alone can take seconds to load
sync_api.expect.set_options(timeout=TIMEOUT_MS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmbbench() -> list[str]:
    exe = Path(sys.executable).with_name("cmbbench")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "cmbbench.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    url = build_store(root / "store")
    port = _free_port()
    logfile = (root / "server.log").open("w")
    proc = subprocess.Popen([*_cmbbench(), "leaderboard", "--db", url, "--port", str(port)],
                            stdout=logfile, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cmbbench leaderboard exited with {proc.returncode}:\n"
                            f"{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from {base}:\n{(root / 'server.log').read_text()}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM,
                               args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.goto(server)
    sync_api.expect(pg.get_by_role("heading", name="Leaderboard")).to_be_visible()
    yield pg
    assert not dialogs, f"a script ran in the page: {dialogs}"  # e.g. an injected alert()
    ctx.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def screenshot(page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("CMBBENCH_ARTIFACTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    log.info("screenshot %s", path)
    return path


def expect_rows(page, n: int) -> None:
    """Wait until the first data grid (the leaderboard) has ``n`` rows besides its header
    (read from the grid's accessible table, which the browser keeps visually hidden)."""
    grid = page.locator("table[role=grid]").first
    sync_api.expect(grid).to_have_attribute("aria-rowcount", str(n + 1))


def choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def nav(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()


def test_leaderboard_renders_and_a_filter_click_changes_the_table(page, artifacts):
    grid = page.locator("table[role=grid]").first
    expect_rows(page, 1)  # the default board: the newest ranked run's (DOU-v1, one method)
    choose(page, "Dataset", SYNTH)
    expect_rows(page, 4)
    # the <script> method name is shown as literal text (and no dialog opened)
    sync_api.expect(grid).to_contain_text(SCRIPT_NAME)
    sync_api.expect(grid).to_contain_text("0.600 [0.500, 0.700]")
    shot = screenshot(page, artifacts, "leaderboard")
    assert shot.stat().st_size > 10_000
    page.get_by_role("checkbox", name="scored").click(force=True)
    expect_rows(page, 3)
    sync_api.expect(grid).not_to_contain_text(SCRIPT_NAME)
    sync_api.expect(page.get_by_text("3 ranked rows", exact=False)).to_be_visible()


def test_froc_chart_renders_in_the_browser(page, artifacts):
    choose(page, "Dataset", SYNTH)
    nav(page, "FROC & PR curves")
    plots = page.locator(".js-plotly-plot")
    sync_api.expect(plots.first).to_be_visible()
    assert plots.count() == 2
    froc = plots.first
    sync_api.expect(froc.locator(".scatterlayer .trace")).to_have_count(4)
    legend = froc.locator(".legendtext").all_text_contents()
    assert f"{SCRIPT_NAME}@1 (scored)" in legend  # shown literally, not parsed
    screenshot(page, artifacts, "froc")


def test_drilldown_shows_the_scan_image(page, artifacts):
    choose(page, "Dataset", SYNTH)
    nav(page, "Scan drill-down")
    img = page.get_by_test_id("stImage").locator("img").first
    sync_api.expect(img).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    assert img.evaluate("img => img.naturalWidth") >= 512
    sync_api.expect(page.get_by_text("TP 1 · FP 1 · FN 1 in this scan")).to_be_visible()
    screenshot(page, artifacts, "drilldown")


def test_method_page_shows_a_script_tag_as_text(page, artifacts):
    nav(page, "Methods")
    choose(page, "Method", f"{SCRIPT_NAME}@1")
    sync_api.expect(page.get_by_text(f"{SCRIPT_NAME} (version 1)", exact=True)).to_be_visible()
    sync_api.expect(page.get_by_text(f"manifest text {SCRIPT_NAME}", exact=True)).to_be_visible()
    injected = page.evaluate("[...document.querySelectorAll('script')]"
                             ".filter(s => s.textContent.includes('alert(1)')).length")
    assert injected == 0
    screenshot(page, artifacts, "method")
