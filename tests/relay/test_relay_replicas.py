"""Two relay replicas on one PostgreSQL database (issue 15): what must happen once happens
once, whichever replica does it.

Each replica here is a :class:`~relay.services.Services` of its own, with its own
engine and connection pool on the same database, served over real HTTP or linked to a
real Mosquitto: the database is the only thing they share, as two processes would.
The replicas' kill -9 test is ``test_relay_kill.py`` on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from devkit.mosquitto import Broker, free_port
from devkit.testing import wait_for
from relay.commands import apply_result
from relay.db.engine import Database
from relay.db.models import Command, UnitState, WebhookEvent
from relay.link import RelayLink
from relay.metrics import REGISTRY
from relay.operators import StoraSite
from relay.outbox import Outbox, ResendPolicy, resend_intents
from relay.services import Services
from relay.stora import TokenSet
from relay.tokens import REFRESH_AT
from relay.webhooks import apply_unit, sign
from sitelink.payloads import result_payload, rfc3339
from tests.support.relay import RelayOnDisk, RelayServer, relay_on_disk
from tests.support.relay_connect import broker_stack, sites_spec
from tests.support.relay_gateway import (
    PREFIX,
    SITE,
    FakeGateway,
    LinkRunner,
    Relay,
    make_relay,
    silent,
)

pytestmark = pytest.mark.backends("postgresql")

T0 = 1_790_000_000_000


def second_replica(on_disk: RelayOnDisk | Services) -> Services:
    """Another replica: the same config and keys, its own engine on the same database."""
    config, keyring = on_disk.config, on_disk.keyring
    return Services.build(config, keyring, db=Database(config.database.url))


# --------------------------------------------------------------------------- webhooks


@dataclasses.dataclass
class Delivered:
    event_id: str
    unit: str
    ver: int
    answers: list[tuple[int, str]]


@pytest.fixture
def two_replicas(tmp_path: Path) -> Iterator[tuple[RelayServer, RelayServer, str, str]]:
    relay = relay_on_disk(tmp_path / "relay")
    first = relay.services()
    op = first.operators.connect(TokenSet("at", "rt", 7200, "", 0), [StoraSite(SITE, "One")])
    secret = secrets.token_hex(32)
    first.operators.set_webhook(op, "we_test", secret)
    first.sites.add(SITE, op)
    second = second_replica(relay)
    try:
        with RelayServer(first) as a, RelayServer(second, port=free_port()) as b:
            yield a, b, first.operators.webhook_key(op), secret
    finally:
        second.close()
        first.close()


def test_the_same_webhook_at_two_replicas_at_once_has_its_effect_once(
        two_replicas: tuple[RelayServer, RelayServer, str, str]) -> None:
    """200 events (10 units, each overlocked and freed in turn), each delivered to both
    replicas at the same instant: one dedupe row and one command per event, the other
    delivery a duplicate, never a 500."""
    a, b, key, secret = two_replicas
    events: list[Delivered] = []
    for i in range(200):
        n = i // 10
        events.append(Delivered("evt_" + secrets.token_hex(8), f"unit_{i % 10}",
                                T0 + n * 1000, []))
    barrier = threading.Barrier(2)

    def deliver(http: httpx.Client, event: Delivered, body: bytes, header: str) -> None:
        barrier.wait(10)
        answer = http.post(f"/webhooks/stora/{key}", content=body,
                           headers={"X-Stora-Signature": header,
                                    "Content-Type": "application/json"})
        event.answers.append((answer.status_code, answer.json().get("outcome", "")))

    with httpx.Client(base_url=a.url, timeout=30) as to_a, \
            httpx.Client(base_url=b.url, timeout=30) as to_b, \
            ThreadPoolExecutor(2) as pool:
        for event in events:
            status = "overlocked" if (event.ver - T0) // 1000 % 2 == 0 else "occupied"
            body = json.dumps({"event": {
                "id": event.event_id, "type": "unit.updated", "api_version": "2025-09",
                "created_at": rfc3339(time.time()),
                "data": {"unit": {"id": event.unit, "status": status, "site": {"id": SITE},
                                  "updated_at": rfc3339(event.ver / 1000)}}}}).encode()
            header = sign(secret, int(time.time()), body)
            both = [pool.submit(deliver, http, event, body, header) for http in (to_a, to_b)]
            for future in both:
                future.result(30)

    outcomes = collections.Counter(tuple(sorted(e.answers)) for e in events)
    assert outcomes == {((200, "command"), (200, "duplicate")): 200}, outcomes
    with a.services.db.read() as s:
        assert s.scalar(select(func.count()).select_from(WebhookEvent)) == 200
        commands = s.execute(select(Command.unit_id, Command.ver, Command.cmd)).all()
    assert len(commands) == 200
    assert sorted((unit, ver) for unit, ver, _ in commands) == \
        sorted((e.unit, e.ver) for e in events)


def test_two_first_versions_of_a_unit_at_two_replicas_at_once_need_no_retry(
        two_replicas: tuple[RelayServer, RelayServer, str, str]) -> None:
    """A unit the relay has never seen, two different versions of it delivered to the
    two replicas at the same instant, 50 times: both are answered 200 (never a 500 for
    Stora to retry) and the unit ends at the newer version."""
    a, b, key, secret = two_replicas
    barrier = threading.Barrier(2)
    answers: list[int] = []

    def deliver(http: httpx.Client, unit: str, status: str, ver: int) -> None:
        body = json.dumps({"event": {
            "id": "evt_" + secrets.token_hex(8), "type": "unit.updated",
            "data": {"unit": {"id": unit, "status": status, "site": {"id": SITE},
                              "updated_at": rfc3339(ver / 1000)}}}}).encode()
        header = sign(secret, int(time.time()), body)
        barrier.wait(10)
        answers.append(http.post(f"/webhooks/stora/{key}", content=body, headers={
            "X-Stora-Signature": header, "Content-Type": "application/json"}).status_code)

    with httpx.Client(base_url=a.url, timeout=30) as to_a, \
            httpx.Client(base_url=b.url, timeout=30) as to_b, ThreadPoolExecutor(2) as pool:
        for i in range(50):
            unit = f"unit_new{i}"
            both = [pool.submit(deliver, to_a, unit, "overlocked", T0 + 1000),
                    pool.submit(deliver, to_b, unit, "occupied", T0 + 2000)]
            for future in both:
                future.result(30)
    assert answers == [200] * 100
    with a.services.db.read() as s:
        vers = s.scalars(select(UnitState.ver).where(UnitState.unit_id.like("unit_new%")))
        assert sorted(vers) == [T0 + 2000] * 50


def test_a_first_version_recorded_while_another_replica_records_one_waits_for_it(
        relay: Relay) -> None:
    """The interleaving the test above can only hope for, forced: replica A records a
    new unit's first version and holds its transaction open; replica B records another
    version of it meanwhile.  B waits for A's commit, then judges its version against
    A's (no IntegrityError, no 500 for Stora to retry)."""
    other = second_replica(relay.services)
    holding, done = threading.Event(), threading.Event()
    outcomes: dict[str, str] = {}

    def unit(status: str, ver: int) -> dict[str, object]:
        return {"id": "unit_race", "status": status, "site": {"id": SITE},
                "updated_at": rfc3339(ver / 1000)}

    def replica_a() -> None:
        with relay.services.db.session() as s:
            outcomes["a"] = apply_unit(s, relay.services.commands, relay.operator,
                                       unit("overlocked", T0 + 2000), now=time.time()).outcome
            holding.set()
            done.wait(10)

    def replica_b() -> None:
        holding.wait(10)
        with other.db.session() as s:
            outcomes["b"] = apply_unit(s, other.commands, relay.operator,
                                       unit("occupied", T0 + 1000), now=time.time()).outcome

    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.submit(replica_a), pool.submit(replica_b)
            time.sleep(0.5)  # B is waiting on A's row now
            assert not second.done()
            done.set()
            first.result(10)
            second.result(10)
    finally:
        other.close()
    assert outcomes == {"a": "command", "b": "older"}
    with relay.services.db.read() as s:
        state = s.get(UnitState, (relay.operator, "unit_race"))
        assert state is not None
        assert (state.ver, state.lockout) == (T0 + 2000, True)


