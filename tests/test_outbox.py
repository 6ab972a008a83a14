"""The outbox drainer (gateway/outbox/drainer.py) against the sandbox over real HTTP.

The guarantee is counted at the server: every event queued in SQLite exists exactly once
at the sandbox (``count_by_external_id``), no 1-second or 60-second window holds more
requests than allowed, no fault leaves an event stuck, and a refused one is kept as a
dead letter with Stora's error.  Time is one fake clock shared by the sandbox, the store,
the client's limiter and the drainer, which "sleeps" by advancing it
(``Drainer.run_until_idle``): a two-hour outage costs nothing.  Only the thread test
uses real time, a fraction of a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from devkit.sandbox import EVENT_SCOPE, Sandbox, max_in_window
from devkit.site import RunningAgent
from gateway.cli.main import main
from gateway.config import StoraConfig
from gateway.outbox.drainer import MAX_NOTE_CHARS, Drainer, build_drainer
from gateway.outbox.timeline import external_id_for, make_event
from gateway.stora import (
    MAX_DETAILS,
    MAX_TOKEN_RESPONSE_BYTES,
    USER_AGENT,
    ClientCredentialsTokens,
    FileTokens,
    PostOutcome,
    RateLimiter,
    StoraClient,
)
from gateway.stora.http import MAX_TEXT_CHARS
from gateway.store import SEND_HISTORY_KEEP_S, Store
from tests.support.hostile_http import HostileServer, Reply, Request

T0 = 1_800_000_000.5
PER_S, PER_MIN = 10, 60  # Stora's documented limits (stora-api §5), sandbox and client alike
CLIENT_ID, SECRET = "cid", "s3cr3t-value"
STATIC = "static-1"
EVENTS_PATH = "/2025-09/timeline/events"


class FakeClock:
    """Epoch seconds that move only when told to (thread-safe)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += max(seconds, 0.0)


def record(n: int | str, unit: str = "unit_a101") -> Any:
    return make_event(
        "unlocked", app_name="TestGate", site_id="site_test", unit=unit, reference="A-101",
        external_id=external_id_for("site_test", "outbox-test", str(n)), occurred_at=T0,
        actor="tenant app", detail="for 8 s; unit A-101",
    )


@dataclass
class Rig:
    """A sandbox, a store, a drainer, one fake clock; what the alarms said."""

    sandbox: Sandbox
    clock: FakeClock
    db: Path
    http: httpx.Client
    tmp: Path
    store: Store = field(init=False)
    drainer: Drainer = field(init=False)
    alarms: list[tuple[str, str | None, str]] = field(default_factory=list)

    def open(self, *, auth: str = "static", base_url: str | None = None,
             drainer_cls: type[Drainer] = Drainer, token_url: str | None = None,
             **drainer_options: Any) -> Drainer:
        """(Re)open the store and build a drainer whose limiter starts from the history."""
        self.store = Store(self.db, clock=self.clock)
        history = self.store.send_history(self.clock() - SEND_HISTORY_KEEP_S)
        limiter = RateLimiter(PER_S, PER_MIN, history, clock=self.clock, monotonic=self.clock,
                              sleep=self.clock.advance, on_record=self.store.record_send)
        tokens: ClientCredentialsTokens | FileTokens
        if auth == "client_credentials":
            (self.tmp / "secret").write_text(SECRET + "\n")
            tokens = ClientCredentialsTokens(
                token_url=token_url or self.sandbox.token_url, client_id=CLIENT_ID,
                secret_file=self.tmp / "secret", scope=EVENT_SCOPE, http=self.http,
                limiter=limiter, monotonic=self.clock, clock=self.clock,
                rng=random.Random(7))
        else:
            (self.tmp / "token").write_text(STATIC + "\n")
            tokens = FileTokens(self.tmp / "token", "static")
        client = StoraClient(base_url or self.sandbox.api_url, tokens, limiter, http=self.http,
                             clock=self.clock, rng=random.Random(11))
        self.drainer = drainer_cls(self.store, client, source_id="tsrc_test", template_id=None,
                                   alarm=lambda *a: self.alarms.append(a), clock=self.clock,
                                   **drainer_options)
        return self.drainer

    def add(self, count: int, start: int = 0) -> list[str]:
        """Queue ``count`` events (one transaction each, as units do); their external ids."""
        ids = []
        for n in range(start, start + count):
            rec = record(n)
            with self.store.transaction() as tx:
                assert tx.add_event(rec)
            ids.append(rec.external_id)
        return ids

    def drain(self, stop_when: Callable[[], bool] | None = None,
              max_steps: int = 20_000) -> int:
        return self.drainer.run_until_idle(self.clock.advance, stop_when=stop_when,
                                           max_steps=max_steps)

    def delivered(self) -> int:
        return self.store.event_count("delivered")

    def posts(self) -> list[Any]:
        return [r for r in self.sandbox.requests if r.path == EVENTS_PATH]

    def statuses(self) -> list[int | None]:
        return [r.status for r in self.sandbox.requests]

    def assert_windows(self) -> None:
        times = self.sandbox.request_times()
        assert max_in_window(times, 1.0) <= PER_S
        assert max_in_window(times, 60.0) <= PER_MIN

    def assert_exactly_once(self, ids: list[str], missing: frozenset[str] = frozenset()) -> None:
        counts = self.sandbox.count_by_external_id()
        assert {i: counts.get(i, 0) for i in ids} == {i: 0 if i in missing else 1 for i in ids}
        assert self.sandbox.state()["body_mismatches"] == 0  # one body per key, always


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    # TCP_NODELAY: httpx writes the headers and the body of a POST separately, and with
    # Nagle's algorithm the body then waits for the server's delayed ACK (~40 ms a request).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(timeout=httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0),
                      headers={"User-Agent": USER_AGENT}, transport=transport) as client:
        yield client


