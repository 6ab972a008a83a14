"""The Stora client (gateway/stora/) against each fault switch of the sandbox, and without
the sandbox where it cannot misbehave the required way.

What is tested is the guarantee, counted at the server: every event exists exactly once
(``count_by_external_id``), no 1-second or 60-second window holds more requests than
allowed, and no fault leaves an event stuck on a replayed error.  Time is a fake clock
shared by the sandbox and the client; the client "sleeps" by advancing it, so a minute
of rate limiting costs nothing.  Only the slow-server test uses real time, a fraction of a second.
``httpx.MockTransport`` stands in where the sandbox cannot misbehave the required way (a
proxy's 502, a dripping body, odd 429 headers).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox import Sandbox
from devkit.testing import FakeClock, wait_for
from gateway.stora.answers import AuthFailed, Dead, Delivered, Retry
from gateway.stora.client import StoraClient
from gateway.stora.http import USER_AGENT
from gateway.stora.idempotency import REPLAY_SAFE_S, IdempotencyKey
from gateway.stora.tokens import FileTokens
from tests.support.stora_client import T0, Rig, body_for, make_client, make_limiter


# -- each fault switch -------------------------------------------------------------------------
def test_stored_500_is_escaped_by_rotating_the_key(rig: Rig) -> None:
    rig.sandbox.fail_next(1, 500)
    key = IdempotencyKey("f")
    failed = rig.client.post_event(body_for("f"), key)
    assert isinstance(failed, Retry)
    assert failed.rotate_key
    assert failed.status == 500
    assert failed.key.value == "f.1"
    assert failed.key.unanswered_since is None
    # The control: the old key would replay that 500 for 24 hours.
    again = rig.client.post_event(body_for("f"), key)
    assert isinstance(again, Retry)
    assert again.status == 500
    assert rig.event_posts()[-1].replayed
    delivered = rig.client.post_event(body_for("f"), failed.key, attempt=1)
    assert isinstance(delivered, Delivered)
    assert rig.sandbox.count_by_external_id() == {"f": 1}


def test_400_api_error_is_a_server_failure_not_a_dead_letter(rig: Rig) -> None:
    rig.sandbox.fail_next(1, 400)
    outcome, history = rig.deliver("g")
    assert isinstance(outcome, Delivered)
    assert outcome.key.generation == 1
    assert isinstance(history[0], Retry)
    assert history[0].reason == "server_error"
    assert rig.sandbox.count_by_external_id() == {"g": 1}


def test_response_lost_after_commit_replays_the_201(rig: Rig) -> None:
    rig.sandbox.drop_after_commit(1)
    outcome, history = rig.deliver("d")
    assert isinstance(outcome, Delivered)
    assert outcome.key.generation == 0
    assert isinstance(history[0], Retry)
    assert not history[0].rotate_key
    assert rig.event_posts()[-1].replayed
    assert outcome.event_id == rig.sandbox.events()[0]["id"]
    assert rig.sandbox.count_by_external_id() == {"d": 1}


def test_422_is_dead_with_the_error_details_and_others_flow(rig: Rig) -> None:
    rig.sandbox.reject_external_ids(["bad"])
    assert isinstance(rig.deliver("ok-1")[0], Delivered)
    dead, history = rig.deliver("bad")
    assert len(history) == 1
    assert isinstance(dead, Dead)
    assert (dead.status, dead.code) == (422, "invalid_content")
    assert [d.pointer for d in dead.details] == ["/external/id"]
    record = dead.as_record()
    assert record["idempotency_key"] == "bad.0"
    assert record["request_id"]
    json.dumps(record)
    assert isinstance(rig.deliver("ok-2")[0], Delivered)
    assert rig.sandbox.count_by_external_id() == {"ok-1": 1, "ok-2": 1}


def test_invalid_body_is_dead_with_pointers(rig: Rig) -> None:
    body = body_for("v", source={"id": "wrong"})
    dead = rig.client.post_event(body, IdempotencyKey("v"))
    assert isinstance(dead, Dead)
    assert dead.status == 422
    assert "/source/id" in [d.pointer for d in dead.details]


@pytest.mark.parametrize(("status", "code"), [(403, "forbidden"), (404, "resource_not_found"),
                                              (409, "conflict")])
def test_permanent_4xx_are_dead_after_one_attempt(rig: Rig, status: int, code: str) -> None:
    rig.sandbox.fail_next(1, status)
    dead, history = rig.deliver("p")
    assert len(history) == 1
    assert isinstance(dead, Dead)
    assert (dead.status, dead.code) == (status, code)


def test_outage_is_retried_with_the_same_key(rig: Rig) -> None:
    assert isinstance(rig.deliver("warm-up")[0], Delivered)
    rig.sandbox.set_outage(True)
    outcomes = []
    key = IdempotencyKey("o")
    for attempt in range(3):
        outcome = rig.client.post_event(body_for("o"), key, attempt=attempt)
        assert isinstance(outcome, Retry)
        assert outcome.reason == "no_answer"
        assert not outcome.rotate_key
        assert outcome.delay_s <= 2 ** attempt
        outcomes.append(outcome)
        key = outcome.key
    assert key.unanswered_since == outcomes[0].key.unanswered_since  # earliest kept
    rig.sandbox.set_outage(False)
    delivered = rig.client.post_event(body_for("o"), key, attempt=3)
    assert isinstance(delivered, Delivered)
    assert delivered.key.generation == 0
    assert rig.sandbox.count_by_external_id()["o"] == 1


def test_refused_connection_is_not_marked_unanswered(
    clock: FakeClock, http: httpx.Client, tmp_path: Path
) -> None:
    with Sandbox(static_tokens={"static-1"}, clock=clock) as sb:
        url = sb.api_url
    client = make_client(sb, clock, tmp_path, http, auth="static", base_url=url)
    outcome = client.post_event(body_for("c"), IdempotencyKey("c"))
    assert isinstance(outcome, Retry)
    assert outcome.reason == "not_sent"
    assert not outcome.sent
    assert outcome.key.unanswered_since is None


def test_slow_server_timeout_then_in_progress_then_replay(
    sandbox: Sandbox, clock: FakeClock, tmp_path: Path
) -> None:
    with httpx.Client(timeout=httpx.Timeout(2.0, read=0.15)) as quick:
        client = make_client(sandbox, clock, tmp_path, quick)
        client.tokens.token()  # before the server turns slow
        sandbox.set_slow(2.0)
        timed_out = client.post_event(body_for("w"), IdempotencyKey("w"))
        # Back before the server answered (its answer stores the key): the read timeout
        # ended the wait, not the slow answer.
        assert sandbox.state()["idempotency_keys"] == 0
        assert isinstance(timed_out, Retry)
        assert timed_out.reason == "no_answer"
        assert not timed_out.rotate_key
        # The first request is still being processed: Stora-style "in progress" 409,
        # which must not dead-letter the event.
        busy = client.post_event(body_for("w"), timed_out.key, attempt=1)
        assert isinstance(busy, Retry)
        assert busy.reason == "in_progress"
        assert busy.status == 409
        assert busy.key == timed_out.key
        wait_for(lambda: sandbox.state()["idempotency_keys"] >= 1, 10,
                 "the slow request to finish")
        delivered = client.post_event(body_for("w"), busy.key, attempt=2)
        assert isinstance(delivered, Delivered)
        assert delivered.key.generation == 0
    assert sandbox.count_by_external_id() == {"w": 1}


def test_replay_window_expired_is_not_sent(rig: Rig) -> None:
    key = IdempotencyKey("late", 0, rig.clock() - REPLAY_SAFE_S - 1)
    dead = rig.client.post_event(body_for("late"), key)
    assert isinstance(dead, Dead)
    assert dead.code == "replay_window_expired"
    assert rig.event_posts() == []
    fresh = IdempotencyKey("late2", 0, rig.clock() - REPLAY_SAFE_S + 60)
    assert isinstance(rig.client.post_event(body_for("late2"), fresh), Delivered)


def test_body_and_key_must_name_the_same_event(rig: Rig) -> None:
    with pytest.raises(ValueError, match=r"external\.id"):
        rig.client.post_event(body_for("a"), IdempotencyKey("b"))


# -- without the sandbox: what it cannot do ------------------------------------------------------
def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], tmp_path: Path, **kwargs: Any
) -> tuple[StoraClient, FakeClock]:
    clock = FakeClock(T0)
    (tmp_path / "token").write_text("tok-1\n")
    http = httpx.Client(
        transport=httpx.MockTransport(handler), headers={"User-Agent": USER_AGENT}
    )
    client = StoraClient(
        "https://stora.invalid/2025-09/",
        FileTokens(tmp_path / "token"),
        make_limiter(clock),
        http=http,
        clock=clock,
        rng=random.Random(3),
        **kwargs,
    )
    return client, clock


def test_request_headers(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"event": {"id": "aevt_1"}})

    client, _ = mock_client(handler, tmp_path)
    outcome = client.post_event(body_for("h"), IdempotencyKey("h", 3))
    assert isinstance(outcome, Delivered)
    assert outcome.event_id == "aevt_1"
    req = seen[0]
    assert str(req.url) == "https://stora.invalid/2025-09/timeline/events"
    assert req.headers["authorization"] == "Bearer tok-1"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["idempotency-key"] == "h.3"
    assert req.headers["user-agent"] == USER_AGENT
    assert json.loads(req.content) == body_for("h")


def test_proxy_5xx_keeps_the_key(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    client, clock = mock_client(handler, tmp_path)
    outcome = client.post_event(body_for("p"), IdempotencyKey("p"))
    assert isinstance(outcome, Retry)
    assert outcome.reason == "gateway_error"
    assert not outcome.rotate_key
    assert outcome.key.unanswered_since == clock()


def test_401_to_a_renewed_token_is_auth_failed(tmp_path: Path) -> None:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        return httpx.Response(401, json={"error": {"code": "invalid_token", "type": "x"}})

    client, clock = mock_client(handler, tmp_path)
    outcome = client.post_event(body_for("u"), IdempotencyKey("u", 0, clock()))
    assert isinstance(outcome, AuthFailed)
    assert outcome.retry_after_s >= 45
    assert keys == ["u.0", "u.0", "u.1"]  # unanswered key: same key first, then the next
    assert outcome.key.value == "u.1"


def test_429_without_usable_headers_backs_off(tmp_path: Path) -> None:
    headers: list[dict[str, str]] = [{}, {"RateLimit-Reset": str(int(T0) - 100)},
                                     {"Retry-After": "soon"}]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers=headers.pop(0))

    client, clock = mock_client(handler, tmp_path)
    for attempt in range(3):
        outcome = client.post_event(body_for("r"), IdempotencyKey("r"), attempt=attempt)
        assert isinstance(outcome, Retry)
        assert outcome.reason == "rate_limited"
        assert outcome.delay_s >= 1.0
        assert not outcome.rotate_key
        clock.advance(outcome.delay_s)


def test_dripping_body_is_cut_at_the_deadline(tmp_path: Path) -> None:
    dripped: list[bytes] = []

    def drip() -> Iterator[bytes]:
        for _ in range(20):
            time.sleep(0.05)
            dripped.append(b" ")
            yield b" "

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, content=drip())

    client, _ = mock_client(handler, tmp_path, deadline_s=0.2)
    outcome = client.post_event(body_for("d"), IdempotencyKey("d"))
    # Cut within 0.6 s of drip (a loaded machine only drips slower): counted, not timed.
    assert len(dripped) < 0.6 / 0.05
    assert isinstance(outcome, Retry)
    assert outcome.reason == "no_answer"
    assert outcome.key.unanswered_since is not None