def test_a_lockout_confirmed_at_another_replica_during_a_resend_scan_is_not_sent_again(
        relay: Relay) -> None:
    """Replica B applies the gateway's ``done`` to a lockout and holds its transaction
    open; replica A's resend scan (which read the unit before that commit) waits on the
    unit's row, then finds the lockout confirmed and makes no new command."""
    other = second_replica(relay.services)
    assert relay.webhook("unit_r", "overlocked", T0 + 5000) == "command"
    [lockout] = relay.intents("unit_r")
    holding, done = threading.Event(), threading.Event()

    def replica_b() -> None:
        with other.db.session() as s:
            assert apply_result(s, SITE, {"jti": lockout.jti, "status": "done",
                                          "reason": None, "duplicate": False}, time.time())
            s.flush()  # the unit's row is B's now
            holding.set()
            done.wait(10)

    def replica_a() -> int:
        holding.wait(10)
        with relay.services.db.session() as s:
            return len(resend_intents(s, relay.services.commands, time.time() + 400,
                                      policy=ResendPolicy(first_s=0.0)))

    try:
        with ThreadPoolExecutor(2) as pool:
            b, a = pool.submit(replica_b), pool.submit(replica_a)
            time.sleep(0.5)
            assert not a.done()  # waiting on the unit's row
            done.set()
            b.result(10)
            assert a.result(10) == 0
    finally:
        other.close()
    assert [c.jti for c in relay.intents("unit_r")] == [lockout.jti]


