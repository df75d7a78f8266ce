"""A built leaderboard site served on localhost and open in headless Chromium (Playwright with the system's
Chromium; .ci/run installs Debian's chromium package), for the tests that drive the board in a real browser."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

WINDOW = {"width": 1280, "height": 900}


@contextlib.contextmanager
def open_site(site: Path, viewport: dict[str, int] = WINDOW) -> Iterator:
    """The page ``site/index.html`` served from ``site``, open in a ``viewport``-sized tab; the console's errors, the
    page's exceptions and failed requests are collected in ``tab.errors``. Skips the test without Playwright or
    Chromium."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            )
            tab = browser.new_page(viewport=viewport)
            tab.errors = []
            tab.on("console", lambda message: tab.errors.append(message.text) if message.type == "error" else None)
            tab.on("pageerror", lambda error: tab.errors.append(str(error)))
            tab.on("requestfailed", lambda request: tab.errors.append(f"request failed: {request.url}"))
            tab.base_url = f"http://127.0.0.1:{server.server_port}/index.html"
            tab.goto(tab.base_url, wait_until="load")
            yield tab
            browser.close()
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass
