"""Webhook intake over real HTTP (contract §7.3): forgeries refused with no effect,
duplicates and reordered events without a second or wrong effect, the lockout intent
and the command recorded in the same transaction as the dedupe row."""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from relay.db.models import Command, UnitState, WebhookEvent
from relay.operators import Operators, StoraSite
from relay.stora import TokenSet
from relay.webhooks import LOCKOUT_STATUSES, MAX_BODY_BYTES, sign, unit_ver
from sitelink.payloads import rfc3339
from tests.support.relay import RelayServer, metric, relay_on_disk

SITE = "site_web1"
OTHER_SITE = "site_unregistered"


@dataclass
class Hooked:
    server: RelayServer
    http: httpx.Client
    key: str
    secret: str
    operator: str

    def deliver(self, unit: str, status: str, updated_ms: int, *, site: str = SITE,
                event_id: str | None = None, t: int | None = None,
                secret: str | None = None, key: str | None = None,
                body: bytes | None = None) -> httpx.Response:
        event = {"event": {"id": event_id or "evt_" + secrets.token_hex(8),
                           "type": "unit.updated", "api_version": "2025-09",
                           "created_at": rfc3339(time.time()),
                           "data": {"unit": {"id": unit, "status": status,
                                             "site": {"id": site},
                                             "updated_at": rfc3339(updated_ms / 1000)}}}}
        raw = body if body is not None else json.dumps(event).encode()
        header = sign(secret or self.secret, int(time.time()) if t is None else t, raw)
        return self.http.post(f"/webhooks/stora/{key or self.key}", content=raw,
                              headers={"X-Stora-Signature": header,
                                       "Content-Type": "application/json"})

    def counts(self) -> tuple[int, int]:
        with self.server.services.db.session() as s:
            return (s.scalar(select(func.count()).select_from(WebhookEvent)) or 0,
                    s.scalar(select(func.count()).select_from(Command)) or 0)

    def commands(self, unit: str) -> list[Command]:
        with self.server.services.db.session() as s:
            return list(s.scalars(select(Command).where(Command.unit_id == unit)
                                  .order_by(Command.created_at)).all())


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[Hooked]:
    relay = relay_on_disk(tmp_path / "relay")
    services = relay.services()
    operators: Operators = services.operators
    op = operators.connect(TokenSet("at", "rt", 7200, "", 0),
                           [StoraSite(SITE, "Web One"), StoraSite(OTHER_SITE, "Other")])
    secret = secrets.token_hex(32)
    operators.set_webhook(op, "we_test", secret)
    services.sites.add(SITE, op)
    with RelayServer(services) as server, httpx.Client(base_url=server.url) as http:
        yield Hooked(server, http, operators.webhook_key(op), secret, op)
    services.close()


def test_an_overlock_becomes_a_lockout_command_and_its_removal_a_clear(hooked: Hooked) -> None:
    t0 = 1_780_000_000_000
    answer = hooked.deliver("unit_1", "overlocked", t0)
    assert answer.status_code == 200
    assert answer.json()["outcome"] == "command"
    answer = hooked.deliver("unit_1", "occupied", t0 + 1000)
    assert answer.json()["outcome"] == "command"
    lockout, clear = hooked.commands("unit_1")
    assert (lockout.cmd, lockout.ver, lockout.status) == ("lockout", t0, "superseded")
    assert (clear.cmd, clear.ver, clear.status) == ("clear_lockout", t0 + 1000, "pending")
    assert clear.expires_at - clear.created_at <= 300
    assert hooked.deliver("unit_2", "occupied", t0).json()["outcome"] == "no_change"


def test_duplicates_and_older_events_have_no_effect(hooked: Hooked) -> None:
    t0 = 1_780_000_000_000
    first = hooked.deliver("unit_1", "overlocked", t0 + 5000, event_id="evt_same")
    again = hooked.deliver("unit_1", "overlocked", t0 + 5000, event_id="evt_same")
    assert (first.json()["outcome"], again.json()["outcome"]) == ("command", "duplicate")
    older = hooked.deliver("unit_1", "occupied", t0)  # Stora's order reversed
    assert older.status_code == 200
    assert older.json()["outcome"] == "older"
    assert [c.cmd for c in hooked.commands("unit_1")] == ["lockout"]
    assert hooked.counts() == (2, 1)


@pytest.mark.parametrize("forgery", ["bad_signature", "stale_t", "future_t", "unknown_key",
                                     "reserialised", "no_header", "other_secret"])