# --------------------------------------------------------------------------- the link


def replica_link(relay: Relay, services: Services, broker: Broker) -> RelayLink:
    """A link of ``services`` with the test timings of ``relay.link()``, its own client id."""
    link = relay.link(republish_s=60)
    mqtt = dataclasses.replace(services.config.mqtt, port=broker.port,
                               client_id="relay-replica-2")
    return RelayLink(mqtt, services.db, services.sites, services.commands,
                     clock=relay.clock, timings=link.timings)


@pytest.fixture
def relay(tmp_path: Path, broker: Broker) -> Iterator[Relay]:
    parts = make_relay(tmp_path / "relay", broker)
    yield parts
    parts.services.close()


def test_a_command_is_published_by_one_replica_only(relay: Relay, broker: Broker) -> None:
    """Both replicas' links poll the same outbox; 150 unlocks committed while they run,
    each woken on both: every jti reaches the gateway once (no re-publish is due within
    the test: ``republish_s`` 60)."""
    other = second_replica(relay.services)
    gateway = FakeGateway(broker, PREFIX, SITE, answer=silent)
    links = [relay.link(republish_s=60), replica_link(relay, other, broker)]
    try:
        with LinkRunner(links[0]), LinkRunner(links[1]):
            wait_for(lambda: all(link.connected for link in links), 10, "both links up")
            jtis = []
            for i in range(150):
                jtis.append(relay.unlock(f"unit_{i % 30}"))
                for link in links:
                    link.notify()
            wait_for(lambda: set(gateway.jtis()) == set(jtis), 20,
                     lambda: f"{len(set(gateway.jtis()))} of {len(jtis)} arrived")
            time.sleep(1.0)  # a second publish would come within a few polls (0.1 s)
        arrived = collections.Counter(gateway.jtis())
        assert [jti for jti, n in arrived.items() if n > 1] == []
        assert sum(link.stats.published for link in links) == len(jtis)
        assert sum(link.stats.republished for link in links) == 0
    finally:
        gateway.close()
        other.close()


def test_a_publish_that_failed_is_taken_over_at_once(relay: Relay) -> None:
    """A replica whose claim is given back (its publish failed): the other one publishes
    the command without waiting for the claim to run out; and a claim ends by itself (a
    replica killed while publishing)."""
    other = second_replica(relay.services)
    try:
        jti = relay.unlock()
        first = Outbox(relay.services.db, relay.services.commands, policy=ResendPolicy(),
                       claim_s=15)
        second = Outbox(other.db, other.commands, policy=ResendPolicy(), claim_s=15)
        now = relay.clock()
        assert [d.jti for d in first.plan(now, republish_before=now - 60)[0]] == [jti]
        assert second.plan(now, republish_before=now - 60)[0] == []  # claimed
        first.release([jti])
        assert [d.jti for d in second.plan(now, republish_before=now - 60)[0]] == [jti]
        assert first.plan(now + 14, republish_before=now - 60)[0] == []
        later = now + 15.5
        assert [d.jti for d in first.plan(later, republish_before=later - 60)[0]] == [jti]
    finally:
        other.close()