@pytest.fixture
def sandbox(clock: FakeClock) -> Iterator[Sandbox]:
    with Sandbox(clients={CLIENT_ID: SECRET}, static_tokens={STATIC}, max_per_second=PER_S,
                 max_per_minute=PER_MIN, clock=clock) as sb:
        yield sb


@pytest.fixture
def rig(sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(sandbox, clock, tmp_path / "gateway.db", http, tmp_path)
    r.open()
    yield r
    r.store.close()


# -- the acceptance cases -----------------------------------------------------------------
def test_two_hour_outage_then_500_events_delivered_once_within_the_limits(rig: Rig) -> None:
    rig.sandbox.set_outage(True)
    ids = rig.add(500)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 7200)
    outage_probes = [r for r in rig.sandbox.requests if r.refused]
    # The whole drain backs off on a dead connection: one probe per backoff step (capped
    # at 5 min), not one per queued event.
    assert 0 < len(outage_probes) < 150
    assert rig.drainer.state == "backing off"
    assert rig.store.outbox_summary(rig.clock())["pending"] == 500
    rig.sandbox.set_outage(False)
    rig.drain()
    rig.assert_exactly_once(ids)
    assert rig.store.event_count("pending") == 0
    assert rig.delivered() == 500
    assert rig.drainer.state == "ok"
    rig.assert_windows()
    assert 429 not in rig.statuses()  # the limits equal the sandbox's: never refused
    # The limit is the bottleneck, and it is used: 500 events at 60/min take about
    # 8 1/3 minutes from the first success to the last.
    created = [r.at for r in rig.posts() if r.status == 201]
    assert len(created) == 500
    assert created[-1] - created[0] < (500 / PER_MIN) * 60 * 1.05
    # Delivered two hours late: each one says when it happened, except the one whose
    # body was frozen at its first attempt, at the start of the outage (every attempt
    # under one key sends the same bytes).
    events = rig.sandbox.events()
    assert "happened at" not in events[0]["description"]
    assert all("happened at" in e["description"] for e in events[1:])
    assert all(e["variables"]["delivered_late"] is True for e in events[1:])


def test_faults_with_events_flowing_each_event_once_422_dead_lettered(rig: Rig) -> None:
    rig.store.close()
    rig.open(auth="client_credentials")
    ids = rig.add(40)
    rejected = ids[25]
    rig.sandbox.reject_external_ids([rejected])
    rig.sandbox.fail_next(1, 500)  # stored under the first event's key: escaped by rotating
    rig.drain(stop_when=lambda: rig.delivered() >= 5)
    rig.sandbox.storm(20)  # 429 storm
    rig.drain(stop_when=lambda: rig.delivered() >= 10)
    rig.sandbox.drop_after_commit(1)  # committed, then the response is lost
    rig.drain(stop_when=lambda: rig.delivered() >= 15)
    rig.sandbox.expire_tokens()  # token expiry mid-drain
    rig.drain()

    statuses = rig.statuses()
    assert statuses.count(500) == 1
    assert 429 in statuses
    assert 401 in statuses
    assert sum(r.dropped for r in rig.sandbox.requests) == 1
    assert sum(r.replayed and r.status == 201 for r in rig.sandbox.requests) == 1
    rig.assert_exactly_once(ids, missing=frozenset({rejected}))
    rig.assert_windows()
    # Nothing stuck: everything delivered but the refused one, kept with its error.
    assert rig.store.event_count("pending") == 0
    (dead,) = rig.store.events(state="dead")
    assert dead.external_id == rejected
    assert dead.attempts == 1  # dead-lettered after one attempt
    assert (dead.dead_status, dead.dead_code) == (422, "invalid_content")
    assert dead.dead is not None
    assert dead.dead["idempotency_key"] == f"{rejected}.0"
    assert dead.dead["details"][0]["pointer"] == "/external/id"
    assert dead.as_dict()["error"]["status"] == 422
    (alarm,) = [a for a in rig.alarms if a[0] == "timeline_dead_letter"]
    assert alarm[1] == "unit_a101"
    assert "422 invalid_content" in alarm[2]
    first = rig.store.events(state="delivered", limit=1)[0]
    assert first.generation == 1  # the stored 500 was left behind under key .0
    assert rig.store.outbox_summary(rig.clock())["dead"] == 1

    # A person fixes the cause and retries it: delivered once, under a new key.
    rig.sandbox.reject_external_ids([])
    assert rig.store.retry_dead(dead.seq) == [dead.seq]
    assert rig.store.retry_dead(dead.seq) == []  # no longer dead
    rig.drain()
    rig.assert_exactly_once(ids)
    again = rig.store.event(dead.seq)
    assert again is not None
    assert again.state == "delivered"
    assert again.generation == 1
    keys = [r.idempotency_key for r in rig.posts() if r.idempotency_key
            and r.idempotency_key.startswith(rejected)]
    assert keys == [f"{rejected}.0", f"{rejected}.1"]
    rig.assert_windows()


