"""The relay's MQTT side (contract §4, §7.3): commands out, results and statuses in.

:class:`RelayLink` is one asyncio task, :meth:`RelayLink.run`, on the cloud broker of
``[mqtt]``.  While connected it runs two loops over one aiomqtt client:

* the **publisher** (the outbox of :mod:`relay.outbox`): every pending, unexpired row of
  ``commands`` not yet published goes to ``P/S/cmd``, QoS 1, never retained, payload the
  token; ``published_at`` is set once the broker's PUBACK is in.  It wakes on
  :meth:`RelayLink.notify` (called after a transaction that wrote a command commits)
  and polls every ``poll_s`` anyway, so a row written by another process or before a
  crash is never forgotten.  Rows still unanswered are published again with the *same*
  token: at once after each (re)connect, then every ``republish_s`` (the gateway runs a
  ``jti`` at most once); a lockout or clear left unconfirmed gets a new command (new
  ``jti``, same ``ver``: :func:`relay.outbox.resend_intents`), an unlock never does;
* the **reader**: ``P/+/cmd/result`` applied to the records (the site from the topic; a
  result for another site's command is ignored), ``P/+/status`` (retained) kept on the
  site's row for the operator page and ``sites list``.

A third loop, **housekeeping**, runs connected or not: pending rows past ``exp`` become
``timeout`` every ``poll_s``, and every ``waiter_poll_s`` the database is read for the
commands someone awaits in :meth:`RelayLink.wait_for_result` (a result applied by
another process is seen there too).

Connection failures never end :meth:`~RelayLink.run`: it reconnects forever, waiting a
full-jitter backoff (uniform in ``[0, min(cap, first·2ⁿ)]``, cap ``backoff_cap_s``),
and logs one line per drop and per reconnect (host, port, client id: never a
password).  Cancelling it disconnects cleanly within ``shutdown_s``.  All database work
runs in worker threads (``asyncio.to_thread``): the web app shares this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt

from relay.commands import Commands
from relay.config import MqttSection
from relay.db.engine import Database
from relay.outbox import Due, Outbox, ResendPolicy, Waiters
from relay.sites import SiteRegistry
from sitelink.errors import ClaimError, show
from sitelink.jws import strict_json
from sitelink.topics import Topics

__all__ = ["MAX_RESULT_BYTES", "MAX_STATUS_BYTES", "LinkStats", "LinkTimings", "RelayLink",
           "backoff_delay", "tls_context"]

LOGGER = logging.getLogger(__name__)
#: A result is a few hundred bytes (contract §4); anything over this is junk.
MAX_RESULT_BYTES: Final = 64 * 1024
#: The gateway's status is a small object; the site row keeps at most this.
MAX_STATUS_BYTES: Final = 16 * 1024
#: Statuses of sites not registered yet kept at most (a few KiB each; the oldest goes
#: first): gateways that came up before their `sites add`.
MAX_UNREGISTERED_STATUSES: Final = 2_000
#: Rows handed to the broker at once (paho queues beyond its in-flight window).
_PUBLISH_BATCH: Final = 50
#: Incoming messages kept while the database is slower than the broker.
_MAX_QUEUED_IN: Final = 10_000
#: Publishes in flight past which aiomqtt logs a warning (a restart's backlog is not one).
_PENDING_CALLS_WARNING = 1000


@dataclass(frozen=True, slots=True)
class LinkTimings:
    """Every timing of the link, named (tests shrink them instead of sleeping)."""

    #: Outbox poll and expiry sweep: a row committed elsewhere goes out within this.
    poll_s: float = 1.0
    #: Minimum gap between two publishes of one unanswered row.
    republish_s: float = 5.0
    #: How often unconfirmed lockouts are looked at (at once after a connect, or when a
    #: site comes online).
    resend_scan_s: float = 5.0
    #: How often the database is read for awaited results.
    waiter_poll_s: float = 0.5
    #: Full-jitter reconnect backoff: ``first_s · 2ⁿ``, at most ``cap_s`` (~30 s: a
    #: fleet of relays does not hammer a broker that comes back).
    backoff_first_s: float = 0.5
    backoff_cap_s: float = 30.0
    #: MQTT keepalive: a half-open connection is noticed within ~1.5× this.
    keepalive_s: int = 30
    #: CONNACK, SUBACK and PUBACK each within this, or the connection is given up.
    op_timeout_s: float = 10.0
    #: A cancelled run says goodbye to the broker within this.
    shutdown_s: float = 5.0
    #: With replicas: how long a command this link is publishing is its own (no other
    #: replica publishes it meanwhile); more than ``op_timeout_s``.
    publish_claim_s: float = 15.0
    resend: ResendPolicy = field(default_factory=ResendPolicy)


@dataclass
class LinkStats:
    """Counters since the link was made (tests and ``/metrics`` read them)."""

    connects: int = 0
    drops: int = 0
    published: int = 0
    republished: int = 0
    resent: int = 0
    results: int = 0
    ignored_results: int = 0
    statuses: int = 0
    timeouts: int = 0


def backoff_delay(attempt: int, first_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in ``[0, min(cap_s, first_s · 2^attempt)]``."""
    return rng.uniform(0.0, min(cap_s, first_s * 2.0 ** min(attempt, 30)))