def test_a_result_every_replica_receives_is_recorded_and_counted_once(
        relay: Relay) -> None:
    """Both replicas subscribe to results, so both apply each one: the first finds the
    command pending and counts it; the other, after the row lock, finds it answered."""
    other = second_replica(relay.services)
    try:
        jti = relay.unlock()
        outboxes = [Outbox(db, commands, policy=ResendPolicy()) for db, commands in
                    ((relay.services.db, relay.services.commands), (other.db, other.commands))]
        result = result_payload(jti, "unlock", "unit_1", "done", None, duplicate=False,
                                state={"locked": False}, at=time.time())
        before = REGISTRY.get_sample_value("stora_relay_command_results_total",
                                           {"cmd": "unlock", "status": "done",
                                            "reason": ""}) or 0.0
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda o: o.apply(SITE, result, time.time()), outboxes))
        assert answers == [(jti, "done"), (jti, "done")]
        after = REGISTRY.get_sample_value("stora_relay_command_results_total",
                                          {"cmd": "unlock", "status": "done", "reason": ""})
        assert after == before + 1
    finally:
        other.close()


def test_a_replica_claims_no_more_than_it_publishes_in_one_batch(relay: Relay) -> None:
    """120 due rows: each plan claims one batch (50), so no claim runs out while earlier
    batches wait for their acks; the other replica takes the next batch meanwhile."""
    other = second_replica(relay.services)
    try:
        jtis = {relay.unlock(f"unit_{i}") for i in range(120)}
        first = Outbox(relay.services.db, relay.services.commands, policy=ResendPolicy(),
                       claim_batch=50)
        second = Outbox(other.db, other.commands, policy=ResendPolicy(), claim_batch=50)
        now = relay.clock()
        batches = []
        for outbox in (first, second, first):
            batch = outbox.plan(now, republish_before=now - 60)[0]
            outbox.mark([d.jti for d in batch], now)  # acknowledged: published, unclaimed
            batches.append(batch)
        assert [len(b) for b in batches] == [50, 50, 20]
        claimed = [d.jti for b in batches for d in b]
        assert sorted(claimed) == sorted(jtis)  # each once
    finally:
        other.close()


def test_an_unlock_waiting_on_one_replica_wakes_for_a_result_the_other_received(
        relay: Relay, broker: Broker, tmp_path: Path) -> None:
    """Replica A's link is on a broker that never sees the gateway; replica B published the
    command and receives the result.  A's waiter is answered from the database within
    ``waiter_poll_s`` (with one broker, every replica also receives every result)."""
    other = second_replica(relay.services)
    gateway = FakeGateway(broker, PREFIX, SITE, answer=silent)
    with Broker(tmp_path / "elsewhere") as elsewhere:
        mqtt_a = dataclasses.replace(relay.services.config.mqtt, port=elsewhere.port,
                                     client_id="relay-replica-a")
        link_a = RelayLink(mqtt_a, relay.services.db, relay.services.sites,
                           relay.services.commands, clock=relay.clock,
                           timings=relay.link(republish_s=60).timings)
        link_b = replica_link(relay, other, broker)
        try:
            with LinkRunner(link_b):
                wait_for(lambda: link_b.connected, 10, "B's link up")
                jti = relay.unlock()
                link_b.notify()
                wait_for(lambda: jti in gateway.jtis(), 10, "B published the command")
                with LinkRunner(link_a) as runner_a:
                    wait_for(lambda: link_a.connected, 10, "A's link up")
                    waiter = asyncio.run_coroutine_threadsafe(
                        link_a.wait_for_result(jti, 10), runner_a.loop)
                    gateway.publish_result(result_payload(
                        jti, "unlock", "unit_1", "done", None, duplicate=False,
                        state={"locked": False}, at=time.time()))
                    assert waiter.result(10) == "done"
                    assert link_a.stats.results == 0  # A never saw the result itself
                    assert link_a.stats.published == 0
        finally:
            gateway.close()
            other.close()


# --------------------------------------------------------------------------- the broker

