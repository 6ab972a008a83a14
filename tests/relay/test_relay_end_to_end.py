"""Webhooks to a site's lockouts end to end: the relay's app and MQTT link on a real
Mosquitto, signed deliveries over HTTP, a gateway that keeps each unit's lockout with
its ``ver`` as the real one does (a command not newer than the unit's ``ver`` is refused
``stale_version``).

Issue 14's acceptance: 100 overlock/clear changes across 10 units, delivered in random
order with duplicates, end with every unit's lockout at the gateway equal to its last
Stora status.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.mosquitto import Broker
from devkit.relay_site import AppServer
from devkit.testing import wait_for
from relay.server import build
from relay.webhooks import LOCKOUT_STATUSES, sign
from sitelink.payloads import rfc3339
from tests.support.relay_gateway import FAST, PREFIX, SITE, FakeGateway, Relay, make_relay

UNITS = [f"unit_{i}" for i in range(10)]
T0 = 1_790_000_000_000


class LockoutKeeper:
    """A gateway's lockout state per unit, by ``ver`` (contract §5)."""

    def __init__(self) -> None:
        self.lockout: dict[str, bool] = {}
        self.ver: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, claims: dict[str, Any]) -> tuple[str, str | None]:
        unit, ver = claims["unit"], claims.get("ver")
        with self.lock:
            if claims["cmd"] not in ("lockout", "clear_lockout"):
                return "done", None
            if ver is None or ver <= self.ver.get(unit, -1):
                return "rejected", "stale_version"
            self.ver[unit] = ver
            self.lockout[unit] = claims["cmd"] == "lockout"
        return "done", None


@pytest.fixture
def relay(tmp_path: Path, broker: Broker) -> Iterator[Relay]:
    parts = make_relay(tmp_path / "relay", broker)
    yield parts
    parts.services.close()


def test_changes_in_random_order_with_duplicates_end_at_each_units_last_status(
        relay: Relay, broker: Broker) -> None:
    keeper = LockoutKeeper()
    gateway = FakeGateway(broker, PREFIX, SITE, answer=keeper)
    services = dataclasses.replace(
        relay.services, config=dataclasses.replace(
            relay.services.config, mqtt=dataclasses.replace(
                relay.services.config.mqtt, port=broker.port, client_id="relay-e2e")))
    running = build(services, timings=FAST, reconcile_interval_s=3600)
    rng = random.Random(1414)
    changes: list[tuple[str, str, int, str]] = []
    last: dict[str, str] = {}
    for i in range(100):
        unit = UNITS[i % 10]
        status = rng.choice(["overlocked", "occupied", "repossessed", "available"])
        changes.append((unit, status, T0 + i * 1000, f"evt_e2e_{i}"))
        last[unit] = status
    deliveries = changes + rng.sample(changes, 30)
    rng.shuffle(deliveries)
    try:
        with AppServer(running.app, services.config.relay.listen_port) as server, \
                httpx.Client(base_url=server.url, timeout=10) as http:
            for unit, status, ms, event_id in deliveries:
                body = json.dumps({"event": {"id": event_id, "type": "unit.updated", "data": {
                    "unit": {"id": unit, "status": status, "site": {"id": SITE},
                             "updated_at": rfc3339(ms / 1000)}}}}).encode()
                answer = http.post(f"/webhooks/stora/{relay.webhook_key}", content=body,
                                   headers={"X-Stora-Signature": sign(
                                       relay.webhook_secret, int(relay.clock()), body)})
                assert answer.status_code == 200, answer.text

            def settled() -> bool:
                with keeper.lock:
                    return all(keeper.lockout.get(u, False) == (s in LOCKOUT_STATUSES)
                               for u, s in last.items())

            wait_for(settled, timeout=30, what="every unit's lockout at the gateway")
            # The relay stops sending once each unit's newest intent is confirmed, and
            # nothing older arrives later to undo it.
            wait_for(lambda: not [r for u in UNITS for r in relay.intents(u)
                                  if r.status == "pending"],
                     timeout=30, what="lockouts and clears still pending")
            settled_at = len(gateway.got())
            threading.Event().wait(1.0)  # a few of the link's re-send scans (0.1 s)
            assert settled()
            assert len(gateway.got()) == settled_at
    finally:
        gateway.close()
    for unit, status in last.items():
        assert keeper.lockout.get(unit, False) == (status in LOCKOUT_STATUSES), unit
    # Only versions Stora sent were ever applied at the gateway.
    sent = {ms for _, _, ms, _ in changes}
    assert set(keeper.ver.values()) <= sent


def test_a_clear_missed_while_the_site_was_revoked_is_sent_once_it_is_back(
        relay: Relay, broker: Broker) -> None:
    """Found in review: a lockout's end arriving while the site's credential is being
    replaced (revoked, then added again) made no command, and the unit stayed locked out
    at the gateway for good."""
    keeper = LockoutKeeper()
    gateway = FakeGateway(broker, PREFIX, SITE, answer=keeper)
    services = dataclasses.replace(
        relay.services, config=dataclasses.replace(
            relay.services.config, mqtt=dataclasses.replace(
                relay.services.config.mqtt, port=broker.port, client_id="relay-e2e")))
    running = build(services, timings=FAST, reconcile_interval_s=3600)
    try:
        with AppServer(running.app, services.config.relay.listen_port):
            relay.webhook("unit_7", "overlocked", T0)
            running.link.notify()
            wait_for(lambda: keeper.lockout.get("unit_7") is True, timeout=10,
                     what="the lockout at the gateway")
            services.sites.revoke(SITE)
            assert relay.webhook("unit_7", "occupied", T0 + 1000) == "unregistered_site"
            services.sites.add(SITE, relay.operator)  # a new credential
            wait_for(lambda: keeper.lockout.get("unit_7") is False, timeout=10,
                     what="the clear at the gateway")
    finally:
        gateway.close()
    assert keeper.ver["unit_7"] == T0 + 1000