def tls_context(section: MqttSection) -> ssl.SSLContext | None:
    """The TLS context of ``[mqtt]`` (``None`` when ``tls`` is off): the system's CAs or
    ``ca_file``, hostname checked, TLS 1.2 at least, a client certificate when given."""
    if not section.tls:
        return None
    context = ssl.create_default_context(
        cafile=str(section.ca_file) if section.ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if section.cert_file is not None:
        context.load_cert_chain(
            str(section.cert_file),
            str(section.key_file) if section.key_file is not None else None)
    return context


class _Flaky:
    """Logs the first failure of a streak with its traceback, the rest in one line."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self) -> None:
        if self.failing:
            LOGGER.warning("%s failed again", self.what, exc_info=False)
        else:
            LOGGER.exception("%s failed", self.what)
        self.failing = True

    def ok(self) -> None:
        if self.failing:
            LOGGER.info("%s works again", self.what)
        self.failing = False


class RelayLink:
    """The relay's MQTT link: see the module docstring.

    ``commands`` signs the lockouts and clears sent again; ``clock`` is wall time
    (seconds since the epoch), the one the command rows were written with.
    """

    def __init__(self, mqtt: MqttSection, db: Database, sites: SiteRegistry,
                 commands: Commands, *, clock: Callable[[], float] = time.time,
                 timings: LinkTimings | None = None, rng: random.Random | None = None) -> None:
        self._mqtt = mqtt
        self.timings = timings or LinkTimings()
        self._sites = sites
        self._outbox = Outbox(db, commands, policy=self.timings.resend,
                              claim_s=self.timings.publish_claim_s,
                              claim_batch=_PUBLISH_BATCH)
        self._clock = clock
        self._rng = rng or random.Random()
        self.stats = LinkStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._connected = False
        self._online: dict[str, bool] = {}
        self._kicked: set[str] = set()
        #: Retained statuses of sites not registered yet (site -> payload), oldest first.
        self._unregistered: dict[str, dict[str, Any]] = {}
        self._waiters = Waiters()
        self._db_trouble = _Flaky("the MQTT outbox's database work")

    # ------------------------------------------------------------------ hooks

    @property
    def connected(self) -> bool:
        """Whether the link is connected and subscribed right now."""
        return self._connected

    def notify(self) -> None:
        """A command was committed: publish now.  Thread-safe, never blocks; before
        :meth:`run` started it is not needed (its first pass publishes everything)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to wake
            loop.call_soon_threadsafe(wake.set)

    async def wait_for_result(self, jti: str, timeout: float) -> str | None:
        """The command's status once it is no longer ``pending`` (the gateway's
        ``done``/``rejected``/``failed``/``unknown``, or ``timeout``, ``superseded``), or
        ``None`` when it still is after ``timeout`` seconds.

        Await it on any event loop (the link's own or another thread's); it needs
        :meth:`run` running, which resolves it when the result arrives here or, within
        ``waiter_poll_s``, when the database shows one applied elsewhere.
        """
        return await self._waiters.wait(jti, timeout)

    def site_online(self, site_id: str) -> bool | None:
        """What the site's retained status says: ``True``/``False``, ``None`` when the
        site is not registered (or revoked) or its gateway was never heard.  Reads the
        database (call it from a worker thread in an async route)."""
        info = self._sites.get(site_id)
        if info is None or info.revoked_at is not None:
            return None
        return info.online

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Connect, serve, reconnect, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        t = self.timings
        where = f"{self._mqtt.host}:{self._mqtt.port}"
        housekeeping = asyncio.create_task(self._housekeeping(), name="relay-link-housekeeping")
        attempt = 0
        try:
            while True:
                _cancel_point()
                began = time.monotonic()
                was_up = self.stats.connects
                try:
                    await self._connection()
                except Exception as exc:  # noqa: BLE001 (any failure means: try again)
                    error: BaseException = exc
                else:  # pragma: no cover (_connection only ends by raising)
                    error = RuntimeError("connection ended")
                up = self.stats.connects > was_up
                if up and time.monotonic() - began >= t.backoff_cap_s:
                    attempt = 0
                delay = backoff_delay(attempt, t.backoff_first_s, t.backoff_cap_s, self._rng)
                attempt += 1
                self._log_failure(error, where, delay, dropped=up, first=attempt == 1 or up)
                await asyncio.sleep(delay)
        finally:
            self._connected = False
            await self._end([housekeeping])

    def _log_failure(self, error: BaseException, where: str, delay: float, *,
                     dropped: bool, first: bool) -> None:
        reason = _describe(error)
        if dropped:
            self.stats.drops += 1
            LOGGER.warning("MQTT link to %s lost (%s); reconnecting in %.1f s", where,
                           reason, delay)
        elif not isinstance(error, aiomqtt.MqttError | OSError):
            LOGGER.error("MQTT link to %s failed: %s; retrying in %.1f s", where, reason,
                         delay, exc_info=error)
        elif first:
            LOGGER.warning("MQTT link to %s cannot connect (%s); retrying with backoff "
                           "(at most %.0f s)", where, reason, self.timings.backoff_cap_s)
        else:
            LOGGER.debug("MQTT link to %s: still no connection (%s); next try in %.1f s",
                         where, reason, delay)

    def _client(self) -> aiomqtt.Client:
        m, t = self._mqtt, self.timings
        client = aiomqtt.Client(
            m.host, m.port, identifier=m.client_id, username=m.username or None,
            password=m.password if m.username else None, tls_context=tls_context(m),
            keepalive=t.keepalive_s, timeout=t.op_timeout_s, clean_session=True,
            max_queued_incoming_messages=_MAX_QUEUED_IN,
            # Nagle would hold a command until the broker's delayed ACK (~40 ms).
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),))
        # aiomqtt warns past 10 publishes in flight; the outbox sends batches of rows
        # (up to a few hundred after a restart), each awaited for its PUBACK: expected.
        client.pending_calls_threshold = _PENDING_CALLS_WARNING
        return client

    async def _connection(self) -> None:
        """One connection, from CONNECT until it fails (it never ends otherwise)."""
        client = self._client()
        await client.__aenter__()
        try:
            _cancel_point()
            prefix = self._mqtt.topic_prefix
            await client.subscribe(f"{prefix}/+/cmd/result", qos=1)
            await client.subscribe(f"{prefix}/+/status", qos=1)
            _cancel_point()
            self._connected = True
            self.stats.connects += 1
            LOGGER.info("MQTT link up: %s:%d as %s%s", self._mqtt.host, self._mqtt.port,
                        self._mqtt.client_id, " (TLS)" if self._mqtt.tls else "")
            loops = [asyncio.create_task(self._reader(client), name="relay-link-reader"),
                     asyncio.create_task(self._publisher(client), name="relay-link-publisher")]
            try:
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await self._end(loops)
            for task in done:
                task.result()  # the error that ended it
        finally:
            self._connected = False
            # Bounded: a dead broker never answers the DISCONNECT.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timings.shutdown_s):
                    await client.__aexit__(None, None, None)

    async def _end(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` and wait for them, boundedly, cancelling again if one goes
        on (a cancellation that Python 3.11's ``wait_for`` swallowed)."""
        for _ in range(3):
            running = [task for task in tasks if not task.done()]
            if not running:
                return
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=self.timings.shutdown_s / 3)

    # ------------------------------------------------------------------ publisher

    async def _publisher(self, client: aiomqtt.Client) -> None:
        assert self._wake is not None
        t = self.timings
        first = True
        next_scan = 0.0
        while True:
            _cancel_point()
            self._wake.clear()
            kicked, self._kicked = self._kicked, set()
            scan = first or bool(kicked) or time.monotonic() >= next_scan
            if scan:
                next_scan = time.monotonic() + t.resend_scan_s
            try:
                due = await asyncio.to_thread(self._plan, first, kicked, scan)
                self._db_trouble.ok()
            except Exception:  # noqa: BLE001 (the database: log, try again next poll)
                self._db_trouble.failed()
                self._kicked |= kicked
                due = []
            first = False
            await self._publish(client, due)
            if due:
                continue  # there may be more than one batch
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(t.poll_s):
                    await self._wake.wait()

    def _plan(self, republish_all: bool, kicked: set[str], scan: bool) -> list[Due]:
        now = self._clock()
        due, resent = self._outbox.plan(
            now, republish_before=now if republish_all else now - self.timings.republish_s,
            kicked=kicked, resend=scan)
        self.stats.resent += resent
        return due

    async def _publish(self, client: aiomqtt.Client, due: list[Due]) -> None:
        prefix = self._mqtt.topic_prefix
        for start in range(0, len(due), _PUBLISH_BATCH):
            batch = due[start:start + _PUBLISH_BATCH]
            outcomes = await asyncio.gather(
                *(client.publish(Topics(prefix, d.site_id).cmd, d.token, qos=1, retain=False,
                                 timeout=self.timings.op_timeout_s) for d in batch),
                return_exceptions=True)
            acked = [d for d, outcome in zip(batch, outcomes, strict=True) if outcome is None]
            if acked:
                for d in acked:
                    LOGGER.debug("%s command %s to %s", "re-published" if d.republish
                                 else "published", d.jti, d.site_id)
                again = sum(1 for d in acked if d.republish)
                self.stats.republished += again
                self.stats.published += len(acked) - again
                if again:
                    LOGGER.info("re-published %d unanswered command(s) (same jti)", again)
                try:
                    await asyncio.to_thread(self._outbox.mark, [d.jti for d in acked],
                                            self._clock())
                except Exception:  # noqa: BLE001 (they go out again: same token, same jti)
                    self._db_trouble.failed()
            failed = [d.jti for d, outcome in zip(batch, outcomes, strict=True)
                      if outcome is not None]
            if failed:
                # Another replica (or this one, reconnected) may publish them at once.
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._outbox.release, failed)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome

    # ------------------------------------------------------------------ reader

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            _cancel_point()
            topic = message.topic.value
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            try:
                if topic.endswith("/cmd/result"):
                    await self._on_result(topic, data)
                elif topic.endswith("/status"):
                    await self._on_status(topic, data)
                self._db_trouble.ok()
            except Exception:  # noqa: BLE001 (one message lost, the link carries on)
                self._db_trouble.failed()

    def _site_of(self, topic: str, suffix: str) -> str | None:
        head, tail = self._mqtt.topic_prefix + "/", "/" + suffix
        if not topic.startswith(head) or not topic.endswith(tail):
            return None
        site = topic[len(head):len(topic) - len(tail)]
        return site if site and "/" not in site else None

    async def _on_result(self, topic: str, data: bytes) -> None:
        site = self._site_of(topic, "cmd/result")
        doc = _json_object(topic, data, MAX_RESULT_BYTES)
        if site is None or doc is None:
            self.stats.ignored_results += 1
            return
        answered = await asyncio.to_thread(self._outbox.apply, site, doc, self._clock())
        if answered is None:
            self.stats.ignored_results += 1
            LOGGER.warning("result from %s answers none of its commands (jti %s): ignored",
                           site, show(doc.get("jti")))
            return
        self.stats.results += 1
        jti, status = answered
        reason = doc.get("reason")
        LOGGER.info("result of %s from %s: %s%s", jti, site, status,
                    f" ({show(reason)})" if reason else "")
        self._waiters.resolve({jti: status})

    async def _on_status(self, topic: str, data: bytes) -> None:
        site = self._site_of(topic, "status")
        if site is None or not data:  # an empty retained message clears the topic
            return
        doc = _json_object(topic, data, MAX_STATUS_BYTES)
        if doc is None:
            return
        self.stats.statuses += 1
        if not await asyncio.to_thread(self._sites.record_status, site, doc):
            # Not registered yet (its gateway came up before `sites add`): a retained
            # status comes once per subscription, so it is kept here and recorded by
            # housekeeping once the site is registered.
            self._unregistered.pop(site, None)
            if len(self._unregistered) >= MAX_UNREGISTERED_STATUSES:
                self._unregistered.pop(next(iter(self._unregistered)))
            self._unregistered[site] = doc
            return
        self._unregistered.pop(site, None)
        self._took_status(site, doc)

    def _took_status(self, site: str, doc: dict[str, Any]) -> None:
        online = doc.get("online") is True
        was = self._online.get(site)
        self._online[site] = online
        if online != was:
            LOGGER.info("gateway of %s is %s", site, "online" if online else "offline")
        if online and was is not True and self._wake is not None:
            # Its unanswered commands go out again now, not at the next re-publish.
            self._kicked.add(site)
            self._wake.set()

    # ------------------------------------------------------------------ housekeeping

    async def _record_newly_registered(self) -> None:
        """Record the kept statuses of sites registered since they came."""
        waiting = dict(self._unregistered)
        for site in await asyncio.to_thread(self._sites.registered_among, list(waiting)):
            doc = waiting[site]
            if self._unregistered.get(site) is not doc:
                continue  # a newer status came meanwhile, and was recorded or kept
            del self._unregistered[site]
            if await asyncio.to_thread(self._sites.record_status, site, doc):
                self._took_status(site, doc)

    async def _housekeeping(self) -> None:
        t = self.timings
        next_sweep = next_unregistered = 0.0
        while True:
            _cancel_point()
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + t.poll_s
                    expired = await asyncio.to_thread(self._outbox.expire, self._clock())
                    if expired:
                        self.stats.timeouts += len(expired)
                        LOGGER.info("%d command(s) expired unanswered: timeout",
                                    len(expired))
                        self._waiters.resolve(dict.fromkeys(expired, "timeout"))
                        if self._wake is not None:
                            self._wake.set()  # a lockout may be due again
                awaited = self._waiters.awaited()
                if awaited:
                    self._waiters.resolve(await asyncio.to_thread(self._outbox.finished, awaited))
                if self._unregistered and time.monotonic() >= next_unregistered:
                    next_unregistered = time.monotonic() + t.resend_scan_s
                    await self._record_newly_registered()
                self._db_trouble.ok()
            except Exception:  # noqa: BLE001 (the database: log, try again)
                self._db_trouble.failed()
            await asyncio.sleep(min(t.waiter_poll_s, t.poll_s))


def _cancel_point() -> None:
    """Raise the cancellation this task was asked for, if something swallowed it.

    Python 3.11's ``asyncio.wait_for`` (aiomqtt awaits CONNACK, SUBACK and PUBACK with
    it) returns normally when the cancellation lands as its awaitable completes; the
    request still counts in :meth:`asyncio.Task.cancelling`, so each loop checks here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _json_object(topic: str, data: bytes, limit: int) -> dict[str, Any] | None:
    """``data`` as a JSON object, or ``None`` (logged) when it is too big or not one."""
    if len(data) > limit:
        LOGGER.warning("message on %s dropped: %d bytes (at most %d)", topic, len(data),
                       limit)
        return None
    try:
        doc = strict_json(data)
    except ClaimError as exc:
        LOGGER.warning("message on %s dropped: %s", topic, exc)
        return None
    if not isinstance(doc, dict):
        LOGGER.warning("message on %s dropped: not a JSON object", topic)
        return None
    return doc


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause):
        text = f"{text}: {cause}"
    return text[:200]
