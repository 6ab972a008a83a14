"""The relay's MQTT link in a thread of its own, and a fake gateway for it to talk to.

:func:`make_relay` builds a relay on disk with an operator, registered sites and a
webhook secret, on a movable clock (:class:`Clock`), whose :meth:`Relay.link` is a
:class:`~relay.link.RelayLink` on the test's broker with fast timings (:data:`FAST`).
:class:`LinkRunner` runs :meth:`relay.link.RelayLink.run` on an event loop in a thread,
so a test reads like a script and waits with :func:`devkit.testing.wait_for`.
:class:`FakeGateway` is a paho client on ``P/S/cmd`` that reads each token's claims
(no signature check: the relay's signer is tested elsewhere), keeps a log of what
arrived, and answers as the test tells it, like a gateway does: a ``jti`` seen before
gets the first answer again with ``duplicate: true``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import select, update

from devkit.mosquitto import Broker
from relay.db.models import Command, UnitState
from relay.link import LinkTimings, RelayLink
from relay.operators import StoraSite
from relay.outbox import ResendPolicy
from relay.services import Services
from relay.stora import TokenSet
from relay.webhooks import sign
from sitelink.codes import Cmd
from sitelink.jws import b64decode
from sitelink.payloads import result_payload, rfc3339
from tests.support.relay import relay_on_disk

T = TypeVar("T")

PREFIX = "stora-gw"
SITE = "site_link1"
SITE2 = "site_link2"
#: Timings shrunk for tests: polls of 0.1 s, re-publish after 0.5 s, backoff ≤ 0.5 s.
FAST = LinkTimings(poll_s=0.1, republish_s=0.5, resend_scan_s=0.1, waiter_poll_s=0.1,
                   backoff_first_s=0.05, backoff_cap_s=0.5, keepalive_s=5, op_timeout_s=3,
                   shutdown_s=2, resend=ResendPolicy(first_s=0.3, cap_s=0.6))

#: What a gateway answers to a command's claims: ``(status, reason)``, or ``None`` for
#: no answer at all (a gateway that is away, or wedged).
Answer = Callable[[dict[str, Any]], tuple[str, str | None] | None]


def done(_claims: dict[str, Any]) -> tuple[str, str | None]:
    """The answer of a gateway that did it."""
    return "done", None


def silent(_claims: dict[str, Any]) -> None:
    """No answer."""
    return


def claims_of(token: bytes) -> dict[str, Any]:
    """The claims of a compact JWS, unchecked."""
    body = b64decode(token.split(b".")[1])
    assert body is not None
    claims: dict[str, Any] = json.loads(body)
    return claims


@dataclass(frozen=True)
class Received:
    """A command as it arrived at the fake gateway."""

    token: bytes
    claims: dict[str, Any]
    retain: bool
    at: float

    @property
    def jti(self) -> str:
        """The command id."""
        return str(self.claims["jti"])


class FakeGateway:
    """A paho client standing in for the site's gateway (resubscribes on reconnect)."""

    def __init__(self, broker: Broker, prefix: str, site: str, *,
                 answer: Answer = done) -> None:
        self.prefix, self.site = prefix, site
        self.answer = answer
        self.received: list[Received] = []
        self.answers: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._paho = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=f"fake-gw-{site}-{time.monotonic_ns()}",
                                 clean_session=True, protocol=paho.MQTTv311)
        self._paho.reconnect_delay_set(0.05, 0.5)
        self._paho.will_set(f"{prefix}/{site}/status", b'{"online":false}', 1, retain=True)
        self._paho.on_connect = self._on_connect
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_message = self._on_message
        self._paho.connect(broker.host, broker.port, keepalive=5)
        self._paho.loop_start()
        assert self._subscribed.wait(10), "the fake gateway did not subscribe"

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if not reason_code.is_failure:
            client.subscribe(f"{self.prefix}/{self.site}/cmd", 1)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        token = bytes(msg.payload)
        claims = claims_of(token)
        with self._lock:
            self.received.append(Received(token, claims, bool(msg.retain), time.monotonic()))
            first = self.answers.get(claims["jti"])
        if first is not None:
            self.publish_result({**first, "duplicate": True})
            return
        answered = self.answer(claims)
        if answered is None:
            return
        status, reason = answered
        result = result_payload(claims["jti"], claims["cmd"], claims["unit"], status, reason,
                                duplicate=False, state=None, at=time.time())
        with self._lock:
            self.answers[claims["jti"]] = result
            self.executed.append(claims["jti"])
        self.publish_result(result)

    def publish_result(self, result: dict[str, Any], *, site: str | None = None) -> None:
        """Publish a result (as this site, or as ``site``)."""
        self._paho.publish(f"{self.prefix}/{site or self.site}/cmd/result",
                           json.dumps(result), qos=1)

    def publish_status(self, payload: bytes | dict[str, Any], *, site: str | None = None
                       ) -> None:
        """Publish a retained status and wait for the broker's PUBACK."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self._paho.publish(f"{self.prefix}/{site or self.site}/status", data, qos=1,
                                  retain=True)
        info.wait_for_publish(5)

    def jtis(self) -> list[str]:
        """The ``jti`` of every command received, in order (repeats included)."""
        with self._lock:
            return [r.jti for r in self.received]

    def got(self) -> list[Received]:
        """A copy of what arrived so far."""
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        """Disconnect (no will) and stop paho's thread."""
        self._paho.disconnect()
        self._paho.loop_stop()


