"""The operator's live view (issue 15) in a real browser (Playwright driving Debian's
chromium), on both databases.

The relay's pages and the sandbox as Stora (tests/support/relay_stack.py), and beside
them the relay's MQTT link on a real Mosquitto with a fake gateway for ``site_acme1``:
an overlock set in the sandbox reaches the relay as a webhook, becomes a lockout that
the gateway confirms, and shows on the page; the gateway going offline shows by the
page's own reload (``REFRESH_S``), with nobody touching the browser; and the page's
figures are the database's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page
from sqlalchemy import func, select

from devkit.mosquitto import Broker
from devkit.testing import wait_for
from relay.db.models import Command, Operator, OperatorSite, Site, UnitState
from relay.link import RelayLink
from relay.liveview import SITES_PER_PAGE
from relay.web import REFRESH_S
from tests.support.browser import chromium, shoot
from tests.support.relay_gateway import FAST, PREFIX, FakeGateway, LinkRunner
from tests.support.relay_stack import Stack, relay_stack

SITE = "site_acme1"


browser = pytest.fixture(scope="module")(chromium)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(tmp_path / "relay") as s:
        yield s


def connected_page(browser: Browser, stack: Stack) -> Page:
    """The operator connects in the browser (approved at once); the connected page."""
    stack.sandbox.set_consent("acme", auto="approve")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(stack.relay.url + "/connect")
    page.wait_for_url(stack.relay.url + "/oauth/callback?*")
    # The page reloads itself at /, never at the spent callback URL.
    assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == \
        f"{REFRESH_S}; url=/"
    return page


def cell(page: Page, row: str, column: int) -> str:
    return page.locator(f"{row} td:nth-child({column})").inner_text().strip()


def test_an_overlock_and_a_gateway_going_offline_show_and_the_figures_are_the_databases(
        browser: Browser, stack: Stack, broker: Broker) -> None:
    page = connected_page(browser, stack)
    operator = stack.services.operators.list()[0].id
    stack.services.sites.add(SITE, operator)
    mqtt = dataclasses.replace(stack.services.config.mqtt, port=broker.port,
                               client_id="relay-liveview")
    link = RelayLink(mqtt, stack.services.db, stack.services.sites, stack.services.commands,
                     timings=FAST)
    gateway = FakeGateway(broker, PREFIX, SITE)
    try:
        with LinkRunner(link):
            wait_for(lambda: link.connected, 10, "the relay's link is up")
            gateway.publish_status({"online": True, "version": "1.0",
                                    "outbox": {"pending": 3, "dead": 1}})
            wait_for(lambda: (stack.services.sites.get(SITE) or _never()).online is True,
                     10, "the relay has the gateway's status")
            page.goto(stack.relay.url + "/")
            row = f"#sites tr[data-site={SITE}]"
            assert cell(page, row, 2) == "online"
            assert cell(page, row, 4) == "3 (1 refused)"
            assert "No unit is locked out" in page.locator("#lockouts").inner_text()

            # An overlock in Stora: a webhook, a lockout, the gateway confirms it.
            stack.sandbox.set_unit_status("unit_acme2", "overlocked")
            wait_for(lambda: _confirmed(stack, "unit_acme2"), 15,
                     "the lockout reached the gateway and was confirmed")
            page.reload()
            lockout = "#lockouts tr[data-unit=unit_acme2]"
            assert cell(page, lockout, 2) == SITE
            assert cell(page, lockout, 3) == "overlocked"
            assert cell(page, lockout, 5) == "locked out"
            assert cell(page, row, 5) == "1"
            assert page.locator("#lockout-count").inner_text() == "1"
            command = page.locator("#commands tr[data-command]").first
            assert "lockout" in command.inner_text()
            assert "done" in command.inner_text()

            # The gateway goes away: its last will says offline; the page reloads itself.
            gateway.publish_status({"online": False})
            page.wait_for_function(
                f"document.querySelector('{row} td:nth-child(2)')"
                ".innerText.trim() === 'offline'", timeout=(REFRESH_S + 5) * 1000)
            assert page.locator("#offline").inner_text() == "1"
            shoot(page, "5-live-view")
            figures_match_the_database(page, stack, operator)
    finally:
        gateway.close()


def _never() -> object:
    raise AssertionError("site not registered")


def _confirmed(stack: Stack, unit: str) -> bool:
    with stack.services.db.read() as s:
        state = s.get(UnitState, (stack.services.operators.list()[0].id, unit))
        return state is not None and state.lockout and (state.confirmed_ver or 0) >= state.ver


def figures_match_the_database(page: Page, stack: Stack, operator: str) -> None:
    with stack.services.db.read() as s:
        online = s.scalar(select(func.count()).select_from(Site).where(
            Site.operator_id == operator, Site.online.is_(True)))
        offline = s.scalar(select(func.count()).select_from(Site).where(
            Site.operator_id == operator, Site.online.is_(False)))
        lockouts = s.scalar(select(func.count()).select_from(UnitState).where(
            UnitState.operator_id == operator, UnitState.lockout.is_(True)))
        commands = s.scalars(select(Command.jti).where(Command.operator_id == operator)
                             .order_by(Command.created_at.desc())).all()
        sent = s.scalar(select(Operator.timeline_sent).where(Operator.id == operator))
    shown = {key: page.locator(f"#{key}").inner_text()
             for key in ("online", "offline", "lockout-count", "timeline-sent", "site-count")}
    assert shown == {"online": str(online), "offline": str(offline),
                     "lockout-count": str(lockouts), "timeline-sent": str(sent),
                     "site-count": "2"}
    rows = page.locator("#commands tr[data-command]")
    assert [rows.nth(i).get_attribute("data-command") for i in range(rows.count())] == \
        list(commands)[:25]


def test_a_thousand_sites_are_paged_and_each_page_is_the_databases(
        browser: Browser, stack: Stack) -> None:
    """1,000 sites as Stora would list them (written straight to the database): the
    page shows 50 of them, by name, with working next and previous links."""
    page = connected_page(browser, stack)
    operator = stack.services.operators.list()[0].id
    names = [(f"site_bulk{i:04d}", f"Bulk {i:04d}") for i in range(998)]
    with stack.services.db.session() as s:
        s.add_all(OperatorSite(site_id=site, operator_id=operator, name=name, seen_at=0)
                  for site, name in names)
    page.goto(stack.relay.url + "/?page=2")
    rows = page.locator("#sites tr[data-site]")
    assert rows.count() == SITES_PER_PAGE
    everything = sorted([*names, ("site_acme1", "Acme North"), ("site_acme2", "Acme South")],
                        key=lambda pair: (pair[1], pair[0]))
    assert [rows.nth(i).get_attribute("data-site") for i in range(rows.count())] == \
        [site for site, _ in everything[SITES_PER_PAGE:2 * SITES_PER_PAGE]]
    assert "Page 2 of 20." in page.locator("#pages").inner_text()
    page.click("#pages a[rel=next]")
    assert "Page 3 of 20." in page.locator("#pages").inner_text()
    assert page.locator("#site-count").inner_text() == "1000"


def test_staff_sign_in_with_an_admin_key_see_every_operator_and_lose_it_when_revoked(
        browser: Browser, stack: Stack) -> None:
    stack.connect()
    operator = stack.services.operators.list()[0].id
    _, staff_key = stack.services.api_keys.create(operator, "front desk", "staff")
    admin, admin_key = stack.services.api_keys.create(None, "support", "admin")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(stack.relay.url + "/staff")
    assert page.locator("#login").is_visible()
    page.fill("#key", staff_key)  # an operator's staff key is not an admin key
    page.click("#login")
    assert "does not open the staff pages" in page.locator("#refused").inner_text()
    page.fill("#key", admin_key)
    page.click("#login")
    page.wait_for_url(stack.relay.url + "/staff")
    assert page.locator("#operator-count").inner_text() == "1 operator."
    row = page.locator(f"#operators tr[data-operator={operator}]")
    assert "connected" in row.inner_text()
    row.locator("a").click()
    page.wait_for_url(f"{stack.relay.url}/staff/operators/{operator}")
    assert page.locator("#staff-banner").is_visible()
    assert page.locator("#site-count").inner_text() == "2"
    assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == \
        f"{REFRESH_S}; url=/staff/operators/{operator}"
    # The operator's own page is not the staff's: no operator session here.
    page.goto(stack.relay.url + "/")
    assert page.locator("#connect").is_visible()
    stack.services.api_keys.revoke(admin.id)
    page.goto(f"{stack.relay.url}/staff/operators/{operator}")
    page.wait_for_url(stack.relay.url + "/staff")
    assert page.locator("#login").is_visible()


def test_the_staff_pages_refuse_without_a_session_and_the_cookie_cannot_be_forged(
        stack: Stack) -> None:
    stack.connect()
    operator = stack.services.operators.list()[0].id
    http = stack.browser
    assert "Admin key" in http.get("/staff").text
    assert http.get(f"/staff/operators/{operator}").status_code == 303
    http.cookies.set("relay_staff", "v1.x.forged", path="/staff")
    assert "Admin key" in http.get("/staff").text
    answer = http.post("/staff/login", content=b"key=srk_nope.nope",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 401
    assert http.post("/staff/login", content=b"key=" + b"x" * 5000,
                     headers={"Content-Type": "application/x-www-form-urlencoded"}
                     ).status_code == 401
