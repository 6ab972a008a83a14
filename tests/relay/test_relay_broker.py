"""The Timeline broker over real HTTP (contract §7.4): gateways post through the relay to
the sandbox as Stora.  Every event reaches Stora exactly once under the gateway's own
Idempotency-Key, the operator's budget is kept by the relay for all its gateways
together (no sliding window over either limit at Stora, no 429 from it), and a gateway
is held to its own site.  One test drives the real gateway client (``auth = "broker"``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.sandbox import max_in_window
from gateway.stora.answers import Dead, Delivered, Retry
from gateway.stora.client import StoraClient
from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.ratelimit import RateLimiter as GatewayLimiter
from gateway.stora.tokens import FileTokens
from relay.broker import BROKER_PATH, MAX_BODY_BYTES, TimelineBroker
from relay.db.engine import Database
from relay.operators import Operators, StoraSite
from relay.ratelimit import (
    RESERVE,
    WINDOW_MARGIN_S,
    RateLimitedError,
    RateLimiter,
    Window,
    database_now,
)
from relay.stora import TokenSet
from relay.tokens import Tokens
from tests.support.relay import relay_on_disk
from tests.support.relay_connect import (
    BrokerStack,
    broker_stack,
    event_body,
    sites_spec,
)

GATEWAYS = 5
EVENTS_EACH = 200
#: Scaled so that 1000 events fill the minute window once and spill past it: ~70 s.
PER_SECOND = 40
PER_MINUTE = 800


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[BrokerStack]:
    with broker_stack(tmp_path / "relay", {"acme": sites_spec("acme", GATEWAYS)}) as s:
        yield s


def events_path_requests(stack: BrokerStack, operator: str) -> list[dict[str, object]]:
    return [r.as_dict() for r in stack.sandbox.requests
            if r.operator == operator and r.path.endswith("/timeline/events")]


@pytest.mark.timeout(300)
# On PostgreSQL the same guarantees are shown harder, by two replicas and five operators
# (test_relay_replicas.py): this one-process test runs on SQLite only (70 s saved).
@pytest.mark.backends("sqlite")
def test_five_gateways_at_full_speed_share_one_budget_and_nothing_is_lost_or_doubled(
        tmp_path: Path) -> None:
    with broker_stack(tmp_path / "relay", {"acme": sites_spec("acme", GATEWAYS)},
                      max_per_second=PER_SECOND, max_per_minute=PER_MINUTE) as stack:
        op = stack.connect("acme")
        credentials = {f"site_acme{g}": stack.add_site(f"site_acme{g}", op)
                       for g in range(1, GATEWAYS + 1)}
        answers: dict[str, list[int]] = {}
        created: dict[str, str] = {}
        lock = threading.Lock()

        def gateway(site: str, credential: str) -> None:
            with httpx.Client(timeout=30) as http:
                for i in range(EVENTS_EACH):
                    external = f"{site}-{i}"
                    while True:
                        answer = stack.post(http, credential, site, external)
                        with lock:
                            answers.setdefault(external, []).append(answer.status_code)
                        if answer.status_code != 429:
                            break
                        assert answer.headers["ratelimit-limit"] in {str(PER_SECOND),
                                                                     str(PER_MINUTE)}
                        assert int(answer.headers["ratelimit-reset"]) >= time.time() - 1
                        time.sleep(int(answer.headers["retry-after"]))
                    if answer.status_code == 201:
                        with lock:
                            created[external] = answer.json()["event"]["id"]

        started = time.monotonic()
        threads = [threading.Thread(target=gateway, args=item) for item in credentials.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started

        state = stack.sandbox.operator_state("acme")
        final = {ext: codes[-1] for ext, codes in answers.items()}
        assert set(final.values()) == {201}, set(final.values())
        assert len(created) == GATEWAYS * EVENTS_EACH
        events = stack.sandbox.events("acme")
        assert sorted(e["external"]["id"] for e in events) == sorted(created)
        assert {e["id"] for e in events} == set(created.values())
        # Stora never had to refuse: the relay kept every window itself.
        assert state["rate_limited"] == 0
        assert state["max_in_1s"] <= PER_SECOND
        assert state["max_in_60s"] <= PER_MINUTE
        sent = events_path_requests(stack, "acme")
        assert len(sent) == GATEWAYS * EVENTS_EACH  # one forward per event: no retry
        assert {r["idempotency_key"] for r in sent} == {f"{e}.0" for e in created}
        # The relay used its budget (less the reserve, with its margin), not much less.
        assert state["max_in_60s"] >= PER_MINUTE - RESERVE - 10
        refused = sum(c == 429 for codes in answers.values() for c in codes)
        print(f"\n1000 events in {took:.1f} s; relay 429s {refused}; "
              f"max 1 s {state['max_in_1s']}, max 1.25 s "
              f"{max_in_window([float(str(r['at'])) for r in sent], 1 + WINDOW_MARGIN_S)}, "
              f"max 60 s {state['max_in_60s']}")

        # The same key again: Stora's stored answer, the same event, no second one.
        site, credential = next(iter(credentials.items()))
        with httpx.Client(timeout=10) as http:
            again = stack.post(http, credential, site, f"{site}-0")
        assert again.status_code == 201
        assert again.json()["event"]["id"] == created[f"{site}-0"]
        assert len(stack.sandbox.events("acme")) == GATEWAYS * EVENTS_EACH


def test_a_gateway_is_held_to_its_site_and_its_credential(stack: BrokerStack) -> None:
    op = stack.connect("acme")
    mine = stack.add_site("site_acme1", op)
    other = stack.add_site("site_acme2", op)
    before = len(events_path_requests(stack, "acme"))
    with httpx.Client(timeout=10) as http:
        wrong_site = stack.post(http, mine, "site_acme1", "e-1",
                                body=event_body("site_acme2", "e-1"))
        no_site = stack.post(http, mine, "site_acme1", "e-2",
                             body={k: v for k, v in event_body("x", "e-2").items()
                                   if k != "site"})
        bad = stack.post(http, mine[:-2] + "xx", "site_acme1", "e-3")
        unknown = stack.post(http, "sgw_nobody.secret", "site_acme1", "e-4")
        no_header = http.post(stack.url + BROKER_PATH, json=event_body("site_acme1", "e-5"),
                              headers={"Idempotency-Key": "e-5.0"})
        no_key = http.post(stack.url + BROKER_PATH, json=event_body("site_acme1", "e-6"),
                           headers={"Authorization": f"Bearer {mine}"})
        not_json = http.post(stack.url + BROKER_PATH, content=b"{not json",
                             headers={"Authorization": f"Bearer {mine}",
                                      "Idempotency-Key": "e-7.0"})
        huge = http.post(stack.url + BROKER_PATH, content=b" " * (MAX_BODY_BYTES + 1),
                         headers={"Authorization": f"Bearer {mine}",
                                  "Idempotency-Key": "e-8.0"})
        stack.services.sites.revoke("site_acme2")
        revoked = stack.post(http, other, "site_acme2", "e-9")
        good = stack.post(http, mine, "site_acme1", "e-10")
    for answer, status, code in ((wrong_site, 403, "forbidden"), (no_site, 403, "forbidden"),
                                 (bad, 401, "invalid_token"), (unknown, 401, "invalid_token"),
                                 (no_header, 401, "invalid_token"),
                                 (no_key, 400, "invalid_request"),
                                 (not_json, 400, "invalid_request"), (huge, 413, "too_large"),
                                 (revoked, 401, "invalid_token")):
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"] == code
    assert good.status_code == 201
    # Nothing but the good one was forwarded.
    assert len(events_path_requests(stack, "acme")) == before + 1
    assert [e["external"]["id"] for e in stack.sandbox.events("acme")] == ["e-10"]


def test_stora_unreachable_is_a_502_that_keeps_the_key(stack: BrokerStack) -> None:
    op = stack.connect("acme")
    credential = stack.add_site("site_acme1", op)
    stack.sandbox.set_outage(True)
    with httpx.Client(timeout=30) as http:
        down = stack.post(http, credential, "site_acme1", "e-1")
        stack.sandbox.set_outage(False)
        up = stack.post(http, credential, "site_acme1", "e-1")
    assert down.status_code == 502
    assert int(down.headers["retry-after"]) >= 1
    assert "error" not in down.json()  # not a §6 error: the gateway keeps its key
    assert up.status_code == 201


def test_a_401_from_stora_renews_the_token_and_never_reaches_the_gateway(
        stack: BrokerStack) -> None:
    op = stack.connect("acme")
    credential = stack.add_site("site_acme1", op)
    stack.sandbox.expire_tokens()  # the sandbox forgets the access token
    with httpx.Client(timeout=10) as http:
        assert stack.post(http, credential, "site_acme1", "e-1").status_code == 201
    assert [e["external"]["id"] for e in stack.sandbox.events("acme")] == ["e-1"]
    assert stack.sandbox.operator_state("acme")["refreshes"] == 1


def test_a_second_401_is_a_503_that_moves_the_gateway_to_its_next_key(
        tmp_path: Path) -> None:
    """If Stora keeps a 401 under the key (the sandbox's hostile reading, which its
    per-operator keys hide from the test above), the same key can never succeed: the
    gateway gets a 503 with a §6 error and moves to its next key; a 401 was never
    processed, so that is safe.  One refresh, no loop."""
    seen: list[str] = []

    def stora(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith("/oauth2/token"):
            return httpx.Response(200, json={"access_token": f"at{len(seen)}",
                                             "refresh_token": f"rt{len(seen)}",
                                             "expires_in": 7200})
        return httpx.Response(401, json={"error": {"code": "invalid_token",
                                                   "message": "no"}})

    relay = relay_on_disk(tmp_path / "relay")
    services = relay.services(transport=httpx.MockTransport(stora))
    op = services.operators.connect(TokenSet("at0", "rt0", 7200, "", 0),
                                    [StoraSite("site_x", "X")])
    credential = services.sites.add("site_x", op)[1]
    limiter = RateLimiter(services.db, max_per_second=10, max_per_minute=60)
    tokens = Tokens(services.db, services.keyring, services.stora, limiter)
    broker = TimelineBroker(services.sites, tokens, limiter, services.stora)
    try:
        body = json.dumps(event_body("site_x", "e-1")).encode()
        answer = broker.post(f"Bearer {credential}", "e-1.0", body)
    finally:
        services.close()
    assert answer.status == 503
    assert json.loads(answer.body)["error"]["code"] == "stora_unauthorized"
    assert [p.rsplit("/", 1)[-1] for p in seen] == ["events", "token", "events"]


def test_the_gateway_client_in_broker_mode_works_through_the_relay(
        stack: BrokerStack, tmp_path: Path) -> None:
    """The gateway's own Stora client, configured as ``auth = "broker"``, unchanged."""
    op = stack.connect("acme")
    token_file = tmp_path / "gateway-token"
    token_file.write_text(stack.add_site("site_acme1", op) + "\n")
    token_file.chmod(0o600)
    client = StoraClient(stack.url + "/stora/2025-09", FileTokens(token_file, "broker"),
                         GatewayLimiter(10, 60))
    with client:
        key = IdempotencyKey("evt-gw-1")
        body = event_body("site_acme1", "evt-gw-1")
        first = client.post_event(body, key)
        assert isinstance(first, Delivered), first
        assert first.status == 201
        replay = client.post_event(body, first.key)
        assert isinstance(replay, Delivered)
        assert replay.event_id == first.event_id

        # Stora stores the event but the answer is lost: the relay's 502 makes the
        # gateway keep its key, and the retry is Stora's replay of the same event.
        stack.sandbox.drop_after_commit(1)
        key2 = IdempotencyKey("evt-gw-2")
        body2 = event_body("site_acme1", "evt-gw-2")
        down = client.post_event(body2, key2)
        assert isinstance(down, Retry), down
        assert (down.reason, down.rotate_key, down.status) == ("gateway_error", False, 502)
        later = client.post_event(body2, down.key)
        assert isinstance(later, Delivered), later
        assert later.key.value == key2.value

        # Another site's event: refused for good, as Stora would a bad body.
        stray = client.post_event(event_body("site_acme2", "evt-gw-3"),
                                  IdempotencyKey("evt-gw-3"))
        assert isinstance(stray, Dead)
        assert stray.status == 403

        # The operator must reconnect: the gateway keeps the event and tries later.
        stack.sandbox.revoke_grant("acme")
        key4 = IdempotencyKey("evt-gw-4")
        body4 = event_body("site_acme1", "evt-gw-4")
        held = client.post_event(body4, key4)
        assert isinstance(held, Retry), held
        assert held.reason == "server_error"
        stack.connect("acme")
        done = client.post_event(body4, held.key)
        assert isinstance(done, Delivered), done
    externals = sorted(e["external"]["id"] for e in stack.sandbox.events("acme"))
    assert externals == ["evt-gw-1", "evt-gw-2", "evt-gw-4"]  # each exactly once


