"""A fleet for the relay at scale (issue 15): simulated gateways, operators in the
sandbox, and a load generator that drives the relay as Stora and the apps would.

:class:`Fleet` is N simulated gateways, one MQTT client each (aiomqtt), all on one
event loop in a thread of its own: a thousand sites cost a thousand sockets, not a
thousand threads.  Each does what the relay sees of a gateway and no more: a retained
``P/S/status`` ``{"online": true, "version": …, "outbox": {"pending": 0, "dead": 0}}``
with the last will ``{"online": false}``, and each command of ``P/S/cmd`` answered on
``P/S/cmd/result`` (:func:`sitelink.payloads.result_payload`) after 20–80 ms (a driver's
round trip), ``failed`` ``hardware_error`` at :attr:`Behaviour.failure_rate`; a copy of
a ``jti`` gets the first answer again with ``duplicate: true``, as the agent's journal
does.  Signatures are not checked: the fleet measures the relay, not the agent.  Each
site draws its fates from a :class:`random.Random` seeded ``<seed>/<site>``, so on a
fixed seed a site's k-th command meets the same fate whatever the order across sites.

:func:`operator_specs` and :func:`populate` make M operators × K sites × U units in the
sandbox; :func:`connect_operators` does what the operators and the relay's admin do:
the connect flow over HTTP (consent approved at once), ``stora-relay sites add`` for
each site (:class:`relay.sites.SiteRegistry` in this process: a thousand CLI runs take
minutes) and ``api-keys create --role staff`` per operator, and waits until the
reconciliation after each connect has recorded every unit.

:class:`LoadGenerator` runs closed-loop workers (the next request once the last is
answered), each on its own keep-alive connection, taking the replicas' URLs in turn as
a load balancer would, and times each request (:class:`Stream`).  Each worker owns a
disjoint share of the units (or sites): a unit's changes go in order, and an unlock
never meets an earlier one of its own still pending (a double tap).

* **webhooks**: a unit's status changes in the sandbox, overlocked and occupied in
  turn.  ``deliver="direct"`` pauses the sandbox's deliveries (its one delivery thread
  would cap the rate) and posts its event, signed as Stora signs, to the operator's
  webhook URL, timing the answer; ``"sandbox"`` lets the sandbox deliver and times the
  change until the command reaches the gateway (both: :meth:`LoadGenerator.intent_latencies`);
* **unlocks**: ``POST /v1/sites/S/units/U/unlock?wait=…`` with the operator's staff key;
* **timeline**: a Timeline Event through the relay's broker (``POST
  /stora/2025-09/timeline/events``, the site's credential, a new ``Idempotency-Key``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
import httpx
from sqlalchemy import func, select

from devkit.sandbox import Sandbox, signature
from relay.apikeys import ApiKeys
from relay.db.engine import Database
from relay.db.models import OperatorSite, UnitState
from relay.sites import SiteRegistry
from relay.webhooks import unit_ver
from sitelink.jws import b64decode
from sitelink.payloads import result_payload

__all__ = ["Behaviour", "Fleet", "LoadGenerator", "LoadMix", "OperatorLink", "Received",
           "Stream", "connect_operators", "operator_specs", "percentile", "populate",
           "raise_nofile_limit"]

PREFIX = "stora-gw"
#: Gateways connecting at once (a thousand SYNs at once overflow a listen backlog).
_CONNECTING = 64
_STATUS_VERSION = "fleet-sim"


def raise_nofile_limit() -> int:
    """Raise this process's open-files soft limit to its hard limit (a socket per
    gateway, and the children started after it inherit the limit); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; ``nan`` when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def claims_of(token: bytes) -> dict[str, Any]:
    """The claims of a compact JWS, unchecked."""
    parts = token.split(b".")
    body = b64decode(parts[1]) if len(parts) == 3 else None
    if body is None:
        raise ValueError("not a compact JWS")
    claims: dict[str, Any] = json.loads(body)
    return claims


# --------------------------------------------------------------------------- gateways


@dataclass(frozen=True)
class Behaviour:
    """How the simulated gateways answer: a delay uniform in ``delay_s``, ``failed``
    ``hardware_error`` with probability ``failure_rate``, drawn per site from ``seed``."""

    delay_s: tuple[float, float] = (0.02, 0.08)
    failure_rate: float = 0.0
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))
    version: str = _STATUS_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.failure_rate <= 1 or not 0 <= self.delay_s[0] <= self.delay_s[1]:
            raise ValueError("failure_rate is 0-1 and delay_s a (low, high) pair of seconds")

    def outcomes(self, site: str) -> Iterator[tuple[bool, float]]:
        """``(failed, delay)`` of the site's first, second, … command."""
        rng = random.Random(f"{self.seed}/{site}")
        while True:
            failed = rng.random() < self.failure_rate
            yield failed, rng.uniform(*self.delay_s)