class Crash(BaseException):
    """Stands in for kill -9 between the answer and the write of the outcome."""


class CrashingDrainer(Drainer):
    crash_after = 70

    def _settle(self, row: Any, outcome: PostOutcome) -> None:
        if self.counters["attempts"] + 1 >= self.crash_after:
            raise Crash
        super()._settle(row, outcome)


def test_restart_mid_drain_keeps_the_limits_and_duplicates_nothing(rig: Rig) -> None:
    ids = rig.add(150)
    rig.store.close()
    rig.open(drainer_cls=CrashingDrainer)
    with pytest.raises(Crash):
        rig.drain()
    # The 70th event reached Stora but its outcome was never written.
    assert rig.delivered() == 69
    assert len(rig.sandbox.events()) == 70
    rig.open()  # a new store on the same file and a limiter from the persisted history
    rig.drain()
    rig.assert_exactly_once(ids)
    replays = [r for r in rig.posts() if r.replayed]
    assert len(replays) == 1  # the lost outcome came back as a replayed 201
    assert rig.delivered() == 150
    # The restart came right after a full minute's worth of sends: without the history
    # a fresh limiter would send 10 at once and break the 60-second window.
    rig.assert_windows()
    assert 429 not in rig.statuses()


class DiesInFlight(Drainer):
    """Stands in for kill -9 while a POST is in flight: its answer is never settled."""

    def _settle(self, row: Any, outcome: PostOutcome) -> None:
        raise Crash


def test_a_post_in_flight_when_the_gateway_died_is_retried_as_unanswered(rig: Rig) -> None:
    """Found by tests/test_outbox_kill.py's reasoning: after a restart, the key of the
    attempt the dead process had in flight must count as unanswered.  Else Stora's
    "409: a request with this key is in progress" (its first request still running)
    dead-letters an event that is being created, and a person retrying it (a new key)
    would create it twice; and the 24-hour replay window would not be enforced."""
    ids = rig.add(1)
    rig.store.close()
    first = rig.open(drainer_cls=DiesInFlight)
    rig.sandbox.set_slow(0.5)  # Stora is slow: the request outlives the process

    def first_life() -> None:
        with contextlib.suppress(Crash):
            first.step()

    thread = threading.Thread(target=first_life)
    thread.start()
    # (private: the only way to see "the server is processing it" from outside)
    wait_for(lambda: bool(rig.sandbox._inflight), 5)
    rig.sandbox.set_slow(0)
    second = rig.open()  # the restarted gateway, on the same file
    assert second.guarded_step() == 0.0  # 409: the first request is still in progress
    assert rig.store.event_count("dead") == 0
    assert rig.alarms == []
    row = rig.store.events()[0]
    assert row.state == "pending"
    assert row.generation == 0  # the key is kept, marked unanswered
    assert row.unanswered_since is not None
    assert row.attempts == 2  # the lost attempt counts
    thread.join()
    first.store.close()
    rig.drain()
    rig.assert_exactly_once(ids)
    # In the order answered: the 409, the slow first request's 201, its replay.
    assert [(r.status, r.replayed) for r in rig.posts()] == [
        (409, False), (201, False), (201, True)]
    assert rig.delivered() == 1
    assert rig.alarms == []


# -- pauses -----------------------------------------------------------------------------
def test_refused_credential_pauses_without_a_tight_loop_then_resumes(rig: Rig) -> None:
    rig.store.close()
    rig.open(auth="client_credentials")
    (rig.tmp / "secret").write_text("wrong\n")
    ids = rig.add(5)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 3600)
    assert rig.drainer.state == "paused: auth"
    token_calls = [r for r in rig.sandbox.requests if r.path == "/oauth2/token"]
    assert 1 <= len(token_calls) <= 10  # an hour: retried slowly (60 s doubling to 15 min)
    assert not rig.posts()
    assert [a[0] for a in rig.alarms] == ["timeline_auth"]  # once
    assert rig.store.event_count("pending") == 5  # events keep buffering
    rig.add(2, start=5)
    (rig.tmp / "secret").write_text(SECRET + "\n")  # fixed; no restart needed
    rig.drain()
    assert rig.drainer.state == "ok"
    rig.assert_exactly_once([*ids, record(5).external_id, record(6).external_id])


