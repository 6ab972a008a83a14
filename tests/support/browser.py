"""Playwright with Debian's chromium, for the relay's browser tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"


def chromium() -> Iterator[Browser]:
    """Fixture body: a headless chromium for the module's tests."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox"])
        yield browser
        browser.close()


def shoot(page: Page, name: str) -> None:
    """With ``STORA_RELAY_SCREENSHOTS=DIR``, the page as ``DIR/<name>.png`` (the partner
    review's screenshots are made this way, so they never go stale)."""
    directory = os.environ.get("STORA_RELAY_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(directory) / f"{name}.png"), full_page=True)