def test_forgeries_are_refused_401_and_change_nothing(hooked: Hooked, forgery: str) -> None:
    t0 = 1_780_000_000_000
    if forgery == "reserialised":
        # Signed over one serialisation, delivered as another (same JSON value).
        event = {"event": {"id": "evt_x", "type": "unit.updated", "data": {"unit": {
            "id": "unit_1", "status": "overlocked", "site": {"id": SITE},
            "updated_at": rfc3339(t0 / 1000)}}}}
        signed = json.dumps(event).encode()
        header = sign(hooked.secret, int(time.time()), signed)
        answer = hooked.http.post(f"/webhooks/stora/{hooked.key}",
                                  content=json.dumps(event, indent=1).encode(),
                                  headers={"X-Stora-Signature": header})
    elif forgery == "no_header":
        answer = hooked.http.post(f"/webhooks/stora/{hooked.key}", content=b"{}")
    elif forgery == "bad_signature":
        answer = hooked.deliver("unit_1", "overlocked", t0, secret=hooked.secret[::-1])
    elif forgery == "stale_t":
        answer = hooked.deliver("unit_1", "overlocked", t0, t=int(time.time()) - 301)
    elif forgery == "future_t":
        answer = hooked.deliver("unit_1", "overlocked", t0, t=int(time.time()) + 301)
    elif forgery == "unknown_key":
        answer = hooked.deliver("unit_1", "overlocked", t0, key="not-a-key")
    else:
        answer = hooked.deliver("unit_1", "overlocked", t0, secret=secrets.token_hex(32))
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] in {"bad_signature", "stale_timestamp",
                                              "unknown_endpoint"}
    assert hooked.counts() == (0, 0)


def test_an_unregistered_site_is_recorded_and_skipped(hooked: Hooked) -> None:
    answer = hooked.deliver("unit_9", "overlocked", 1_780_000_000_000, site=OTHER_SITE)
    assert answer.json()["outcome"] == "unregistered_site"
    assert hooked.counts() == (1, 0)


def test_an_oversized_body_is_refused_unread(hooked: Hooked) -> None:
    answer = hooked.deliver("unit_1", "overlocked", 1, body=b"x" * (256 * 1024 + 1))
    assert answer.status_code == 413
    assert hooked.counts() == (0, 0)


def test_random_order_with_duplicates_ends_at_each_units_last_status(hooked: Hooked) -> None:
    """100 changes over 10 units, shuffled, a quarter delivered twice: each unit's
    lockout intent is its last Stora status, and its newest command says so."""
    rng = random.Random(14)
    t0 = 1_780_000_000_000
    changes = []
    last: dict[str, str] = {}
    for i in range(100):
        unit = f"unit_{i % 10}"
        status = rng.choice(["overlocked", "occupied", "repossessed", "available"])
        changes.append((unit, status, t0 + i * 1000, f"evt_{i}"))
        last[unit] = status
    deliveries = changes + rng.sample(changes, 25)
    rng.shuffle(deliveries)
    for unit, status, ms, event_id in deliveries:
        assert hooked.deliver(unit, status, ms, event_id=event_id).status_code == 200
    with hooked.server.services.db.session() as s:
        states = {u.unit_id: u for u in s.scalars(select(UnitState)).all()}
    assert hooked.counts()[0] == 100
    for unit, status in last.items():
        assert states[unit].lockout == (status in LOCKOUT_STATUSES), unit
        assert states[unit].ver == max(ms for u, _, ms, _ in changes if u == unit)
        pending = [c for c in hooked.commands(unit) if c.status == "pending"]
        assert len(pending) <= 1
        if pending:
            assert pending[0].cmd == ("lockout" if status in LOCKOUT_STATUSES
                                      else "clear_lockout")
            assert pending[0].ver == states[unit].ver


def test_ver_is_updated_at_in_epoch_milliseconds() -> None:
    assert unit_ver("2026-12-07T10:00:00.123Z") == 1796637600123
    assert unit_ver("2026-12-07T10:00:00+01:00") == 1796634000000
    assert unit_ver("2026-12-07T10:00:00") is None  # no zone: refused, never guessed
    assert unit_ver(12) is None


def test_metrics_count_deliveries_by_outcome(hooked: Hooked) -> None:
    outcomes = ("command", "duplicate", "bad_signature", "older", "too_large")
    before = {o: metric(hooked.http, "stora_relay_webhooks_total", outcome=o)
              for o in outcomes}
    first = hooked.deliver("unit_m", "overlocked", 2_000_000_000_000, event_id="evt_m1")
    assert first.json()["outcome"] == "command"
    assert hooked.deliver("unit_m", "overlocked", 2_000_000_000_000,
                          event_id="evt_m1").json()["outcome"] == "duplicate"
    assert hooked.deliver("unit_m", "occupied", 1_000_000_000_000).json()["outcome"] == "older"
    assert hooked.deliver("unit_m", "occupied", 2_000_000_001_000,
                          secret="0" * 64).status_code == 401
    assert hooked.deliver("unit_m", "occupied", 2_000_000_002_000,
                          body=b"x" * (MAX_BODY_BYTES + 1)).status_code == 413
    after = {o: metric(hooked.http, "stora_relay_webhooks_total", outcome=o)
             for o in outcomes}
    assert {o: after[o] - before[o] for o in outcomes} == dict.fromkeys(outcomes, 1.0)