def test_wrong_base_url_pauses_as_config_without_dead_letters(rig: Rig) -> None:
    rig.store.close()
    rig.open(base_url=rig.sandbox.url + "/2024-01")  # 404 invalid_endpoint for every event
    rig.add(3)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 3600)
    assert rig.drainer.state == "paused: config"
    assert rig.store.event_count("dead") == 0
    assert rig.store.event_count("pending") == 3
    posts = [r for r in rig.sandbox.requests if r.path.endswith("/timeline/events")]
    assert 1 <= len(posts) <= 10  # an hour: retried slowly
    assert all(r.status == 404 for r in posts)
    assert [a[0] for a in rig.alarms] == ["timeline_config"]
    assert "invalid_endpoint" in rig.alarms[0][2]


def test_storage_failure_while_draining_is_an_alarm_and_a_backoff(rig: Rig) -> None:
    rig.add(1)
    rig.store.close()  # every read and write now fails with StoreError
    delays = [rig.drainer.guarded_step() for _ in range(4)]
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert rig.drainer.state == "paused: storage"
    assert [a[0] for a in rig.alarms] == ["timeline_outbox_storage"]
    rig.open()


def test_thread_is_woken_by_new_events_and_stops_promptly(tmp_path: Path,
                                                          http: httpx.Client) -> None:
    with Sandbox(static_tokens={STATIC}, max_per_second=PER_S,
                 max_per_minute=PER_MIN) as sandbox, Store(tmp_path / "g.db") as store:
        (tmp_path / "token").write_text(STATIC)
        client = StoraClient(sandbox.api_url, FileTokens(tmp_path / "token"),
                             RateLimiter(PER_S, PER_MIN, on_record=store.record_send),
                             http=http)
        drainer = Drainer(store, client, source_id="tsrc_test", template_id=None)
        store.on_events_added = lambda n: drainer.wake()
        drainer.start()
        time.sleep(0.2)  # idle: waiting up to IDLE_WAIT_S (60 s) unless woken
        with store.transaction() as tx:
            tx.add_event(record(1))
        deadline = time.monotonic() + 5
        while store.event_count("delivered") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.event_count("delivered") == 1
        started = time.monotonic()
        drainer.stop()
        assert time.monotonic() - started < 1.0
        assert drainer.state == "stopped"
        assert len(store.send_history(0)) == 1  # the send was persisted


# -- the CLI (direct mode: no agent running) ------------------------------------------------
def write_config(tmp: Path) -> Path:
    token = tmp / "token"
    token.write_text(STATIC)
    token.chmod(0o600)
    config = tmp / "gateway.toml"
    config.write_text(f"""\
[site]
id = "site_test"
app_name = "TestGate"

[mqtt]
host = "127.0.0.1"

[commands]
trusted_keys = {{ k = "{'A' * 43}" }}

[stora]
base_url = "http://127.0.0.1:9/2025-09"
auth = "static"
token_file = "{token}"
timeline_source_id = "tsrc_test"

[storage]
path = "{tmp / 'gateway.db'}"

[control]
socket = "{tmp / 'no-agent.sock'}"

[[controllers]]
name = "bus1"
driver = "modbus"
port = "/dev/ttyUSB9"
address = 1

[[locks]]
unit = "unit_a101"
reference = "A-101"
controller = "bus1"
channel = 0
""")
    return config


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_outbox_lists_and_retries_directly(rig: Rig) -> None:
    ids = rig.add(4)
    rig.sandbox.reject_external_ids([ids[1]])
    rig.drain(stop_when=lambda: rig.delivered() >= 2)
    rig.store.close()
    config = write_config(rig.tmp)
    code, out, err = cli("outbox", "--config", str(config), "--json")
    assert (code, err) == (0, "")
    listing = json.loads(out)
    assert listing["summary"]["pending"] == 1
    assert listing["summary"]["dead"] == 1
    assert listing["summary"]["drain"] == "agent not running"
    assert [(e["state"], e["external_id"]) for e in listing["events"]] == [
        ("pending", ids[3]), ("dead", ids[1])]
    code, out, _ = cli("outbox", "--dead", "--config", str(config))
    assert code == 0
    assert "pending 1" in out
    assert "dead 1" in out
    assert "422 invalid_content" in out
    assert "/external/id" in out
    dead_seq = next(e["seq"] for e in listing["events"] if e["state"] == "dead")
    code, _, err = cli("outbox", "retry", str(dead_seq + 100), "--config", str(config))
    assert code == 1
    assert "no dead-lettered event" in err
    code, _, err = cli("outbox", "retry", "--config", str(config))
    assert code == 2
    code, out, _ = cli("outbox", "retry", str(dead_seq), "--config", str(config), "--json")
    assert (code, json.loads(out)) == (0, {"retried": [dead_seq]})
    rig.sandbox.reject_external_ids([])
    rig.open()
    assert rig.store.event_count("dead") == 0
    rig.drain()
    rig.assert_exactly_once(ids)
    code, out, _ = cli("outbox", "retry", "--all-dead", "--config", str(config))
    assert (code, out) == (0, "no dead-lettered events\n")


