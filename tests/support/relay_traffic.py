"""The kill tests' traffic (tests/relay/test_relay_kill.py): Stora's webhook deliveries
and an app's unlocks, each retried as its sender would until answered, through a load
balancer's choice of replica, and the ledger of what was sent and answered."""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from devkit.relay_process import RelayProcess
from relay.webhooks import LOCKOUT_STATUSES, sign
from sitelink.payloads import rfc3339

SITE = "site_kill1"
UNITS = [f"unit_kill{i}" for i in range(10)]
#: Between two attempts of one request while the relay is down (it starts in ~1 s).
RETRY_GAP_S = 0.05
#: Shares of webhooks delivered again, and of unlock keys asked again, after their answer.
AGAIN = 0.1
#: ``?wait=`` of an unlock: short, so a kill that leaves a command pending costs little.
UNLOCK_WAIT_S = 2
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Delivery:
    """A ``unit.updated`` event as sent."""

    event_id: str
    unit: str
    status: str
    ver: int
    body: bytes

    @property
    def lockout(self) -> bool:
        """Whether the relay must want this unit locked out after it."""
        return self.status in LOCKOUT_STATUSES


@dataclass
class Ledger:
    """What the traffic threads sent and were answered (shared; guard with ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, Delivery] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    again_outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Idempotency-Key -> every command id answered to it.
    unlock_ids: dict[str, set[str]] = field(default_factory=dict)
    unlock_unit: dict[str, str] = field(default_factory=dict)
    unlock_answers: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Requests answered only after one or more failed attempts (a kill hit them).
    retried: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Answers no retry can fix (a 401, a 404, …) and exceptions in the threads.
    problems: list[str] = field(default_factory=list)
    #: Answers per ``"<what> <replica>"``; failed attempts per replica.
    answered_by: collections.Counter[str] = field(default_factory=collections.Counter)
    replica_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Unlock answers (``"<code> <status>"``) B gave while A was down, and those B gave to
    #: a request whose earlier attempt a kill cut off (sent, then no answer: it was
    #: waiting on A).
    b_while_a_down: collections.Counter[str] = field(default_factory=collections.Counter)
    b_rescued: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Idempotency-Key -> the command id answered 202 (still pending) to it.
    pending_answers: dict[str, str] = field(default_factory=dict)

    def fail(self, what: str, replica: str) -> None:
        with self.lock:
            self.failures[what] += 1
            self.replica_failures[replica] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class Replicas:
    """The relay's processes (one on SQLite; A and B on PostgreSQL) as the traffic sees
    them: their URLs, and whether A, the one the test kills, is up."""

    NAMES = "AB"

    def __init__(self, processes: list[RelayProcess]) -> None:
        self.processes = processes
        self.urls = [p.url for p in processes]
        #: Set while A is up (from its healthy start to its next kill).
        self.a_up = threading.Event()

    @property
    def a(self) -> RelayProcess:
        return self.processes[0]

    def pick(self, rng: random.Random) -> str:
        """The URL an attempt goes to: any replica, alive or not, as a load balancer
        that has not noticed a kill yet would choose."""
        return self.urls[0] if len(self.urls) == 1 else rng.choice(self.urls)

    def name(self, url: str) -> str:
        return self.NAMES[self.urls.index(url)]

    def start_a(self) -> None:
        self.a.start()
        self.a_up.set()

    def kill_a(self) -> None:
        self.a_up.clear()
        self.a.kill()


@dataclass(frozen=True)
class Answered:
    """A request's answer, the replica that gave it, and whether attempts failed first:
    any (``retried``), or one that had reached a replica (``cut_off``: no answer, or a
    5xx, rather than no connection)."""

    response: httpx.Response
    replica: str
    retried: bool
    cut_off: bool


class Traffic(threading.Thread):
    """A thread that calls ``step(n)`` for n = 0, 1, … until ``stop`` is set, with its own
    HTTP client and random choice of replica; an exception ends it and is kept as a
    problem (never a warning-as-error in a thread)."""

    def __init__(self, name: str, ledger: Ledger, stop: threading.Event,
                 client: httpx.Client, replicas: Replicas, rng: random.Random) -> None:
        super().__init__(name=name, daemon=True)
        self.ledger = ledger
        self.stop = stop
        self.client = client
        self.replicas = replicas
        self.rng = rng
        #: Set when the test ends: a request still retrying gives up (no thread outlives
        #: the test hammering a port).
        self.abandon = threading.Event()
        self.steps = 0

    def step(self, n: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step(self.steps)
                self.steps += 1
        except Exception as exc:  # reported by the test, not lost
            self.ledger.problem(f"{self.name} died: {exc!r}")
        finally:
            self.client.close()

    def send(self, what: str, make: Callable[[str], httpx.Request],
             ok: tuple[int, ...]) -> Answered | None:
        """A request from ``make(base URL)`` (a new one each attempt, to a replica picked
        at random) until it is answered one of ``ok`` (connection failures and 5xx are
        the kills' doing: again), or ``None`` after an answer no retry can fix."""
        failed = cut_off = False
        while not self.abandon.is_set():
            base = self.replicas.pick(self.rng)
            replica = self.replicas.name(base)
            request = make(base)
            try:
                answer = self.client.send(request)
            except httpx.TransportError as exc:
                self.ledger.fail(f"{what}: {type(exc).__name__}", replica)
                failed = True
                cut_off = cut_off or not isinstance(exc, httpx.ConnectError)
                time.sleep(RETRY_GAP_S)
                continue
            if answer.status_code in ok:
                with self.ledger.lock:
                    self.ledger.answered_by[f"{what} {replica}"] += 1
                    if failed:
                        self.ledger.retried[what] += 1
                return Answered(answer, replica, failed, cut_off)
            if answer.status_code >= 500:
                self.ledger.fail(f"{what}: {answer.status_code}", replica)
                failed = cut_off = True
                time.sleep(RETRY_GAP_S)
                continue
            self.ledger.problem(f"{what} {request.url.path}: {answer.status_code} "
                                f"{answer.text[:300]}")
            return None
        return None


class Webhooks(Traffic):
    """Stora's deliveries, each retried until a 200."""

    def __init__(self, ledger: Ledger, stop: threading.Event, replicas: Replicas, *,
                 url: str, secret: str, base_ms: int, rng: random.Random) -> None:
        super().__init__("webhooks", ledger, stop, httpx.Client(timeout=HTTP_TIMEOUT_S),
                         replicas, rng)
        #: The endpoint's path: each attempt sends it to the replica it picked.
        self.path = httpx.URL(url).raw_path.decode("ascii")
        self.secret, self.base_ms = secret, base_ms

    def deliver(self, d: Delivery) -> dict[str, Any] | None:
        """``d`` until a 200 (its JSON answer), each attempt signed with a fresh ``t``
        as Stora signs each attempt."""
        answered = self.send("webhook", lambda base: self.client.build_request(
            "POST", base + self.path, content=d.body, headers={
                "Content-Type": "application/json",
                "X-Stora-Signature": sign(self.secret, int(time.time()), d.body)}), (200,))
        if answered is None:
            return None
        doc: dict[str, Any] = answered.response.json()
        return doc

    def step(self, n: int) -> None:
        unit = UNITS[n % len(UNITS)]
        status = "overlocked" if (n // len(UNITS)) % 2 == 0 else "occupied"
        ver = self.base_ms + 7 * n  # newer for its unit than every earlier one
        event_id = f"evt_kill{n:05d}"
        body = json.dumps({"event": {
            "id": event_id, "type": "unit.updated", "api_version": "2025-09",
            "created_at": rfc3339(ver / 1000),
            "data": {"unit": {"id": unit, "reference_id": unit, "status": status,
                              "site": {"id": SITE}, "updated_at": rfc3339(ver / 1000)}}}},
            separators=(",", ":")).encode()
        d = Delivery(event_id, unit, status, ver, body)
        with self.ledger.lock:
            self.ledger.sent[event_id] = d
        doc = self.deliver(d)
        if doc is None:
            return
        with self.ledger.lock:
            self.ledger.accepted.add(event_id)
            self.ledger.outcomes[str(doc.get("outcome"))] += 1
        if self.rng.random() < AGAIN:  # Stora delivers an event twice now and then
            again = self.deliver(d)
            if again is not None:
                with self.ledger.lock:
                    self.ledger.again_outcomes[str(again.get("outcome"))] += 1


class Unlocks(Traffic):
    """Staff unlocks, one Idempotency-Key each, each retried until answered."""

    def __init__(self, ledger: Ledger, stop: threading.Event, replicas: Replicas, *,
                 api_key: str, rng: random.Random) -> None:
        super().__init__("unlocks", ledger, stop, httpx.Client(
            timeout=HTTP_TIMEOUT_S, headers={"Authorization": f"Bearer {api_key}"}),
            replicas, rng)
        self.last: dict[str, str] = {}

    def finished(self, command_id: str) -> None:
        """Until the command is no longer pending (its TTL, 60 s, bounds the wait)."""
        while True:
            answered = self.send("command", lambda base: self.client.build_request(
                "GET", f"{base}/v1/commands/{command_id}"), (200,))
            if answered is None or answered.response.json()["status"] != "pending":
                return
            time.sleep(0.05)

    def submit(self, key: str, unit: str) -> None:
        answered = self.send("unlock", lambda base: self.client.build_request(
            "POST", f"{base}/v1/sites/{SITE}/units/{unit}/unlock",
            params={"wait": UNLOCK_WAIT_S}, json={"seconds": 5},
            headers={"Idempotency-Key": key}), (200, 202))
        if answered is None:
            return
        answer = answered.response
        record = answer.json()
        what = f"{answer.status_code} {record['status']}"
        by_b = answered.replica == "B"
        a_down = not self.replicas.a_up.is_set()
        with self.ledger.lock:
            self.ledger.unlock_ids.setdefault(key, set()).add(str(record["id"]))
            self.ledger.unlock_answers[what] += 1
            if answer.status_code == 202:
                self.ledger.pending_answers[key] = str(record["id"])
            if by_b and a_down:
                self.ledger.b_while_a_down[what] += 1
            if by_b and answered.cut_off:
                self.ledger.b_rescued[what] += 1
        self.last[unit] = str(record["id"])

    def step(self, n: int) -> None:
        unit = UNITS[n % len(UNITS)]
        previous = self.last.get(unit)
        if previous is not None:
            self.finished(previous)
        key = f"unlock-{n:05d}"
        with self.ledger.lock:
            self.ledger.unlock_unit[key] = unit
        self.submit(key, unit)
        if self.rng.random() < AGAIN:  # the app retries a call it already got answered
            self.submit(key, unit)
