"""The board in a real browser: built from the committed entries, served on localhost, driven in headless Chromium
(Playwright with the system's Chromium; .ci/run installs Debian's chromium package)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading

import pytest

from kvp_gym_leaderboard.site import build_site
from kvp_gym_leaderboard.submission import ENTRIES

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(page, number of entries): the built board open in headless Chromium; console errors collected."""
    entries = [json.loads(f.read_text()) for f in sorted(ENTRIES.glob("*.json"))]
    site = tmp_path_factory.mktemp("board") / "site"
    build_site(entries, site)
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        tab = browser.new_page(viewport={"width": 1300, "height": 900})
        tab.errors = []
        tab.on("console", lambda message: tab.errors.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.on("requestfailed", lambda request: tab.errors.append(f"request failed: {request.url}"))
        tab.goto(f"http://127.0.0.1:{server.server_port}/index.html", wait_until="load")
        yield tab, len(entries)
        browser.close()
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


def test_page_loads_without_errors_and_lists_every_entry(page):
    tab, count = page
    assert tab.title() == "kvp-gym leaderboard"
    assert tab.locator("#board tbody tr").count() == count
    assert tab.errors == []


def test_clicking_a_header_reorders_the_rows(page):
    tab, _ = page

    def column(selector: str) -> list[str]:
        return tab.locator(selector).evaluate_all("cells => cells.map(c => c.dataset.value)")

    before = column("#board tbody td.name")
    tab.locator("#board th", has_text="method").click()
    descending = column("#board tbody td.name")
    assert descending == sorted(before, reverse=True) and descending != before
    tab.locator("#board th", has_text="method").click()
    assert column("#board tbody td.name") == sorted(before)
    tab.locator("#board th", has_text="holistic score").click()
    scores = [float(v) for v in column("#board tbody tr td:nth-child(4)")]
    assert scores == sorted(scores, reverse=True)
    assert tab.errors == []


def test_plots_are_present_and_drawn(page):
    tab, _ = page
    images = tab.locator("figure img")
    assert images.count() >= 3  # retained fraction, accuracy vs budget, heatmap
    for i in range(images.count()):
        size = images.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight, img.complete]")
        assert size[0] > 0 and size[1] > 0 and size[2], images.nth(i).get_attribute("src")
    assert tab.locator("#submit").is_visible()