# -- the agent: wiring, status, control socket, storage faults ------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    from devkit.mosquitto import Broker

    with Broker(tmp_path / "broker") as b:
        yield b


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.simulator_only
def test_agent_delivers_dead_letters_and_retries_through_the_control_socket(
        tmp_path: Path, broker: Any) -> None:
    from devkit.site import PREFIX, SITE, STORA_TOKEN, make_site
    from gateway.ops.control import ControlClient, ControlError

    with Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        try:
            watcher = site.client()
            with RunningAgent(site.config_path) as agent:
                jti, token = site.signer.command("unlock", "unit_a101", dur=1)
                unlocked = external_id_for(SITE, jti, "unlocked")
                sandbox.reject_external_ids([unlocked])
                watcher.publish(f"{PREFIX}/cmd", token, qos=1)
                # The unlock is refused (422) and dead-lettered; its relock is delivered.
                wait_for(lambda: agent.store.event_count("dead") == 1
                         and agent.store.event_count("pending") == 0
                         and len(sandbox.events()) == 1)
                [alarm] = watcher.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
                    m.payload)["kind"] == "timeline_dead_letter")
                assert json.loads(alarm.payload)["unit"] == "unit_a101"
                status = ControlClient(site.socket_path, timeout=5).call("status")["outbox"]
                assert (status["pending"], status["dead"], status["drain"]) == (0, 1, "ok")
                code, out, _ = cli("outbox", "--dead", "--json", "--config",
                                   str(site.config_path))
                assert code == 0
                listing = json.loads(out)
                assert listing["summary"]["drain"] == "ok"  # the agent answered
                [dead] = listing["events"]
                assert dead["external_id"] == unlocked
                assert dead["error"]["code"] == "invalid_content"
                control = ControlClient(site.socket_path, timeout=5)
                with pytest.raises(ControlError, match="no dead-lettered event") as info:
                    control.call("outbox.retry", seq=dead["seq"] + 99)
                assert info.value.status == 1
                with pytest.raises(ControlError, match="needs an event id") as info:
                    control.call("outbox.retry", seq="all")
                assert info.value.status == 2
                sandbox.reject_external_ids([])
                code, out, _ = cli("outbox", "retry", "--all-dead", "--json", "--config",
                                   str(site.config_path))
                assert (code, json.loads(out)) == (0, {"retried": [dead["seq"]]})
                wait_for(lambda: sandbox.count_by_external_id().get(unlocked) == 1)
                wait_for(lambda: agent.store.event_count("delivered") == 2)
            counts = sandbox.count_by_external_id()
            assert sorted(counts.values()) == [1, 1]
            assert 429 not in [r.status for r in sandbox.requests]
        finally:
            site.close()


def corrupt_freelist(db: Path) -> None:
    """Damage the header's freelist count: quick_check fails, the tables stay readable."""
    data = bytearray(db.read_bytes())
    data[36:40] = (3).to_bytes(4, "big")
    db.write_bytes(bytes(data))


@pytest.mark.simulator_only
@pytest.mark.parametrize(("damage", "said"), [
    (corrupt_freelist, "3 undelivered Timeline Event(s) lost"),
    (lambda db: db.write_bytes(bytes(db.stat().st_size)),
     "an unknown number of undelivered Timeline Event(s) lost"),
])
def test_a_corrupt_database_at_start_is_quarantined_and_the_loss_counted(
        tmp_path: Path, broker: Any, damage: Callable[[Path], None], said: str) -> None:
    from devkit.site import PREFIX, make_site

    site = make_site(tmp_path, broker)
    try:
        db = tmp_path / "state" / "gateway.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        with Store(db) as store:
            for n in range(3):
                with store.transaction() as tx:
                    tx.add_event(record(n))
        damage(db)
        watcher = site.client()
        with RunningAgent(site.config_path) as agent:
            [alarm] = watcher.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
                m.payload)["kind"] == "storage_corrupt")
            assert said in json.loads(alarm.payload)["detail"]
            assert agent.store.event_count() == 0  # started empty
            assert list(db.parent.glob("gateway.db.bad-*"))
            jti, token = site.signer.command("lock", "unit_a101")  # locks keep working
            watcher.publish(f"{PREFIX}/cmd", token, qos=1)
            [res] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            assert json.loads(res.payload)["status"] == "done"
    finally:
        site.close()