OPERATORS = 5
SITES_EACH = 10
EVENTS_EACH_SITE = 20
PER_SECOND = 10
PER_MINUTE = 150
TOKEN_TTL_S = 24.0


@pytest.mark.timeout(400)
def test_five_operators_through_two_replicas_keep_each_budget_and_refresh_once(
        tmp_path: Path) -> None:
    """5 operators × 10 sites, each site posting 20 Timeline Events through both
    replicas in turn (200 per operator, more than one minute's allowance of 150): at the
    sandbox, per operator, no 1-s window over 10 and no 60-s window over 150, no 429,
    every event once; the access tokens (24 s) expire during the load and each expiry
    is one refresh per operator."""
    operators = {f"op{i}": sites_spec(f"op{i}", SITES_EACH) for i in range(OPERATORS)}
    with broker_stack(tmp_path / "relay", operators, max_per_second=PER_SECOND,
                      max_per_minute=PER_MINUTE, access_token_ttl_s=TOKEN_TTL_S) as stack, \
            stack.replica() as other_url:
        ids = {name: stack.connect(name) for name in operators}
        began = time.time()
        sites = [(name, f"site_{name}{n}", stack.add_site(f"site_{name}{n}", ids[name]))
                 for name in operators for n in range(1, SITES_EACH + 1)]
        urls = (stack.url, other_url)
        created: dict[str, str] = {}
        codes: collections.Counter[int] = collections.Counter()
        lock = threading.Lock()

        def gateways(index: int, mine: list[tuple[str, str, str]]) -> None:
            """Two threads per operator, each posting for five sites in turn (as many
            gateways' posts would arrive; fewer threads keep this one process's GIL
            from delaying requests between the relay's slot and Stora)."""
            with httpx.Client(timeout=60) as http:
                for i in range(EVENTS_EACH_SITE):
                    for n, (_, site, credential) in enumerate(mine):
                        external = f"{site}-{i}"
                        while True:
                            answer = stack.post(http, credential, site, external,
                                                url=urls[(index + n + i) % 2])
                            with lock:
                                codes[answer.status_code] += 1
                            if answer.status_code != 429:
                                break
                            assert "retry-after" in answer.headers, \
                                f"a 429 from Stora itself: {answer.text}"
                            time.sleep(int(answer.headers["retry-after"]))
                        assert answer.status_code == 201, answer.text
                        with lock:
                            created[external] = answer.json()["event"]["id"]

        halves = [sites[i:i + SITES_EACH // 2] for i in range(0, len(sites), SITES_EACH // 2)]
        with ThreadPoolExecutor(len(halves)) as pool:
            for future in [pool.submit(gateways, i, half) for i, half in enumerate(halves)]:
                future.result(360)
        elapsed = time.time() - began

        # A token is refreshed on use once 75 % of its life is gone: at most once per that
        # much time, whichever replica asks first (the load pauses when a minute's
        # allowance is spent, so there may be fewer).
        most = elapsed / (REFRESH_AT * TOKEN_TTL_S) + 1
        token_calls = [r for r in stack.sandbox.requests if r.path.endswith("/oauth2/token")]
        assert {r.status for r in token_calls} == {200}  # no invalid_grant: no race lost
        assert len(token_calls) == OPERATORS + sum(
            stack.sandbox.operator_state(n)["refreshes"] for n in operators)
        for name in operators:
            state = stack.sandbox.operator_state(name)
            events = stack.sandbox.events(name)
            mine = sorted(ext for ext in created if ext.startswith(f"site_{name}"))
            assert len(mine) == SITES_EACH * EVENTS_EACH_SITE
            assert sorted(e["external"]["id"] for e in events) == mine  # each once
            assert state["rate_limited"] == 0
            assert state["max_in_1s"] <= PER_SECOND, (name, state["max_in_1s"])
            assert state["max_in_60s"] <= PER_MINUTE, (name, state["max_in_60s"])
            assert 1 <= state["refreshes"] <= most, (name, state["refreshes"], most)
        print(f"\n{len(created)} events through 2 replicas in {elapsed:.1f} s; relay 429s "
              f"{codes[429]}; refreshes per operator "
              f"{[stack.sandbox.operator_state(n)['refreshes'] for n in operators]} "
              f"(at most {most:.1f})")
