"""kill -9 of the relay at random points while webhooks and unlocks flow (issue 14,
fault matrix #21 for the relay).

The relay runs as ``stora-relay run`` in a child process (devkit/relay_process.py) in
front of a real Mosquitto and the sandbox as Stora, connected over HTTP as an operator's
browser would, with one registered site whose fake gateway (a paho client) answers every
command ``done`` and logs what it got.  While the main thread SIGKILLs the relay at a
uniformly random moment 0–:data:`UPTIME_S` after each start became healthy and starts it
again, two threads drive it:

* **webhooks**: ``unit.updated`` deliveries, each with a new event id and a newer
  ``updated_at`` for its unit, over :data:`UNITS` units alternating ``overlocked`` and
  ``occupied`` (so every event changes the lockout and makes a command); each retried
  (same id, same body, fresh signature ``t``) until a 200, as Stora would; a share sent
  again after their 200;
* **unlocks**: staff unlocks, each with an ``Idempotency-Key`` of its own, retried with
  the same key until a 200 or 202; a share asked again after that.  Before a unit is
  unlocked again its previous unlock must be finished, or the relay would rightly
  answer the new key with the pending one (a double tap, contract §7.2).

After a last start, the traffic stops and the link settles; then the relay is stopped
cleanly and the guarantees are checked on its database and on the gateway's log:

* every event id answered 200 is in ``webhook_events`` exactly once, none is missing and
  none is there that was never sent; each made exactly one lockout or clear with its
  unit's ``ver``; each unit's ``UnitState`` holds the newest delivery's ``ver`` and
  lockout, confirmed by the gateway, which got that ``ver`` last;
* every ``Idempotency-Key`` has exactly one ``commands`` row, every answer to it named
  that row's id, the row ended ``done``, and the gateway got the unlock under that jti
  only (copies of the same jti are allowed: re-publishing after a restart is);
* every lockout or clear the gateway got is a command row the relay made, with a ``ver``
  delivered for that unit;
* ``PRAGMA integrity_check`` is ``ok`` after every kill (on a copy of the file and its WAL
  as the kill left them) and at the end, and ``PRAGMA foreign_key_check`` finds nothing;
  every start proves the killed life's ProcessLock gone (a held one fails ``run``).

A kill costs ~1.6 s here, ~1.25 s of it the relay's start (mostly imports): 100 kills take
~2.8 min.  ``RELAY_KILLS`` (default 100) and ``RELAY_KILL_SEED`` (default random, printed)
let a soak run go further or replay a run's kill times.
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import shutil
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from devkit.mosquitto import Broker, free_port
from devkit.relay_process import RelayProcess
from devkit.sandbox import PartnerApp, Sandbox
from relay.cli.main import main as relay_cli
from relay.db.engine import Database
from relay.db.models import Command, UnitState, WebhookEvent
from relay.webhooks import LOCKOUT_STATUSES, sign
from sitelink.payloads import rfc3339
from tests.support.relay import CLIENT_ID, write_relay_config
from tests.support.relay_gateway import FakeGateway, Received
from tests.support.relay_stack import CLIENT_SECRET

#: One relay process on its SQLite file.
pytestmark = pytest.mark.backends("sqlite")

KILLS = int(os.environ.get("RELAY_KILLS", "100"))
#: Each life is killed uniformly 0–UPTIME_S after its /healthz first answered.
UPTIME_S = 0.5
OPERATOR = "killop"
SITE = "site_kill1"
UNITS = [f"unit_kill{i}" for i in range(10)]
PREFIX = "stora-gw"
#: Between two attempts of one request while the relay is down (it starts in ~1 s).
RETRY_GAP_S = 0.05
#: Shares of webhooks delivered again, and of unlock keys asked again, after their answer.
AGAIN = 0.1
#: ``?wait=`` of an unlock: short, so a kill that leaves a command pending costs little.
UNLOCK_WAIT_S = 2
#: How long the link may take, after the last start, to publish and settle everything
#: (the relay re-publishes every 5 s, LinkTimings.republish_s).
SETTLE_S = 30.0
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

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures[what] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class Traffic(threading.Thread):
    """A thread that calls ``step(n)`` for n = 0, 1, … until ``stop`` is set, with its own
    HTTP client; an exception ends it and is kept as a problem (never a
    warning-as-error in a thread)."""

    def __init__(self, name: str, ledger: Ledger, stop: threading.Event,
                 client: httpx.Client) -> None:
        super().__init__(name=name, daemon=True)
        self.ledger = ledger
        self.stop = stop
        self.client = client
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

    def send(self, what: str, make: Callable[[], httpx.Request],
             ok: tuple[int, ...]) -> httpx.Response | None:
        """A request from ``make`` (a new one each attempt) until it is answered one of
        ``ok`` (connection failures and 5xx are the kills' doing: again), or ``None``
        after an answer no retry can fix."""
        failed = False
        while not self.abandon.is_set():
            request = make()
            try:
                answer = self.client.send(request)
            except httpx.TransportError as exc:
                self.ledger.fail(f"{what}: {type(exc).__name__}")
                failed = True
                time.sleep(RETRY_GAP_S)
                continue
            if answer.status_code in ok:
                if failed:
                    with self.ledger.lock:
                        self.ledger.retried[what] += 1
                return answer
            if answer.status_code >= 500:
                self.ledger.fail(f"{what}: {answer.status_code}")
                failed = True
                time.sleep(RETRY_GAP_S)
                continue
            self.ledger.problem(f"{what} {request.url.path}: {answer.status_code} "
                                f"{answer.text[:300]}")
            return None
        return None


class Webhooks(Traffic):
    """Stora's deliveries, each retried until a 200."""

    def __init__(self, ledger: Ledger, stop: threading.Event, *, url: str, secret: str,
                 base_ms: int, rng: random.Random) -> None:
        super().__init__("webhooks", ledger, stop, httpx.Client(timeout=HTTP_TIMEOUT_S))
        self.url, self.secret, self.base_ms, self.rng = url, secret, base_ms, rng

    def deliver(self, d: Delivery) -> dict[str, Any] | None:
        """``d`` until a 200 (its JSON answer), each attempt signed with a fresh ``t``
        as Stora signs each attempt."""
        answer = self.send("webhook", lambda: self.client.build_request(
            "POST", self.url, content=d.body, headers={
                "Content-Type": "application/json",
                "X-Stora-Signature": sign(self.secret, int(time.time()), d.body)}), (200,))
        if answer is None:
            return None
        doc: dict[str, Any] = answer.json()
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

    def __init__(self, ledger: Ledger, stop: threading.Event, *, url: str, api_key: str,
                 rng: random.Random) -> None:
        super().__init__("unlocks", ledger, stop, httpx.Client(
            base_url=url, timeout=HTTP_TIMEOUT_S,
            headers={"Authorization": f"Bearer {api_key}"}))
        self.rng = rng
        self.last: dict[str, str] = {}

    def finished(self, command_id: str) -> None:
        """Until the command is no longer pending (its TTL, 60 s, bounds the wait)."""
        while True:
            answer = self.send("command", lambda: self.client.build_request(
                "GET", f"/v1/commands/{command_id}"), (200,))
            if answer is None or answer.json()["status"] != "pending":
                return
            time.sleep(0.05)

    def submit(self, key: str, unit: str) -> None:
        answer = self.send("unlock", lambda: self.client.build_request(
            "POST", f"/v1/sites/{SITE}/units/{unit}/unlock",
            params={"wait": UNLOCK_WAIT_S}, json={"seconds": 5},
            headers={"Idempotency-Key": key}), (200, 202))
        if answer is None:
            return
        record = answer.json()
        with self.ledger.lock:
            self.ledger.unlock_ids.setdefault(key, set()).add(str(record["id"]))
            self.ledger.unlock_answers[f"{answer.status_code} {record['status']}"] += 1
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


def _cli(config: Path, *argv: str) -> Any:
    """``stora-relay … --json`` in this process; its JSON."""
    out, err = io.StringIO(), io.StringIO()
    status = relay_cli([*argv, "--config", str(config), "--json"], out=out, err=err)
    assert status == 0, err.getvalue()
    return json.loads(out.getvalue())


def _read(db: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """A read-only query on the live database (WAL: the relay's writers never wait)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def _wait(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def _integrity_of_copy(db: Path, scratch: Path) -> str:
    """``integrity_check`` of the database and its WAL as a kill left them (a copy: a
    connection to the file itself would checkpoint the WAL and spare the next life its
    recovery)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for suffix in ("", "-wal"):
        source = Path(f"{db}{suffix}")
        if source.exists():
            shutil.copyfile(source, scratch / f"relay.db{suffix}")
    conn = sqlite3.connect(scratch / "relay.db")
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def _connect(sandbox: Sandbox, relay: RelayProcess, config: Path) -> tuple[str, str, str]:
    """The connect flow over HTTP (the sandbox approves at once); the relay's operator
    id, and the webhook URL and secret Stora signs with."""
    sandbox.set_consent(OPERATOR, auto="approve")
    with httpx.Client(follow_redirects=True, timeout=HTTP_TIMEOUT_S) as browser:
        page = browser.get(relay.url + "/connect")
    assert page.status_code == 200, page.text
    assert str(page.url).startswith(relay.url + "/oauth/callback"), page.url
    operators = _cli(config, "operators", "list")
    assert len(operators) == 1, operators
    endpoints = sandbox.operator_state(OPERATOR)["endpoints"]
    assert len(endpoints) == 1, endpoints
    return str(operators[0]["id"]), str(endpoints[0]["url"]), str(endpoints[0]["secret"])


def _settled(db: Path) -> bool:
    """No command pending, and every unit's newest lockout or clear confirmed."""
    pending = _read(db, "SELECT count(*) FROM commands WHERE status = 'pending'")[0][0]
    unconfirmed = _read(db, """
        SELECT count(*) FROM unit_states u WHERE coalesce(u.confirmed_ver, 0) < (
            SELECT coalesce(max(c.ver), 0) FROM commands c WHERE c.unit_id = u.unit_id
            AND c.cmd IN ('lockout', 'clear_lockout'))""")[0][0]
    return bool(pending == 0 and unconfirmed == 0)


@pytest.mark.timeout(max(480, KILLS * 4))  # ~1.4 s a kill (the start is ~1 s of it)
def test_kill_9_of_the_relay_loses_and_doubles_no_webhook_effect_and_no_unlock(
        tmp_path: Path, broker: Broker) -> None:
    seed = int(os.environ.get("RELAY_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    started = time.monotonic()
    port = free_port()
    relay_url = f"http://127.0.0.1:{port}"
    app = PartnerApp(CLIENT_ID, CLIENT_SECRET, (relay_url + "/oauth/callback",),
                     name="TestEntry")
    ledger = Ledger()
    stop = threading.Event()
    integrity: list[str] = []
    check_s = 0.0
    kill_times: list[float] = []
    with Sandbox(partner_app=app, max_per_second=50, max_per_minute=3000,
                 webhook_retry_s=(0.05,), webhook_timeout_s=1.0) as sandbox:
        sandbox.create_operator(OPERATOR, name="Kill Storage", sites=[{
            "id": SITE, "name": "Kill North",
            "units": [{"id": u, "reference_id": u, "status": "occupied"} for u in UNITS]}])
        config = write_relay_config(tmp_path / "relay", stora_url=sandbox.url,
                                    listen_port=port, mqtt_port=broker.port,
                                    client_secret=CLIENT_SECRET)
        db_path = tmp_path / "relay" / "relay.db"
        relay = RelayProcess(config, port=port, log=tmp_path / "relay.log")
        gateway: FakeGateway | None = None
        threads: list[Traffic] = []
        try:
            relay.start()
            operator, webhook_url, secret = _connect(sandbox, relay, config)
            _cli(config, "sites", "add", SITE, "--operator", operator)
            api_key = str(_cli(config, "api-keys", "create", "--operator", operator,
                               "--name", "kill-test", "--role", "staff")["key"])
            gateway = FakeGateway(broker, PREFIX, SITE)
            gateway.publish_status({"online": True})
            # The connect's reconciliation records the units (unlocks need them known).
            _wait("the units reconciled", lambda: _read(
                db_path, "SELECT count(*) FROM unit_states WHERE site_id = ?", SITE)[0][0]
                == len(UNITS), 30)
            setup_s = time.monotonic() - started
            threads = [
                Webhooks(ledger, stop, url=webhook_url, secret=secret,
                         base_ms=int(time.time() * 1000), rng=random.Random(rng.random())),
                Unlocks(ledger, stop, url=relay.url, api_key=api_key,
                        rng=random.Random(rng.random()))]
            for thread in threads:
                thread.start()
            traffic_started = time.monotonic()
            for _ in range(KILLS):
                time.sleep(rng.uniform(0, UPTIME_S))
                relay.kill()
                kill_times.append(time.monotonic())
                checked = time.monotonic()
                verdict = _integrity_of_copy(db_path, tmp_path / "check")
                check_s += time.monotonic() - checked
                if verdict != "ok":
                    integrity.append(f"kill {len(kill_times)}: {verdict}")
                relay.start()
            kills_s = time.monotonic() - traffic_started
            stop.set()
            for thread in threads:
                thread.join(60)
            hung = [t.name for t in threads if t.is_alive()]
            settle_began = time.monotonic()
            deadline = settle_began + SETTLE_S
            while not _settled(db_path) and time.monotonic() < deadline:
                time.sleep(0.1)
            settle_s = time.monotonic() - settle_began
            received = gateway.got()
            exit_status = relay.terminate()
        finally:
            stop.set()
            for thread in threads:
                thread.abandon.set()
            relay.close()
            if gateway is not None:
                gateway.close()
    log = relay.log_text()
    (tmp_path / "relay.log.copy").write_text(log)

    db = Database(f"sqlite:///{db_path}")
    try:
        final_integrity = db.integrity_check()
        with db.engine.connect() as connection:
            foreign = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        with db.read() as s:
            events = list(s.scalars(select(WebhookEvent)).all())
            commands = list(s.scalars(select(Command)).all())
            units = {u.unit_id: u for u in s.scalars(select(UnitState)).all()}
    finally:
        db.close()

    # ---- webhooks: each accepted event exactly once, each with exactly one effect
    stored = collections.Counter(e.event_id for e in events if e.operator_id == operator)
    doubled = {e: n for e, n in stored.items() if n > 1}
    missing = sorted(ledger.accepted - set(stored))
    unknown = sorted(set(stored) - set(ledger.sent))
    unanswered = sorted(set(ledger.sent) - ledger.accepted)
    by_jti = {c.jti: c for c in commands}
    effects = collections.Counter((c.unit_id, c.ver) for c in commands if c.origin == "webhook")
    effect_problems = []
    for event_id in sorted(ledger.accepted):
        d = ledger.sent[event_id]
        if effects[(d.unit, d.ver)] != 1:
            effect_problems.append(f"{event_id} ({d.unit}, ver {d.ver}, {d.status}): "
                                   f"{effects[(d.unit, d.ver)]} webhook commands")
    newest: dict[str, Delivery] = {}
    for event_id in ledger.accepted:
        d = ledger.sent[event_id]
        if d.unit not in newest or newest[d.unit].ver < d.ver:
            newest[d.unit] = d
    unit_problems = []
    for unit, d in sorted(newest.items()):
        state = units.get(unit)
        if state is None:
            unit_problems.append(f"{unit}: no unit state")
        elif (state.ver, state.lockout, state.status) != (d.ver, d.lockout, d.status):
            unit_problems.append(f"{unit}: ver {state.ver} lockout {state.lockout} "
                                 f"({state.status}), newest delivered {d.ver} {d.status}")
        elif (state.confirmed_ver or 0) < d.ver:
            unit_problems.append(f"{unit}: newest ver {d.ver} not confirmed "
                                 f"({state.confirmed_ver})")

    # ---- unlocks: one row per key, one jti per row, and only that jti at the gateway
    unlock_rows = [c for c in commands if c.cmd == "unlock"]
    rows_per_key = collections.Counter(c.idempotency_key for c in unlock_rows)
    row_of_key = {c.idempotency_key: c for c in unlock_rows}
    key_problems = []
    for key in sorted(ledger.unlock_unit):
        ids = ledger.unlock_ids.get(key, set())
        row = row_of_key.get(key)
        if rows_per_key[key] != 1 or row is None:
            key_problems.append(f"{key}: {rows_per_key[key]} command rows, answered {ids}")
        elif ids != {row.jti}:
            key_problems.append(f"{key}: answered {sorted(ids)}, its row is {row.jti}")
        elif row.status != "done":
            key_problems.append(f"{key}: {row.jti} ended {row.status} ({row.reason})")
    stray_rows = [c.jti for c in unlock_rows if c.idempotency_key not in ledger.unlock_unit]

    # ---- what the gateway got
    gateway_problems = []
    jtis_per_key: dict[str, set[str]] = collections.defaultdict(set)
    copies = collections.Counter(r.jti for r in received)
    for r in received:
        c = r.claims
        row = by_jti.get(r.jti)
        if r.retain:
            gateway_problems.append(f"{r.jti}: published retained")
        if row is None:
            gateway_problems.append(f"{c['cmd']} {r.jti} for {c['unit']}: no such command row")
            continue
        if (row.cmd, row.unit_id, row.ver) != (c["cmd"], c["unit"], c.get("ver")):
            gateway_problems.append(f"{r.jti}: got {c['cmd']} {c['unit']} ver {c.get('ver')}, "
                                    f"the row is {row.cmd} {row.unit_id} ver {row.ver}")
        if c["cmd"] == "unlock":
            jtis_per_key[str(row.idempotency_key)].add(r.jti)
        elif c["cmd"] in ("lockout", "clear_lockout"):
            vers = {d.ver for d in ledger.sent.values() if d.unit == c["unit"]}
            if c.get("ver") not in vers:
                gateway_problems.append(f"{c['cmd']} {r.jti} for {c['unit']}: ver "
                                        f"{c.get('ver')} never delivered for that unit")
    several = {k: sorted(j) for k, j in jtis_per_key.items() if len(j) > 1}
    last_intent = _last_intents(received)
    for unit, d in sorted(newest.items()):
        got = last_intent.get(unit)
        want = ("lockout" if d.lockout else "clear_lockout", d.ver)
        if got != want:
            gateway_problems.append(f"{unit}: the gateway's newest is {got}, want {want}")

    startups = relay.startups
    statuses = collections.Counter(f"{c.cmd} {c.status}" for c in commands)
    print(
        f"\nrelay kill -9: {len(kill_times)} kills, {len(startups)} starts in "
        f"{time.monotonic() - started:.1f} s (seed {seed}; setup {setup_s:.1f} s, kills "
        f"{kills_s:.1f} s, settle {settle_s:.1f} s, integrity checks "
        f"{check_s / max(1, len(kill_times)) * 1000:.1f} ms a kill)\n"
        f"  relay start-up to healthy: median {statistics.median(startups):.2f} s, "
        f"min {min(startups):.2f} s, max {max(startups):.2f} s\n"
        f"  webhooks: {len(ledger.sent)} events sent, {len(ledger.accepted)} accepted "
        f"({dict(ledger.outcomes)}: a first answer 'duplicate' is a delivery stored just "
        f"before a kill took its answer), sent again after a 200: "
        f"{sum(ledger.again_outcomes.values())} ({dict(ledger.again_outcomes)})\n"
        f"  unlocks: {len(ledger.unlock_unit)} keys, answers {dict(ledger.unlock_answers)}\n"
        f"  requests answered only after failed attempts: {dict(ledger.retried)}; failed "
        f"attempts: {dict(ledger.failures)}\n"
        f"  commands: {dict(statuses)}; at the gateway: {len(received)} messages, "
        f"{len(copies)} jtis, {sum(n - 1 for n in copies.values())} repeated copies\n"
        f"  clean stop: exit {exit_status}; exits of the lives: "
        f"{dict(collections.Counter(relay.exits))}")

    assert ledger.problems == [], "\n".join(ledger.problems[:20])
    assert hung == [], f"traffic threads still running: {hung}"
    assert integrity == [], integrity
    assert final_integrity == "ok"
    assert foreign == []
    assert len(kill_times) >= 100 or KILLS < 100
    # uvicorn (>= 0.29) re-raises SIGTERM after its clean shutdown: -15 is a clean stop.
    assert exit_status in (0, -15), relay.log_tail()
    assert unanswered == [], f"events never answered 200: {unanswered[:20]}"
    assert doubled == {}, f"events stored more than once: {doubled}"
    assert sum(stored.values()) == len(ledger.accepted)
    assert missing == [], f"{len(missing)} events answered 200 but not stored: {missing[:20]}"
    assert unknown == [], unknown
    assert effect_problems == [], "\n".join(effect_problems[:20])
    assert unit_problems == [], "\n".join(unit_problems)
    assert set(ledger.again_outcomes) <= {"duplicate"}, ledger.again_outcomes
    assert key_problems == [], "\n".join(key_problems[:20])
    assert stray_rows == [], stray_rows
    assert several == {}, f"unlocks published under several jtis: {several}"
    assert gateway_problems == [], "\n".join(gateway_problems[:20])
    # Enough traffic for the kills to land in.
    assert len(ledger.accepted) >= KILLS
    assert len(ledger.unlock_unit) >= KILLS // 4


def _last_intents(received: list[Received]) -> dict[str, tuple[str, int]]:
    """Per unit, the lockout or clear with the highest ``ver`` the gateway got."""
    newest: dict[str, tuple[str, int]] = {}
    for r in received:
        c = r.claims
        if c["cmd"] in ("lockout", "clear_lockout"):
            ver = int(c["ver"])
            if c["unit"] not in newest or newest[c["unit"]][1] < ver:
                newest[c["unit"]] = (str(c["cmd"]), ver)
    return newest
