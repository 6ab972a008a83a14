"""The connect flow in a real browser (Playwright driving Debian's chromium).

An operator opens the relay, clicks "Connect Stora", approves on the sandbox's consent
page and lands on the connected page listing their sites.  With
``STORA_RELAY_SCREENSHOTS=DIR`` the test saves each page as a PNG in DIR
(``scripts/partner-review-screenshots`` regenerates ``docs/partner-review/`` that way,
so the screenshots never go stale).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from tests.support.browser import chromium, shoot
from tests.support.relay_stack import Stack, relay_stack

browser = pytest.fixture(scope="module")(chromium)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(tmp_path / "relay") as s:
        yield s


def test_an_operator_connects_in_a_browser(browser: Browser, stack: Stack) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(stack.relay.url + "/")
    assert page.title() == "Connect Stora · TestEntry"
    assert page.locator("#scopes").inner_text().count("public.") == len(
        stack.services.config.stora.scopes)
    shoot(page, "1-connect-page")
    page.click("#connect")
    page.wait_for_url(stack.sandbox.url + "/oauth2/authorize?*")
    page.select_option("select#operator", "acme")
    shoot(page, "2-stora-consent")
    page.click("button#approve")
    page.wait_for_url(stack.relay.url + "/oauth/callback?*")
    assert "Your Stora account is connected" in page.locator("#connected").inner_text()
    assert "Acme North" in page.locator("#sites").inner_text()
    shoot(page, "3-connected")
    page.goto(stack.relay.url + "/")  # the session cookie keeps the operator's page
    assert page.locator("#status").inner_text() == "connected"
    page.close()
    assert len(stack.services.operators.list()) == 1


def test_denying_in_a_browser_shows_why_and_stores_nothing(browser: Browser,
                                                          stack: Stack) -> None:
    page = browser.new_page()
    page.goto(stack.relay.url + "/")
    page.click("#connect")
    page.wait_for_url(stack.sandbox.url + "/oauth2/authorize?*")
    page.click("button#deny")
    page.wait_for_url(stack.relay.url + "/oauth/callback?*")
    assert "Stora was not connected" in page.locator("h1").inner_text()
    shoot(page, "4-denied")
    page.close()
    assert stack.services.operators.list() == []