@dataclass(frozen=True, slots=True)
class Received:
    """A command as a gateway got it (``at``: ``time.perf_counter``); ``duplicate``: a
    copy of a ``jti`` it had already got."""

    site: str
    jti: str
    cmd: str
    unit: str
    ver: int | None
    at: float
    duplicate: bool


class Fleet:
    """N simulated gateways (the module docstring) on the broker at ``host:port``.

    :meth:`start` connects them all and returns once each is subscribed and has
    published its status; :meth:`stop` publishes each one's offline status (as the
    agent does when stopped) and disconnects; :meth:`cut` drops one gateway's TCP
    connection without a goodbye, so the broker publishes its last will.
    """

    def __init__(self, host: str, port: int, sites: Sequence[str], *,
                 behaviour: Behaviour | None = None, prefix: str = PREFIX) -> None:
        self.host, self.port = host, port
        self.sites = list(sites)
        self.behaviour = behaviour or Behaviour()
        self.prefix = prefix
        self._cond = threading.Condition()
        #: Every command that arrived, copies included, in order of arrival.
        self.received: list[Received] = []
        #: jti -> the status answered (the first answer: copies get the same).
        self.answers: dict[str, str] = {}
        #: (unit, ver) -> ``time.perf_counter`` of the first lockout or clear with it.
        self.intents: dict[tuple[str, int], float] = {}
        self.ready: set[str] = set()
        self.ended: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._clients: dict[str, aiomqtt.Client] = {}
        self._spawned: set[asyncio.Task[None]] = set()
        #: The fleet thread's id for /proc/self/task/<id> (its CPU), once started.
        self.native_id: int | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 120.0) -> Fleet:
        """Connect every gateway; raises if they are not all up within ``timeout``."""
        raise_nofile_limit()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="fleet",
                                        daemon=True)
        self._thread.start()
        started.wait(10)
        if not self.wait(lambda: len(self.ready) + len(self.ended) >= len(self.sites),
                         timeout) or self.ended:
            ended = dict(list(self.ended.items())[:3])
            self.stop()
            raise RuntimeError(f"{len(self.ready)} of {len(self.sites)} gateways up "
                               f"within {timeout} s; ended: {ended}")
        return self

    def _serve(self, started: threading.Event) -> None:
        self.native_id = threading.get_native_id()
        loop = asyncio.new_event_loop()
        self._loop = loop
        gate = asyncio.Semaphore(_CONNECTING)
        for site in self.sites:
            self._tasks[site] = loop.create_task(self._gateway(site, gate))
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Offline status, disconnect and end the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def end() -> None:
            offline = [loop.create_task(self._clients[site].publish(
                self._topic(site, "status"), self._status(False), qos=1, retain=True))
                for site in self.ready if site not in self.ended]
            if offline:
                await asyncio.wait(offline, timeout=5)
            for task in self._tasks.values():
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks.values(), timeout=timeout)
            loop.stop()

        asyncio.run_coroutine_threadsafe(end(), loop)
        thread.join(timeout + 5)

    def cut(self, site: str) -> None:
        """Drop ``site``'s connection abruptly (no DISCONNECT): its will is published."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fleet is not running")

        def shut() -> None:
            sock = self._clients[site]._client.socket()  # a fault, on purpose
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)

        loop.call_soon_threadsafe(shut)

    # ----------------------------------------------------------------- reading

    def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        """Until ``check()`` (called under the fleet's lock) holds; whether it did."""
        with self._cond:
            return self._cond.wait_for(check, timeout)

    def intent_times(self) -> dict[tuple[str, int], float]:
        """A copy of :attr:`intents`."""
        with self._cond:
            return dict(self.intents)

    # ----------------------------------------------------------------- one gateway

    def _topic(self, site: str, leaf: str) -> str:
        return f"{self.prefix}/{site}/{leaf}"

    def _status(self, online: bool) -> bytes:
        doc: dict[str, Any] = {"online": online}
        if online:
            doc |= {"version": self.behaviour.version, "outbox": {"pending": 0, "dead": 0}}
        return json.dumps(doc, separators=(",", ":")).encode()

    async def _gateway(self, site: str, gate: asyncio.Semaphore) -> None:
        status = self._topic(site, "status")
        client = aiomqtt.Client(
            self.host, self.port, identifier=f"fleet-{site}", clean_session=True,
            keepalive=60, timeout=30,
            will=aiomqtt.Will(status, self._status(False), qos=1, retain=True),
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),))
        self._clients[site] = client
        outcomes = self.behaviour.outcomes(site)
        first: dict[str, asyncio.Future[dict[str, Any]]] = {}
        try:
            async with gate:
                await client.__aenter__()
            try:
                await client.subscribe(self._topic(site, "cmd"), qos=1)
                await client.publish(status, self._status(True), qos=1, retain=True)
                with self._cond:
                    self.ready.add(site)
                    self._cond.notify_all()
                async for message in client.messages:
                    if isinstance(message.payload, bytes | bytearray):
                        task = asyncio.get_running_loop().create_task(self._answer(
                            client, site, bytes(message.payload), first, outcomes))
                        self._spawned.add(task)
                        task.add_done_callback(self._spawned.discard)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await client.__aexit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 (kept: a gateway that ended is reported)
            with self._cond:
                self.ended[site] = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()

    async def _answer(self, client: aiomqtt.Client, site: str, token: bytes,
                      first: dict[str, asyncio.Future[dict[str, Any]]],
                      outcomes: Iterator[tuple[bool, float]]) -> None:
        at = time.perf_counter()
        try:
            claims = claims_of(token)
        except ValueError:
            return  # not a token: a real gateway rejects it unsigned; nothing to time
        jti, cmd, unit = str(claims.get("jti")), str(claims.get("cmd")), str(claims.get("unit"))
        ver = claims.get("ver") if isinstance(claims.get("ver"), int) else None
        copy = jti in first
        with self._cond:
            self.received.append(Received(site, jti, cmd, unit, ver, at, copy))
            if ver is not None and cmd in ("lockout", "clear_lockout"):
                self.intents.setdefault((unit, ver), at)
            self._cond.notify_all()
        if copy:
            result = dict(await first[jti])
            result["duplicate"] = True
        else:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            first[jti] = future
            failed, delay = next(outcomes)
            await asyncio.sleep(delay)
            status, reason = ("failed", "hardware_error") if failed else ("done", None)
            result = result_payload(jti, cmd, unit, status, reason, duplicate=False,
                                    state=None, at=time.time())
            future.set_result(result)
            with self._cond:
                self.answers[jti] = status
                self._cond.notify_all()
        with contextlib.suppress(aiomqtt.MqttError):  # cut or stopped meanwhile
            await client.publish(self._topic(site, "cmd/result"),
                                 json.dumps(result, separators=(",", ":")).encode(), qos=1)