class LinkRunner:
    """``link.run()`` on an event loop of its own thread."""

    def __init__(self, link: RelayLink) -> None:
        self.link = link
        self.loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name="relay-link", daemon=True)
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.link.run())
        self._ready.set()
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def start(self) -> LinkRunner:
        """Start ``run`` (returns at once)."""
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the link's loop and wait for its value."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 15) -> float:
        """Cancel ``run``; the seconds it took to end."""
        began = time.monotonic()
        if self._task is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the link did not stop"
        assert self.error is None, f"run() ended with {self.error!r}"
        return time.monotonic() - began

    def __enter__(self) -> LinkRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Clock:
    """Wall time plus an offset the test moves (commands expire without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Relay:
    """A relay on disk, one operator with its sites, and helpers over its database."""

    services: Services
    operator: str
    clock: Clock
    broker: Broker
    webhook_key: str
    webhook_secret: str

    def link(self, **changes: float) -> RelayLink:
        mqtt = dataclasses.replace(self.services.config.mqtt, port=self.broker.port,
                                   client_id="relay-under-test")
        timings = dataclasses.replace(FAST, **changes)
        return RelayLink(mqtt, self.services.db, self.services.sites,
                         self.services.commands, clock=self.clock, timings=timings)

    def unlock(self, unit: str = "unit_1", site: str = SITE) -> str:
        with self.services.db.session() as s:
            row = self.services.commands.new(s, operator_id=self.operator, site_id=site,
                                             unit_id=unit, cmd=Cmd.UNLOCK, origin="api",
                                             dur=5)
            return row.jti

    def webhook(self, unit: str, status: str, ver_ms: int, site: str = SITE) -> str:
        body = json.dumps({"event": {
            "id": "evt_" + secrets.token_hex(8), "type": "unit.updated",
            "data": {"unit": {"id": unit, "status": status, "site": {"id": site},
                              "updated_at": rfc3339(ver_ms / 1000)}}}}).encode()
        verdict = self.services.webhooks.accept(
            self.webhook_key, body, sign(self.webhook_secret, int(self.clock()), body))
        assert verdict.status == 200, verdict
        return verdict.outcome

    def row(self, jti: str) -> Command:
        with self.services.db.session() as s:
            row = s.get(Command, jti)
            assert row is not None
            return row

    def rows(self, unit: str | None = None) -> list[Command]:
        query = select(Command).order_by(Command.created_at)
        if unit is not None:
            query = query.where(Command.unit_id == unit)
        with self.services.db.session() as s:
            return list(s.scalars(query).all())

    def intents(self, unit: str) -> list[Command]:
        """The unit's lockout and clear commands, oldest first."""
        return [r for r in self.rows(unit) if r.cmd in ("lockout", "clear_lockout")]

    def unit(self, unit: str) -> UnitState:
        with self.services.db.session() as s:
            state = s.get(UnitState, (self.operator, unit))
            assert state is not None
            return state

    def expire(self, jti: str) -> None:
        with self.services.db.session() as s:
            s.execute(update(Command).where(Command.jti == jti)
                      .values(expires_at=self.clock() - 1))

    def status(self, jti: str) -> str:
        return self.row(jti).status


def make_relay(directory: Path, broker: Broker, sites: tuple[str, ...] = (SITE, SITE2)
               ) -> Relay:
    on_disk = relay_on_disk(directory)
    clock = Clock()
    services = on_disk.services(clock=clock)
    operator = services.operators.connect(TokenSet("at", "rt", 7200, "", 0),
                                          [StoraSite(s, s) for s in sites])
    secret = secrets.token_hex(32)
    services.operators.set_webhook(operator, "we_test", secret)
    for site in sites:
        services.sites.add(site, operator)
    return Relay(services, operator, clock, broker, services.operators.webhook_key(operator),
                 secret)


def relay(tmp_path: Path, broker: Broker) -> Iterator[Relay]:
    """Fixture: a relay with sites :data:`SITE` and :data:`SITE2` on ``broker``."""
    parts = make_relay(tmp_path / "relay", broker)
    yield parts
    parts.services.close()


def gateway(broker: Broker) -> Iterator[FakeGateway]:
    """Fixture: a fake gateway of :data:`SITE` that answers ``done``."""
    gw = FakeGateway(broker, PREFIX, SITE)
    yield gw
    gw.close()