# -- the limiter itself ---------------------------------------------------------------------
def test_the_limiter_is_shared_by_replicas_and_keeps_a_slot_for_urgent_calls(
        tmp_path: Path) -> None:
    relay = relay_on_disk(tmp_path / "relay")
    op = Operators(relay.db, relay.keyring).connect(TokenSet("at", "rt", 7200, "", 0),
                                                    [StoraSite("site_x", "X")])
    other = Database(relay.db.url)  # another replica: its own engine on the same database
    windows = (Window(0.5, 4), Window(30.0, 6))
    a = RateLimiter(relay.db, max_per_second=4, max_per_minute=6, windows=windows)
    b = RateLimiter(other, max_per_second=4, max_per_minute=6, windows=windows)
    try:
        assert [a.try_acquire(op, "t"), b.try_acquire(op, "t"), a.try_acquire(op, "t")] == \
            [0, 0, 0]
        wait = b.try_acquire(op, "t")  # 3 of 4 taken: the 4th is kept for urgent calls
        assert 0 < wait <= 0.5
        assert b.try_acquire(op, "refresh", urgent=True) == 0
        with pytest.raises(RateLimitedError) as full:
            a.take(op, "t", urgent=True)
        assert full.value.limit == 4
        assert 0 < full.value.wait_s <= 0.5
        assert abs(full.value.reset_at - (time.time() + full.value.wait_s)) < 0.1
        a.acquire(op, "t", max_wait_s=1.0)  # waits for the 0.5-s window: 5 of 6 in 30 s
        with pytest.raises(RateLimitedError) as minute:
            b.acquire(op, "t", max_wait_s=1.0)  # the 6th is urgent-only; 30 s away
        assert minute.value.limit == 6
        assert minute.value.wait_s > 25
        assert a.in_window(op, 30.0) == b.in_window(op, 30.0) == 5
    finally:
        other.close()
        relay.db.close()


def test_the_limiter_reads_the_database_clock(tmp_path: Path) -> None:
    relay = relay_on_disk(tmp_path / "relay")
    try:
        with relay.db.session() as s:
            before, now, after = time.time(), database_now(s), time.time()
        assert before - 0.01 <= now <= after + 0.01  # SQLite's clock is this machine's
    finally:
        relay.db.close()