# --------------------------------------------------------------------------- operators


def operator_specs(operators: int, sites: int, units: int, *,
                   tag: str = "f") -> dict[str, list[dict[str, Any]]]:
    """``operators`` sandbox operators (``fleet-op01`` …) of ``sites`` sites of ``units``
    units each (all ``occupied``): operator id -> site specs for
    :meth:`~devkit.sandbox.Sandbox.create_operator`."""
    specs: dict[str, list[dict[str, Any]]] = {}
    for o in range(1, operators + 1):
        specs[f"fleet-op{o:02d}"] = [
            {"id": f"site_{tag}{o:02d}s{s:03d}", "name": f"Fleet {o}/{s}",
             "units": [{"id": f"unit_{tag}{o:02d}s{s:03d}u{u}", "reference_id": f"U{u}",
                        "status": "occupied"} for u in range(units)]}
            for s in range(1, sites + 1)]
    return specs


def populate(sandbox: Sandbox, specs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Create the operators of :func:`operator_specs` in the sandbox."""
    for operator, sites in specs.items():
        sandbox.create_operator(operator, name=f"Fleet {operator}", sites=sites)


@dataclass(frozen=True)
class OperatorLink:
    """A sandbox operator connected to the relay, as the load generator uses it."""

    name: str
    relay_id: str
    webhook_path: str
    webhook_secret: str
    api_key: str
    #: site -> its gateway's credential (for the broker).
    credentials: dict[str, str]
    #: site -> its units.
    units: dict[str, list[str]]


def connect_operators(sandbox: Sandbox, relay_url: str, db: Database,
                      specs: Mapping[str, Sequence[Mapping[str, Any]]], *,
                      timeout: float = 180.0) -> list[OperatorLink]:
    """Connect each operator of ``specs`` to the relay at ``relay_url`` (its database
    ``db``), register its sites, make it a staff key, and wait until the relay knows
    every unit (the module docstring)."""
    links = []
    registry, keys = SiteRegistry(db), ApiKeys(db)
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        for operator, sites in specs.items():
            sandbox.set_consent(operator, auto="approve")
            page = browser.get(relay_url + "/connect")
            if page.status_code != 200 or "/oauth/callback" not in str(page.url):
                raise RuntimeError(f"connect of {operator}: {page.status_code} {page.url}")
            first = str(sites[0]["id"])
            with db.read() as s:
                relay_id = s.scalar(select(OperatorSite.operator_id).where(
                    OperatorSite.site_id == first))
            if relay_id is None:
                raise RuntimeError(f"the relay lists no operator for {first}")
            endpoint = sandbox.operator_state(operator)["endpoints"][0]
            credentials = {str(site["id"]): registry.add(str(site["id"]), relay_id)[1]
                           for site in sites}
            key = keys.create(relay_id, f"fleet {operator}", "staff")[1]
            links.append(OperatorLink(
                operator, relay_id, httpx.URL(str(endpoint["url"])).raw_path.decode(),
                str(endpoint["secret"]), key, credentials,
                {str(site["id"]): [str(u["id"]) for u in site["units"]] for site in sites}))
    expected = sum(len(u) for link in links for u in link.units.values())
    deadline = time.monotonic() + timeout
    while True:
        with db.read() as s:
            known = s.scalar(select(func.count()).select_from(UnitState)) or 0
        if known >= expected:
            return links
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay knows {known} of {expected} units after "
                               f"{timeout} s (reconciliation)")
        time.sleep(0.2)


# --------------------------------------------------------------------------- load


@dataclass
class Stream:
    """One kind of request over a run: each answered request's latency (seconds) and
    answer (``"<status code> <outcome>"``), and failures to get one."""

    name: str
    latencies: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        """Answered requests per second of the run."""
        return len(self.latencies) / self.elapsed_s if self.elapsed_s else 0.0

    def p(self, q: float) -> float:
        """The ``q``-th percentile latency, seconds."""
        return percentile(self.latencies, q)


@dataclass(frozen=True)
class LoadMix:
    """What a :meth:`LoadGenerator.run` sends: workers of each kind for ``duration_s``."""

    duration_s: float
    webhooks: int = 0
    unlocks: int = 0
    timeline: int = 0
    unlock_wait_s: float = 10.0
    deliver: Literal["direct", "sandbox"] = "direct"


@dataclass(frozen=True)
class _Unit:
    link: OperatorLink
    site: str
    unit: str


@dataclass(frozen=True)
class _Turn:
    """One request of a worker: its client, the replica's URL, the worker's share
    (``k`` of ``n``) and the request's number ``i``."""

    http: httpx.AsyncClient
    url: str
    k: int
    n: int
    i: int
    mix: LoadMix


class LoadGenerator:
    """Drives the relay at ``urls`` (its replicas) for the ``operators`` connected to it
    (the module docstring); ``source_id`` is the relay's ``timeline_source_id``."""

    def __init__(self, sandbox: Sandbox, fleet: Fleet, operators: Sequence[OperatorLink],
                 urls: Sequence[str], *, source_id: str) -> None:
        self._sandbox, self._fleet = sandbox, fleet
        self._urls = list(urls)
        self._source = source_id
        # Interleaved across operators and sites, so any worker's share is spread.
        self._units = sorted((_Unit(link, site, unit) for link in operators
                              for site, names in link.units.items() for unit in names),
                             key=lambda u: (u.unit[-1], u.site[-3:], u.link.name))
        self._sites = sorted(((link, site) for link in operators for site in link.units),
                             key=lambda p: (p[1][-3:], p[0].name))
        self._lockout: dict[str, bool] = {}
        #: (unit, ver) -> ``time.perf_counter`` of the status change.
        self.changed: dict[tuple[str, int], float] = {}
        self._events = 0
        self._paused = False

    def run(self, mix: LoadMix) -> dict[str, Stream]:
        """Send ``mix`` (blocking; an event loop of its own); the streams that ran."""
        if mix.deliver == "direct" and not self._paused:
            self._sandbox.pause_deliveries()  # held for good: they would come as copies
            self._paused = True
        return asyncio.run(self._run(mix))

    def intent_latencies(self) -> list[float]:
        """Seconds from each status change to its lockout or clear at the gateway."""
        arrived = self._fleet.intent_times()
        return [arrived[k] - at for k, at in self.changed.items() if k in arrived]

    async def _run(self, mix: LoadMix) -> dict[str, Stream]:
        kinds = {"webhooks": (mix.webhooks, self._webhook),
                 "unlocks": (mix.unlocks, self._unlock),
                 "timeline": (mix.timeline, self._timeline)}
        streams = {name: Stream(name) for name, (workers, _) in kinds.items() if workers}
        deadline = time.perf_counter() + mix.duration_s
        began = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for name, stream in streams.items():
                workers, work = kinds[name]
                for k in range(workers):
                    group.create_task(self._worker(work, stream, (k, workers), mix, deadline))
        for stream in streams.values():
            stream.elapsed_s = time.perf_counter() - began
        return streams

    async def _worker(self, work: Callable[[_Turn], Coroutine[Any, Any, str]],
                      stream: Stream, share: tuple[int, int], mix: LoadMix,
                      deadline: float) -> None:
        k, n = share
        async with httpx.AsyncClient(timeout=mix.unlock_wait_s + 20) as http:
            i = 0
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    answer = await work(_Turn(http, self._urls[(k + i) % len(self._urls)],
                                              k, n, i, mix))
                except (httpx.HTTPError, TimeoutError, ValueError) as exc:
                    stream.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                else:
                    stream.latencies.append(time.perf_counter() - began)
                    stream.answers[answer] += 1
                i += 1

    @staticmethod
    def _outcome(answer: httpx.Response, key: str) -> str:
        """``"<status code> <the body's key, or its error code>"``."""
        with contextlib.suppress(ValueError):
            doc = answer.json()
            if isinstance(doc, dict):
                inner = doc.get("error")
                return f"{answer.status_code} " \
                    f"{inner.get('code') if isinstance(inner, dict) else doc.get(key)}"
        return str(answer.status_code)

    async def _webhook(self, t: _Turn) -> str:
        mine = self._units[t.k::t.n]
        u = mine[t.i % len(mine)]
        lockout = self._lockout[u.unit] = not self._lockout.get(u.unit, False)
        event = self._sandbox.set_unit_status(u.unit, "overlocked" if lockout else "occupied")
        ver = unit_ver(event["data"]["unit"]["updated_at"])
        if ver is None:
            raise ValueError(f"the sandbox's event has no updated_at: {event}")
        self.changed[(u.unit, ver)] = time.perf_counter()
        if t.mix.deliver == "sandbox":
            if not await asyncio.to_thread(self._fleet.wait, lambda: (
                    u.unit, ver) in self._fleet.intents, t.mix.unlock_wait_s):
                raise TimeoutError(f"no command for {u.unit} ver {ver}")
            return "delivered"
        body = json.dumps({"event": event}, separators=(",", ":")).encode()
        answer = await t.http.post(t.url + u.link.webhook_path, content=body, headers={
            "Content-Type": "application/json",
            "X-Stora-Signature": signature(u.link.webhook_secret, int(time.time()), body)})
        return self._outcome(answer, "outcome")

    async def _unlock(self, t: _Turn) -> str:
        mine = self._units[t.k::t.n]
        u = mine[(t.i * 7919) % len(mine)]  # hop around the share, not the webhooks' order
        answer = await t.http.post(
            f"{t.url}/v1/sites/{u.site}/units/{u.unit}/unlock",
            params={"wait": t.mix.unlock_wait_s}, json={"seconds": 5},
            headers={"Authorization": f"Bearer {u.link.api_key}"})
        return self._outcome(answer, "status")

    async def _timeline(self, t: _Turn) -> str:
        mine = self._sites[t.k::t.n]
        link, site = mine[t.i % len(mine)]
        self._events += 1
        external = f"fleet-{time.time_ns()}-{self._events}"
        answer = await t.http.post(t.url + "/stora/2025-09/timeline/events", json={
            "source": {"id": self._source}, "site": {"id": site},
            "external": {"id": external},
            "description": f"Unit unlocked via Fleet — {external}"}, headers={
            "Authorization": f"Bearer {link.credentials[site]}",
            "Idempotency-Key": f"{external}.0"})
        return str(answer.status_code)