@pytest.fixture
def small_state_fs(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/state`` (the site's database directory) on a 1 MiB tmpfs; needs root."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); disk-full agent test skipped")
    state = tmp_path / "state"
    state.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs",
                           str(state)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; return it (delete it to free space)."""
    import os

    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.simulator_only
def test_disk_full_locks_keep_working_and_events_are_refused_loudly(
        tmp_path: Path, broker: Any, small_state_fs: Path) -> None:
    from devkit.site import PREFIX, make_site
    from gateway.ops.control import ControlClient

    site = make_site(tmp_path, broker)
    try:
        watcher = site.client()

        def result(jti: str) -> dict[str, Any]:
            [msg] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            return dict(json.loads(msg.payload))

        with RunningAgent(site.config_path) as agent:
            j1, t1 = site.signer.command("unlock", "unit_a101", dur=2)
            j2, t2 = site.signer.command("unlock", "unit_a102", dur=60)
            watcher.publish(f"{PREFIX}/cmd", t1, qos=1)
            watcher.publish(f"{PREFIX}/cmd", t2, qos=1)
            assert result(j1)["status"] == result(j2)["status"] == "done"
            assert site.coil("unit_a101")
            assert site.coil("unit_a102")
            filler = fill(small_state_fs)
            # A lockout cannot be recorded, but the door is locked all the same.
            j3, t3 = site.signer.command("lockout", "unit_a102", ver=1)
            watcher.publish(f"{PREFIX}/cmd", t3, qos=1)
            assert result(j3)["status"] == "failed"
            wait_for(lambda: not site.coil("unit_a102"), 5)
            # The relock timer fires on a full disk: locked, its event refused.
            wait_for(lambda: not site.coil("unit_a101"), 5)
            wait_for(lambda: agent.store.events_refused >= 1, 5)
            alarms = [json.loads(m.payload) for m in watcher.messages(f"{PREFIX}/alarm")]
            full = [a for a in alarms if a["kind"] == "storage_full"]
            assert full
            assert "Timeline Event(s) refused so far" in full[0]["detail"]
            status = ControlClient(site.socket_path, timeout=5).call("status")
            assert status["outbox"]["events_refused"] >= 1  # the agent is alive and says so
            # Space freed: everything works again, without a restart.
            filler.unlink()
            j4, t4 = site.signer.command("lock", "unit_a103")
            watcher.publish(f"{PREFIX}/cmd", t4, qos=1)
            assert result(j4)["status"] == "done"
            assert any(e.external_id == external_id_for("site_test", j4, "locked")
                       for e in agent.store.events(limit=1000))
    finally:
        site.close()


@pytest.mark.simulator_only
def test_read_only_storage_at_start_runs_on_memory_with_an_alarm(
        tmp_path: Path, broker: Any, small_state_fs: Path) -> None:
    import subprocess

    from devkit.site import PREFIX, make_site

    site = make_site(tmp_path, broker)
    try:
        Store(small_state_fs / "gateway.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(small_state_fs)], check=True)
        watcher = site.client()
        with RunningAgent(site.config_path) as agent:  # no crash, no crash loop
            [alarm] = watcher.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
                m.payload)["kind"] == "storage_unavailable")
            detail = json.loads(alarm.payload)["detail"]
            assert "read-only" in detail
            assert "NOT kept across a restart" in detail
            assert agent.store.ephemeral
            jti, token = site.signer.command("unlock", "unit_a101", dur=1)
            watcher.publish(f"{PREFIX}/cmd", token, qos=1)  # locks keep working
            [res] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            assert json.loads(res.payload)["status"] == "done"
            wait_for(lambda: not site.coil("unit_a101"), 5)  # and relock
    finally:
        site.close()


@pytest.mark.simulator_only
def test_agent_process_killed_mid_drain_delivers_each_event_once(
        tmp_path: Path, broker: Any) -> None:
    """The harness the kill -9 x300 test builds on: a real agent, a real sandbox."""
    import sqlite3

    from devkit.site import PREFIX, SITE, STORA_TOKEN, AgentProcess, make_site

    with Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        agent = AgentProcess(site)
        try:
            watcher = site.client()
            expected = []
            agent.start()
            for round_ in range(2):
                for unit in ("unit_a101", "unit_a102", "unit_b201"):
                    jti, token = site.signer.command("lock", unit)
                    watcher.publish(f"{PREFIX}/cmd", token, qos=1)
                    watcher.expect(f"{PREFIX}/cmd/result", 10, where=lambda m, j=jti: json.loads(
                        m.payload)["jti"] == j)
                    expected.append(external_id_for(SITE, jti, "locked"))
                if round_ == 0:
                    agent.kill()  # kill -9, whatever the drainer was doing
                    agent.start()
            wait_for(lambda: set(expected) <= set(sandbox.count_by_external_id()), 15)
            agent.stop()
            counts = sandbox.count_by_external_id()
            assert [counts[e] for e in expected] == [1] * len(expected)
            assert max(counts.values()) == 1
            times = sandbox.request_times()
            assert max_in_window(times, 1.0) <= PER_S
            assert max_in_window(times, 60.0) <= PER_MIN
            conn = sqlite3.connect(tmp_path / "state" / "gateway.db")
            try:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                pending = conn.execute(
                    "SELECT count(*) FROM events WHERE state = 'pending'").fetchone()[0]
                assert pending == 0
            finally:
                conn.close()
        finally:
            agent.kill()
            site.close()


def test_a_wall_clock_stepped_back_does_not_hold_events(rig: Rig) -> None:
    ids = rig.add(2)
    rig.sandbox.fail_next(1, 500)
    assert rig.drainer.guarded_step() == 0.0  # 500: the first event waits its backoff
    rig.clock.now -= 86_400  # the wall clock goes back a day
    rig.sandbox.advance(86_400)  # (the sandbox's own time is not the gateway's)
    rig.drain(max_steps=10)  # without the pull-forward: a day of 30-minute waits
    rig.assert_exactly_once(ids)


def test_missing_scope_pauses_then_a_fixed_scope_delivers_under_a_new_key(rig: Rig) -> None:
    rig.store.close()
    rig.open(auth="client_credentials")
    tokens = rig.drainer.client.tokens
    assert isinstance(tokens, ClientCredentialsTokens)
    tokens.scope = "public.site:read"  # a token without public.timeline_event:write
    (ext,) = rig.add(1)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 600)
    assert rig.drainer.state == "paused: config"
    assert rig.store.event_count("dead") == 0
    assert [a[0] for a in rig.alarms] == ["timeline_config"]
    assert "403 forbidden" in rig.alarms[0][2]
    # The operator grants the scope.  The 403 is stored under the first key for a day,
    # so only a new key can get through; nothing was created under the old one.
    tokens.scope = EVENT_SCOPE
    tokens.invalidate(tokens.token())
    fixed_at = rig.clock()
    rig.drain()
    rig.assert_exactly_once([ext])
    # At the next slow retry, not after the stored 403 expires a day later.
    assert rig.clock() - fixed_at < 1800
    assert rig.drainer.state == "ok"
    row = rig.store.events()[0]
    assert row.state == "delivered"
    assert row.generation >= 1
    assert [r.status for r in rig.posts()][-1] == 201


# -- issue 11: what comes back from Stora is bounded ------------------------------------------
def all_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from all_strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from all_strings(v)


def test_a_403_with_an_80_kb_message_is_capped_in_everything_kept(rig: Rig) -> None:
    rig.sandbox.fail_next(1_000, 403, message_chars=80_000)
    rig.add(2)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 600)
    assert rig.drainer.state == "paused: config"
    assert rig.store.event_count("dead") == 0
    assert [a[0] for a in rig.alarms] == ["timeline_config"]
    detail = rig.alarms[0][2]
    assert len(detail) <= MAX_NOTE_CHARS
    assert "…(+" in detail  # the cut is visible
    status = rig.drainer.status()
    assert len(status["last_error"]) <= MAX_NOTE_CHARS
    assert len(json.dumps(status)) < 2 * MAX_NOTE_CHARS
    for row in rig.store.events():
        assert row.last_error is None or len(row.last_error) <= MAX_NOTE_CHARS


def test_a_refusal_with_huge_details_is_a_small_dead_letter(rig: Rig) -> None:
    # 1 000 details of 500 characters: half a MiB, under the 1 MiB read cap.
    rig.sandbox.fail_next(1, 422, message_chars=500, details=1_000)
    (ext,) = rig.add(1)
    rig.drain()
    (row,) = rig.store.events()
    assert row.state == "dead"
    error = row.as_dict()["error"]
    assert len(error["details"]) == MAX_DETAILS + 1  # the last one says how many were cut
    assert error["details"][-1]["message"] == f"…(+{1_000 - MAX_DETAILS} more details)"
    assert all(len(text) <= MAX_TEXT_CHARS for text in all_strings(error))
    assert len(json.dumps(error)) < 16 * MAX_TEXT_CHARS
    assert row.last_error is not None
    assert len(row.last_error) <= MAX_NOTE_CHARS
    assert [a[0] for a in rig.alarms] == ["timeline_dead_letter"]
    assert len(rig.alarms[0][2]) <= MAX_NOTE_CHARS
    assert ext not in rig.sandbox.count_by_external_id()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_pauses_delivery_as_config_until_fixed(rig: Rig, status: int) -> None:
    with HostileServer(lambda r: Reply(201)) as elsewhere:
        rig.sandbox.redirect_next(1_000, status, location=elsewhere.url)
        ids = rig.add(4)
        rig.drain(stop_when=lambda: rig.clock() >= T0 + 3600)
        assert rig.drainer.state == "paused: config"
        assert rig.store.event_count("dead") == 0
        assert rig.store.event_count("pending") == 4
        assert [a[0] for a in rig.alarms] == ["timeline_config"]  # one alarm, not four
        assert f"{status} redirect" in rig.alarms[0][2]
        assert "base_url" in rig.alarms[0][2]
        assert "redirect" in rig.drainer.status()["last_error"]
        posts = rig.posts()
        assert 1 <= len(posts) <= 10  # an hour: retried slowly
        assert {r.status for r in posts} == {status}
        assert elsewhere.requests == []  # never followed, so the token never went there
    rig.sandbox.redirect_next(0)  # base_url fixed (or the API is back where it was)
    rig.drain()
    rig.assert_exactly_once(ids)
    assert rig.drainer.state == "ok"


def memory_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(text.split(f"{k}:")[1].split()[0]) for k in ("VmHWM", "VmRSS")}


def reset_peak_rss() -> bool:
    """Start the process's RSS high-water mark (VmHWM) at now; False where Linux cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def test_a_300_mb_token_answer_is_cut_at_the_cap(rig: Rig) -> None:
    size = 300 * 1024 * 1024

    def token(request: Request) -> Reply:
        return Reply(200, headers=[("Content-Type", "application/json")], size=size)

    with HostileServer(token) as server:
        rig.store.close()
        rig.open(auth="client_credentials", token_url=server.url + "/oauth2/token")
        rig.add(1)
        measured = reset_peak_rss()
        before = memory_kib()["VmRSS"]
        rig.drainer.guarded_step()
        grown_mib = (memory_kib()["VmHWM"] - before) / 1024
    assert len(server.requests) == 1
    # The client read 64 KiB and hung up; what the server got out is the socket buffers.
    assert server.bytes_sent < 16 * 1024 * 1024
    assert grown_mib < 32 or not measured  # today's code: +900 MiB
    status = rig.drainer.status()
    assert status["drain"] == "backing off"
    assert f"more than {MAX_TOKEN_RESPONSE_BYTES} bytes" in status["last_error"]
    assert status["token"]["state"] == "failing"
    assert f"more than {MAX_TOKEN_RESPONSE_BYTES} bytes" in status["token"]["last_error"]
    assert rig.store.event_count("pending") == 1
    print(f"300 MiB token answer: {server.bytes_sent} bytes sent, RSS peak +{grown_mib:.1f} MiB")


def test_a_dripping_token_answer_ends_by_its_deadline_shows_and_alarms(
        tmp_path: Path, http: httpx.Client) -> None:
    deadline_s, alarm_after_s = 1.5, 3.0  # production: 15 s and 30 s
    body = b'{"access_token": "tok", "token_type": "Bearer", "expires_in": 7200}'

    def token(request: Request) -> Reply:
        return Reply(200, body, [("Content-Type", "application/json")], drip_s=0.5)

    alarms: list[tuple[float, str, str]] = []
    with HostileServer(token) as server, Store(tmp_path / "g.db") as store:
        (tmp_path / "secret").write_text(SECRET)
        limiter = RateLimiter(PER_S, PER_MIN)
        tokens = ClientCredentialsTokens(
            token_url=server.url + "/oauth2/token", client_id=CLIENT_ID,
            secret_file=tmp_path / "secret", scope=EVENT_SCOPE, http=http, limiter=limiter,
            deadline_s=deadline_s)
        client = StoraClient("http://127.0.0.1:9/2025-09", tokens, limiter, http=http)
        started = time.monotonic()
        drainer = Drainer(store, client, source_id="tsrc_test", template_id=None,
                          alarm=lambda k, u, d: alarms.append((time.monotonic(), k, d)),
                          token_alarm_after_s=alarm_after_s)
        with store.transaction() as tx:
            tx.add_event(record(1))
        first = threading.Thread(target=drainer.guarded_step)
        first.start()
        seen: dict[str, Any] = {}
        while first.is_alive():  # the agent's status, asked while the refresh is stuck
            seen = drainer.status()["token"]
            if (seen["refreshing_for_s"] or 0) >= 0.5:
                break
            time.sleep(0.05)
        first.join()
        first_took = time.monotonic() - started
        assert first_took < deadline_s + 1.0
        assert seen["state"] == "refreshing"
        while not alarms and time.monotonic() - started < 20:
            time.sleep(min(drainer.guarded_step(), 0.5))
        status = drainer.status()
    assert [a[1] for a in alarms] == ["timeline_token"]
    # At most one refresh in flight when the alarm falls due, and it ends by its deadline:
    # alarm_after_s + deadline_s, plus slack for a loaded machine (production: 45 s).
    assert alarms[0][0] - started < alarm_after_s + deadline_s + 2.0
    assert f"no complete answer within {deadline_s:g} s" in alarms[0][2]
    assert status["drain"] == "backing off"
    assert status["token"]["state"] == "failing"
    assert f"within {deadline_s:g} s" in status["last_error"]
    assert len(server.requests) >= 1
    print(f"dripping token answer: first refresh ended after {first_took:.2f} s "
          f"(deadline {deadline_s} s), alarm after {alarms[0][0] - started:.2f} s "
          f"(due at {alarm_after_s} s), {len(server.requests)} token requests")


def test_build_drainer_passes_stora_dates_to_the_clock(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(STATIC)
    dates: list[float] = []
    with Sandbox(static_tokens={STATIC}) as sandbox, Store(tmp_path / "g.db") as store:
        cfg = StoraConfig(
            base_url=sandbox.api_url, auth="static", token_url=sandbox.token_url,
            client_id="", client_secret_file=None, token_file=tmp_path / "token",
            scope=EVENT_SCOPE, timeline_source_id="tsrc_test", timeline_template_id="",
            max_per_second=PER_S, max_per_minute=PER_MIN)
        drainer = build_drainer(SimpleNamespace(stora=cfg), store, on_server_date=dates.append)
        with store.transaction() as tx:
            tx.add_event(record(1))
        before = time.time()
        drainer.run_until_idle(time.sleep, max_steps=20)
        drainer.client.close()
        assert store.event_count("delivered") == 1
    assert len(dates) == 1  # the sandbox stamps its replies with the real time
    assert before - 2 <= dates[0] <= time.time() + 1
