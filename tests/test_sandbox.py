"""The Stora API sandbox over real HTTP (devkit/sandbox.py).

The sandbox is the peer of the outbox's exactly-once tests, so these tests pin the
behaviours those tests rely on: replay of the first reply under a key (201, 422 and 500
alike), key and token expiry on the injected clock, strict sliding-window rate limits,
and every fault switch, through both the Python API and the admin HTTP API.  Requests go
through ``http.client`` on real sockets; time moves by advancing a fake clock, not by
sleeping (except where the point is real time).
"""

from __future__ import annotations

import http.client
import io
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import EVENT_SCOPE, Sandbox, max_in_window
from gateway.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.5  # the fake clock's start; .5 so integer-second windows would differ
EVENTS = "/2025-09/timeline/events"
STATIC = "static-token-1"
ERROR_KEYS = {"code", "type", "message", "request_id", "details", "links"}


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The stora-api §6 error object, checked for shape."""
        doc = self.json()
        assert set(doc) == {"error"}
        assert set(doc["error"]) == ERROR_KEYS
        return doc["error"]  # type: ignore[no-any-return]


def call(
    sandbox: Sandbox,
    method: str,
    path: str,
    body: object = None,
    headers: Mapping[str, str] | None = None,
    content_type: str | None = "application/json",
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One request; a fresh connection unless ``conn`` is given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", sandbox.port, timeout=5)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = dict(headers or {})
    if data is not None and content_type:
        all_headers["Content-Type"] = content_type
    try:
        conn.request(method, path, data, all_headers)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        if own:
            conn.close()


def get_token(
    sandbox: Sandbox, client_id: str = "cid", secret: str = "secret", scope: str = EVENT_SCOPE
) -> Response:
    body = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": secret,
        "scope": scope,
    }
    return call(sandbox, "POST", "/oauth2/token", body)


def event_body(external_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": {"id": "tsrc_test"},
        "site": {"id": "site_1"},
        "external": {"id": external_id},
        "description": "Unit unlocked via TestApp — A-101",
        "variables": {"unit": "unit_a", "reference": "A-101"},
        **extra,
    }


def post_event(
    sandbox: Sandbox,
    external_id: str = "ext-1",
    *,
    token: str | None = STATIC,
    key: str | None = None,
    body: object = None,
    headers: Mapping[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if key is not None:
        h["Idempotency-Key"] = key
    payload = event_body(external_id) if body is None else body
    return call(sandbox, "POST", EVENTS, payload, h, conn=conn)


def admin(sandbox: Sandbox, settings: Mapping[str, Any]) -> Response:
    return call(sandbox, "POST", "/_sandbox/faults", dict(settings))


def state(sandbox: Sandbox) -> dict[str, Any]:
    r = call(sandbox, "GET", "/_sandbox/state")
    assert r.status == 200
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox(clock: FakeClock) -> Iterator[Sandbox]:
    """Limits high enough that a frozen clock never meets them."""
    with Sandbox(
        clients={"cid": "secret"},
        static_tokens={STATIC},
        max_per_second=10_000,
        max_per_minute=10_000,
        clock=clock,
    ) as sb:
        yield sb


@pytest.fixture
def limited(clock: FakeClock) -> Iterator[Sandbox]:
    with Sandbox(
        clients={"cid": "secret"},
        static_tokens={STATIC},
        max_per_second=5,
        max_per_minute=8,
        clock=clock,
    ) as sb:
        yield sb


# -- tokens ---------------------------------------------------------------------------------
def test_urls_name_the_real_port() -> None:
    with Sandbox(port=0) as sb:
        assert sb.port > 0
        assert sb.url == f"http://127.0.0.1:{sb.port}"
        assert sb.api_url == sb.url + "/2025-09"
        assert sb.token_url == sb.url + "/oauth2/token"


def test_token_is_issued_and_creates_an_event(sandbox: Sandbox) -> None:
    r = get_token(sandbox)
    assert r.status == 200
    doc = r.json()
    assert set(doc) == {
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "created_at",
        "refresh_token",
    }
    assert doc["token_type"] == "Bearer"
    assert doc["expires_in"] == 7200
    assert doc["scope"] == EVENT_SCOPE
    assert doc["created_at"] == int(T0)
    assert doc["refresh_token"] is None

    r = post_event(
        sandbox,
        "ext-1",
        token=doc["access_token"],
        body=event_body("ext-1", contact={"id": "con_1"}),
    )
    assert r.status == 201
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"event", "meta"}
    assert body["meta"]["request_id"]
    event = body["event"]
    assert event["id"].startswith("aevt_")
    assert event["creator"]["id"].startswith("app_")
    assert event["source"] == {"id": "tsrc_test"}
    assert event["site"] == {"id": "site_1"}
    assert event["contact"] == {"id": "con_1"}
    assert event["external"] == {"id": "ext-1", "url": None}
    assert event["description"] == "Unit unlocked via TestApp — A-101"
    assert event["variables"] == {"unit": "unit_a", "reference": "A-101"}
    for key in ("unit", "unit_type", "tenancy", "subscription", "invoice", "template"):
        assert event[key] is None
    assert event["created_at"] == event["updated_at"] == "2027-01-15T08:00:00.500Z"
    assert sandbox.events() == [event]
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_token_expires_on_the_clock(sandbox: Sandbox, clock: FakeClock) -> None:
    token = get_token(sandbox).json()["access_token"]
    clock.advance(7199.75)
    assert post_event(sandbox, "a", token=token).status == 201
    clock.advance(0.25)  # exactly 7200 s after issue
    r = post_event(sandbox, "b", token=token)
    assert r.status == 401
    error = r.error()
    assert error["code"] == "invalid_token"
    assert error["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert sandbox.count_by_external_id() == {"a": 1}


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "nobody"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"scope": ""}, 400, "invalid_request"),
        ({"scope": "everything"}, 400, "invalid_scope"),
        ({"client_secret": None}, 400, "invalid_request"),
    ],
)
def test_bad_token_requests(
    sandbox: Sandbox, change: dict[str, Any], status: int, error: str
) -> None:
    body = {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": "secret",
        "scope": EVENT_SCOPE,
        **change,
    }
    r = call(sandbox, "POST", "/oauth2/token", {k: v for k, v in body.items() if v is not None})
    assert r.status == status
    doc = r.json()
    assert doc["error"] == error
    assert doc["error_description"]
    assert "access_token" not in doc


def test_token_endpoint_wants_json(sandbox: Sandbox) -> None:
    form = b"grant_type=client_credentials&client_id=cid&client_secret=secret&scope=x"
    r = call(
        sandbox, "POST", "/oauth2/token", form, content_type="application/x-www-form-urlencoded"
    )
    assert r.status == 400
    assert r.json()["error"] == "invalid_request"


@pytest.mark.parametrize("auth", [None, "Bearer nope", f"Basic {STATIC}", "Bearer"])
def test_events_need_a_valid_bearer_token(sandbox: Sandbox, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = post_event(sandbox, token=None, headers=headers)
    assert r.status == 401
    assert r.error()["code"] == "invalid_token"
    assert sandbox.events() == []


def test_static_token_is_accepted(sandbox: Sandbox) -> None:
    r = post_event(sandbox, token=STATIC)
    assert r.status == 201
    assert r.json()["event"]["creator"]["id"].startswith("tok_")


def test_event_scope_is_required(sandbox: Sandbox) -> None:
    token = get_token(sandbox, scope="public.site:read").json()["access_token"]
    r = post_event(sandbox, token=token)
    assert r.status == 403
    assert r.error()["code"] == "forbidden"
    assert sandbox.events() == []


# -- request validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "pointers"),
    [
        ({}, {"/source", "/external"}),
        ([], {""}),
        (event_body("x", source={"id": 7}), {"/source/id"}),
        (event_body("x", source={"id": "src_1"}), {"/source/id"}),
        (event_body("x", source={}), {"/source/id"}),
        (event_body("x", external={"url": "https://x"}), {"/external/id"}),
        (event_body("x", external={"id": ""}), {"/external/id"}),
        (event_body("x", external={"id": "x", "url": 5}), {"/external/url"}),
        (event_body("x", description=5), {"/description"}),
        (event_body("x", variables=["a"]), {"/variables"}),
        (event_body("x", contact={"id": "unit_1"}), {"/contact/id"}),
        (event_body("x", template="aetpl_1"), {"/template"}),
        (event_body("x", unit={"id": "unit_1"}), {"/unit"}),
    ],
)
def test_invalid_bodies_are_422_with_pointers(
    sandbox: Sandbox, body: object, pointers: set[str]
) -> None:
    r = post_event(sandbox, body=body)
    assert r.status == 422
    error = r.error()
    assert error["code"] == "invalid_content"
    assert error["type"] == "invalid_request_error"
    assert {d["pointer"] for d in error["details"]} == pointers
    assert all(d["message"] for d in error["details"])
    assert sandbox.events() == []


def test_optional_references_may_be_null(sandbox: Sandbox) -> None:
    body = event_body("x", contact=None, template=None, external={"id": "x", "url": None})
    assert post_event(sandbox, body=body).status == 201


def test_body_must_be_json(sandbox: Sandbox) -> None:
    headers = {"Authorization": f"Bearer {STATIC}"}
    r = call(sandbox, "POST", EVENTS, b"{not json", headers)
    assert (r.status, r.error()["code"]) == (400, "invalid_request")
    r = call(
        sandbox,
        "POST",
        EVENTS,
        json.dumps(event_body("x")).encode(),
        headers,
        content_type="text/plain",
    )
    assert (r.status, r.error()["code"]) == (400, "invalid_request")
    r = post_event(sandbox, headers={"Accept": "text/csv"})
    assert (r.status, r.error()["code"]) == (406, "invalid_format")
    assert post_event(sandbox, headers={"Accept": "application/json"}).status == 201


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/2025-09/units"),
        ("GET", EVENTS),
        ("POST", "/nope"),
        ("PATCH", EVENTS + "/x"),
        ("GET", "/oauth2/token"),
    ],
)
def test_unknown_endpoints_are_404(sandbox: Sandbox, method: str, path: str) -> None:
    r = call(
        sandbox,
        method,
        path,
        {} if method != "GET" else None,
        {"Authorization": f"Bearer {STATIC}"},
    )
    assert r.status == 404
    assert r.error()["code"] == "invalid_endpoint"


# -- idempotency ------------------------------------------------------------------------------
def test_success_is_replayed_verbatim(sandbox: Sandbox) -> None:
    first = post_event(sandbox, "ext-1", key="k1")
    again = post_event(sandbox, "ext-1", key="k1")
    assert first.status == again.status == 201
    assert again.body == first.body
    assert sandbox.count_by_external_id() == {"ext-1": 1}
    assert [r.replayed for r in sandbox.requests] == [False, True]
    # A repeat with another body still gets the stored reply, but is flagged.
    other = post_event(sandbox, "ext-2", key="k1")
    assert (other.status, other.body) == (201, first.body)
    assert [r.body_mismatch for r in sandbox.requests] == [False, False, True]
    # The same document with its keys in another order is the same body.
    reordered = dict(reversed(list(event_body("ext-1").items())))
    post_event(sandbox, key="k1", body=reordered)
    assert sandbox.requests[-1].body_mismatch is False
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_a_stored_500_is_replayed_and_nothing_is_created(sandbox: Sandbox) -> None:
    sandbox.fail_next(1)
    first = post_event(sandbox, "ext-1", key="k1")
    assert first.status == 500
    error = first.error()
    assert (error["code"], error["type"]) == ("internal_server_error", "api_error")
    again = post_event(sandbox, "ext-1", key="k1")
    assert (again.status, again.body) == (500, first.body)
    assert sandbox.events() == []
    # fail_next(1) was used up by the first request; a new key goes through.
    assert post_event(sandbox, "ext-1", key="k2").status == 201
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_a_stored_422_is_replayed_even_for_a_fixed_body(sandbox: Sandbox) -> None:
    bad = post_event(sandbox, key="k1", body=event_body("x", description=5))
    assert bad.status == 422
    fixed = post_event(sandbox, "x", key="k1")
    assert (fixed.status, fixed.body) == (422, bad.body)
    assert sandbox.events() == []


def test_keys_expire_after_24_hours(sandbox: Sandbox, clock: FakeClock) -> None:
    first = post_event(sandbox, "ext-1", key="k1")
    clock.advance(86_399.75)
    replay = post_event(sandbox, "ext-1", key="k1")
    assert replay.body == first.body
    clock.advance(0.25)  # exactly 24 h after the reply was stored
    fresh = post_event(sandbox, "ext-1", key="k1")
    assert fresh.status == 201
    assert fresh.json()["event"]["id"] != first.json()["event"]["id"]
    assert sandbox.count_by_external_id() == {"ext-1": 2}
    assert state(sandbox)["duplicates"] == {"ext-1": 2}


def test_idempotency_ttl_is_configurable(clock: FakeClock) -> None:
    with Sandbox(static_tokens={STATIC}, idempotency_ttl_s=60, clock=clock) as sb:
        post_event(sb, key="k")
        clock.advance(60)
        post_event(sb, key="k")
        assert sb.count_by_external_id() == {"ext-1": 2}


def test_a_401_is_stored_by_default(sandbox: Sandbox) -> None:
    refused = post_event(sandbox, token="expired", key="k1")
    assert refused.status == 401
    again = post_event(sandbox, token=STATIC, key="k1")
    assert (again.status, again.body) == (401, refused.body)
    assert sandbox.events() == []


def test_storing_401s_can_be_switched_off(sandbox: Sandbox) -> None:
    sandbox.store_unauthorized = False
    assert post_event(sandbox, token="expired", key="k1").status == 401
    assert post_event(sandbox, token=STATIC, key="k1").status == 201


def test_a_key_in_progress_is_a_conflict(sandbox: Sandbox) -> None:
    sandbox.set_slow(1.0)
    results: list[Response] = []
    started = time.monotonic()
    first = threading.Thread(target=lambda: results.append(post_event(sandbox, key="k1")))
    first.start()
    time.sleep(0.3)  # the first is in the app by now, holding its key
    second = post_event(sandbox, key="k1")
    assert second.status == 409
    assert second.error()["code"] == "conflict"
    first.join()
    assert time.monotonic() - started >= 1.0  # slow: the first took that long
    assert results[0].status == 201
    sandbox.set_slow(0)
    third = post_event(sandbox, key="k1")
    assert (third.status, third.body) == (201, results[0].body)  # the 409 was not stored
    assert sandbox.count_by_external_id() == {"ext-1": 1}


# -- rate limits -------------------------------------------------------------------------------
def test_max_in_window() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([5.0], 1.0) == 1
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0) == 3
    assert max_in_window([1.0, 0.0, 2.0, 3.0], 1.0) == 1  # exactly 1 s apart: two windows
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 60.0) == 5


def test_per_second_window_slides(limited: Sandbox, clock: FakeClock) -> None:
    assert get_token(limited).status == 200  # token requests count too
    for i in range(4):
        assert post_event(limited, f"e{i}").status == 201
    refused = post_event(limited, "late")
    assert refused.status == 429
    assert refused.error()["code"] == "too_many_requests"
    assert refused.headers["ratelimit-limit"] == "5"
    assert refused.headers["ratelimit-reset"] == str(math.ceil(T0 + 1))
    clock.advance(0.75)  # a new calendar second, but the same sliding window
    assert post_event(limited, "late").status == 429
    clock.advance(0.25)  # exactly 1 s after the first five
    assert post_event(limited, "late").status == 201


def test_per_minute_window_and_429s_do_not_count(limited: Sandbox, clock: FakeClock) -> None:
    for i in range(5):
        assert post_event(limited, f"a{i}").status == 201
    clock.advance(1)
    for i in range(3):
        assert post_event(limited, f"b{i}").status == 201
    refused = post_event(limited, "c")
    assert refused.status == 429
    assert refused.headers["ratelimit-limit"] == "8"
    assert refused.headers["ratelimit-reset"] == str(math.ceil(T0 + 60))
    clock.advance(30)
    for _ in range(10):  # refused requests must not extend the window
        assert post_event(limited, "c").status == 429
    clock.advance(29)  # T0 + 60: the first five leave the minute
    for i in range(5):
        assert post_event(limited, f"d{i}").status == 201
    assert post_event(limited, "e").status == 429

    accepted = limited.request_times(accepted_only=True)
    assert len(accepted) == 13
    assert max_in_window(accepted, 1.0) == 5
    assert max_in_window(accepted, 60.0) == 8
    everything = limited.request_times()
    assert len(everything) == len(limited.requests) == 13 + 12
    assert max_in_window(everything, 60.0) > 8
    s = state(limited)
    assert s["rate_limited"] == 12
    assert s["max_in_60s"] == max_in_window(everything, 60.0)


def test_rate_limit_on_the_real_clock() -> None:
    with Sandbox(static_tokens={STATIC}, max_per_second=5, max_per_minute=8) as sb:
        conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=5)
        try:
            statuses = [post_event(sb, f"e{i}", conn=conn).status for i in range(7)]
            assert statuses == [201] * 5 + [429] * 2
            refused = post_event(sb, "x", conn=conn)
            reset = int(refused.headers["ratelimit-reset"])
            first = sb.request_times()[0]
            assert reset == math.ceil(first + 1)
            time.sleep(max(reset - time.time(), 0) + 0.01)
            assert post_event(sb, "x", conn=conn).status == 201
        finally:
            conn.close()
        assert max_in_window(sb.request_times(accepted_only=True), 1.0) <= 5


def test_429s_are_not_stored(limited: Sandbox, clock: FakeClock) -> None:
    for i in range(5):
        post_event(limited, f"e{i}")
    assert post_event(limited, "x", key="k").status == 429
    clock.advance(1)
    assert post_event(limited, "x", key="k").status == 201


# -- fault switches -----------------------------------------------------------------------------
def test_outage_closes_connections_without_a_reply(sandbox: Sandbox) -> None:
    sandbox.set_outage(True)
    with pytest.raises(ConnectionError):
        post_event(sandbox, key="k1")
    with pytest.raises(ConnectionError):
        get_token(sandbox)
    assert state(sandbox)["refused"] == 2  # the admin API still answers
    assert [r.refused for r in sandbox.requests] == [True, True]
    assert sandbox.request_times() == []
    sandbox.set_outage(False)
    assert post_event(sandbox, key="k1").status == 201  # nothing was stored under k1
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_storm_answers_429_until_it_ends(sandbox: Sandbox, clock: FakeClock) -> None:
    sandbox.storm(30)
    for r in (post_event(sandbox, key="k1"), get_token(sandbox)):
        assert r.status == 429
        assert r.headers["ratelimit-reset"] == str(math.ceil(T0 + 30))
        assert r.headers["ratelimit-limit"] == str(sandbox.max_per_second)
    clock.advance(29.75)
    assert post_event(sandbox, key="k1").status == 429
    clock.advance(0.25)
    assert post_event(sandbox, key="k1").status == 201
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_slow_delays_every_api_request(sandbox: Sandbox) -> None:
    sandbox.set_slow(0.3)
    started = time.monotonic()
    assert get_token(sandbox).status == 200
    assert time.monotonic() - started >= 0.3
    conn = http.client.HTTPConnection("127.0.0.1", sandbox.port, timeout=0.1)
    try:
        with pytest.raises(TimeoutError):  # a client that gives up first
            post_event(sandbox, key="k1", conn=conn)
    finally:
        conn.close()
    sandbox.set_slow(0)
    deadline = time.monotonic() + 5
    while not sandbox.requests[1:] and time.monotonic() < deadline:
        time.sleep(0.01)  # the server still finishes the request the client gave up on
    assert sandbox.requests[1].status == 201
    r = post_event(sandbox, key="k1")
    assert r.status == 201
    assert sandbox.requests[-1].replayed
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_drop_after_commit(sandbox: Sandbox) -> None:
    sandbox.drop_after_commit(1)
    with pytest.raises(ConnectionError):
        post_event(sandbox, "ext-1", key="k1")
    events = sandbox.events()
    assert len(events) == 1  # committed although the client heard nothing
    assert sandbox.requests[-1].dropped
    retry = post_event(sandbox, "ext-1", key="k1")
    assert retry.status == 201
    assert retry.json()["event"]["id"] == events[0]["id"]
    assert post_event(sandbox, "ext-2", key="k2").status == 201  # used up
    assert sandbox.count_by_external_id() == {"ext-1": 1, "ext-2": 1}


def test_fail_next_counts_and_statuses(sandbox: Sandbox) -> None:
    sandbox.fail_next(2)
    assert post_event(sandbox, "a", key="a").status == 500
    assert post_event(sandbox, "b", key="b").status == 500
    assert post_event(sandbox, "c", key="c").status == 201
    sandbox.fail_next(1, status=409)
    r = post_event(sandbox, "d", key="d")
    assert (r.status, r.error()["code"]) == (409, "conflict")
    with pytest.raises(ValueError, match="cannot be injected"):
        sandbox.fail_next(1, status=418)
    assert sandbox.count_by_external_id() == {"c": 1}


def test_fail_next_can_answer_a_huge_message_and_details(sandbox: Sandbox) -> None:
    # What the gateway must survive (issue 11): no real Stora answers like this.
    sandbox.fail_next(2, 403, message_chars=80_000)
    r = post_event(sandbox, "a", key="a")
    assert (r.status, r.error()["code"]) == (403, "forbidden")
    assert len(r.error()["message"]) == 80_000
    assert r.error()["details"] == []
    assert post_event(sandbox, "a", key="a").body == r.body  # stored under its key
    sandbox.fail_next(1, 422, message_chars=500, details=40)
    error = post_event(sandbox, "b").error()
    assert len(error["details"]) == 40
    assert {len(d["message"]) for d in error["details"]} == {500}
    sandbox.fail_next(1, 500)  # the padding is set with each fail_next
    assert len(post_event(sandbox, "c").error()["message"]) < 100


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_next_answers_in_front_of_the_api(sandbox: Sandbox, status: int) -> None:
    sandbox.redirect_next(2, status, location="http://127.0.0.1:9/")
    r = post_event(sandbox, "a", key="k1")
    assert r.status == status
    assert r.headers["location"] == "http://127.0.0.1:9" + EVENTS
    assert get_token(sandbox).status == status  # every API path: the whole API moved
    assert sandbox.events() == []
    assert [x.status for x in sandbox.requests] == [status, status]
    assert state(sandbox)["idempotency_keys"] == 0  # nothing behind the proxy saw it
    assert post_event(sandbox, "a", key="k1").status == 201  # used up
    with pytest.raises(ValueError, match="not one of"):
        sandbox.redirect_next(1, 200)


def test_expire_tokens(sandbox: Sandbox) -> None:
    token = get_token(sandbox).json()["access_token"]
    assert post_event(sandbox, "a", token=token).status == 201
    assert sandbox.expire_tokens() == 1
    assert post_event(sandbox, "b", token=token).status == 401
    assert post_event(sandbox, "c", token=STATIC).status == 201
    fresh = get_token(sandbox).json()["access_token"]
    assert post_event(sandbox, "d", token=fresh).status == 201
    assert sandbox.expire_tokens(static=True) == 2
    assert post_event(sandbox, "e", token=STATIC).status == 401


def test_reject_external_ids(sandbox: Sandbox) -> None:
    sandbox.reject_external_ids({"bad"})
    r = post_event(sandbox, "bad", key="k1")
    assert r.status == 422
    error = r.error()
    assert error["code"] == "invalid_content"
    assert [d["pointer"] for d in error["details"]] == ["/external/id"]
    assert post_event(sandbox, "good").status == 201
    sandbox.reset_faults()
    assert post_event(sandbox, "bad", key="k1").body == r.body  # stored under its key
    assert post_event(sandbox, "bad", key="k2").status == 201
    sandbox.reject_external_ids(["bad"], status=500)
    assert post_event(sandbox, "bad").status == 500


def test_reset_faults(sandbox: Sandbox) -> None:
    sandbox.set_outage(True)
    sandbox.fail_next(3)
    sandbox.storm(60)
    sandbox.set_slow(5)
    sandbox.drop_after_commit(3)
    sandbox.reject_external_ids({"ext-1"})
    sandbox.fail_next(1, 403, message_chars=1000, details=3)
    sandbox.redirect_next(2, 307)
    sandbox.reset_faults()
    started = time.monotonic()
    assert post_event(sandbox).status == 201
    assert time.monotonic() - started < 1
    assert state(sandbox)["faults"] == {
        "outage": False,
        "fail_next": 0,
        "fail_status": 500,
        "fail_message_chars": 0,
        "fail_details": 0,
        "redirect_next": 0,
        "redirect_status": 301,
        "redirect_location": "https://moved.invalid",
        "storm_until": None,
        "slow_s": 0.0,
        "drop_after_commit": 0,
        "reject_external_ids": [],
        "reject_status": 422,
    }


# -- admin HTTP API -----------------------------------------------------------------------------
def test_admin_api_sets_every_switch(sandbox: Sandbox, clock: FakeClock) -> None:
    r = admin(sandbox, {"fail_next": 1})
    assert r.status == 200
    assert r.json()["faults"]["fail_next"] == 1
    assert post_event(sandbox, "a").status == 500

    admin(sandbox, {"outage": True})
    with pytest.raises(ConnectionError):
        post_event(sandbox, "b")
    admin(sandbox, {"outage": False})

    admin(sandbox, {"storm_s": 10})
    assert post_event(sandbox, "b").status == 429
    admin(sandbox, {"storm_s": 0})

    admin(sandbox, {"drop_after_commit": 1})
    with pytest.raises(ConnectionError):
        post_event(sandbox, "b")

    admin(sandbox, {"reject_external_ids": ["c"], "reject_status": 422})
    assert post_event(sandbox, "c").status == 422
    admin(sandbox, {"reset": True})
    assert post_event(sandbox, "c").status == 201

    token = get_token(sandbox).json()["access_token"]
    admin(sandbox, {"expire_tokens": True})
    assert post_event(sandbox, "d", token=token).status == 401

    admin(sandbox, {"store_unauthorized": False})
    assert sandbox.store_unauthorized is False

    post_event(sandbox, "e", key="k")
    admin(sandbox, {"advance_s": 86_400})
    assert state(sandbox)["now"] == T0 + 86_400
    post_event(sandbox, "e", key="k")
    assert sandbox.count_by_external_id()["e"] == 2

    admin(sandbox, {"slow_s": 0.2})
    started = time.monotonic()
    post_event(sandbox, "f")
    assert time.monotonic() - started >= 0.2
    admin(sandbox, {"slow_s": 0})

    admin(sandbox, {"fail_next": 1, "fail_status": 403, "fail_message_chars": 5000,
                    "fail_details": 2})
    r = post_event(sandbox, "g")
    assert r.status == 403
    assert len(r.error()["message"]) == 5000
    assert len(r.error()["details"]) == 2

    admin(sandbox, {"redirect_next": 1, "redirect_status": 308})
    assert post_event(sandbox, "h").status == 308
    assert post_event(sandbox, "h").status == 201


@pytest.mark.parametrize(
    "settings",
    [
        {"nope": 1},
        {"fail_next": -1},
        {"fail_next": True},
        {"slow_s": "1"},
        {"outage": 1},
        {"reject_external_ids": "x"},
        {"outage": True, "fail_status": 418},  # all or nothing: outage stays off
        {"outage": True, "redirect_status": 200},
        {"fail_message_chars": -1},
    ],
)
def test_admin_api_rejects_bad_settings(sandbox: Sandbox, settings: dict[str, Any]) -> None:
    r = admin(sandbox, settings)
    assert r.status == 400
    assert r.json()["error"]
    assert state(sandbox)["faults"]["outage"] is False
    assert state(sandbox)["faults"]["fail_next"] == 0


def test_admin_api_reports_state(sandbox: Sandbox) -> None:
    post_event(sandbox, "a", key="k1")
    post_event(sandbox, "a", key="k1")
    post_event(sandbox, "b", key="k2")
    post_event(sandbox, "b", key="k3")
    s = state(sandbox)
    assert s["events"] == 3
    assert s["by_external_id"] == {"a": 1, "b": 2}
    assert s["duplicates"] == {"b": 2}
    assert s["requests"] == 4
    assert s["replayed"] == 1
    assert s["idempotency_keys"] == 3
    assert s["api_url"] == sandbox.api_url
    events = call(sandbox, "GET", "/_sandbox/events").json()["events"]
    assert events == sandbox.events()
    log = call(sandbox, "GET", "/_sandbox/requests").json()["requests"]
    assert [(r["status"], r["idempotency_key"], r["replayed"]) for r in log] == [
        (201, "k1", False),
        (201, "k1", True),
        (201, "k2", False),
        (201, "k3", False),
    ]
    assert call(sandbox, "GET", "/_sandbox/nope").status == 404
    assert call(sandbox, "POST", "/_sandbox/faults", b"[1]").status == 400


def test_admin_api_is_not_limited_or_recorded(limited: Sandbox) -> None:
    for _ in range(20):
        assert call(limited, "GET", "/_sandbox/state").status == 200
    assert limited.requests == []
    for i in range(5):
        assert post_event(limited, f"e{i}").status == 201


# -- HTTP plumbing ------------------------------------------------------------------------------
def test_keep_alive_and_stop_closes_idle_connections(clock: FakeClock) -> None:
    sb = Sandbox(static_tokens={STATIC}, clock=clock).start()
    conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=5)
    try:
        for i in range(3):
            assert post_event(sb, f"e{i}", conn=conn).status == 201
        started = time.monotonic()
        sb.stop()
        assert time.monotonic() - started < 1
        with pytest.raises(ConnectionError):
            post_event(sb, "late", conn=conn)
    finally:
        conn.close()
        sb.stop()
    assert sb.count_by_external_id() == {"e0": 1, "e1": 1, "e2": 1}


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="rate limits"):
        Sandbox(max_per_second=0)
    with pytest.raises(ValueError, match="port"):
        Sandbox(port=70_000)


# -- command line ---------------------------------------------------------------------------------
def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(tmp_path: Path, sig: signal.Signals) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("# long-lived tokens\n\nstatic-a\nstatic-b\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli.main",
            "sandbox",
            "--port",
            "0",
            "--client-id",
            "cid",
            "--client-secret-file",
            str(secret),
            "--static-token-file",
            str(tokens),
            "--max-per-second",
            "3",
            "--token-ttl",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        while len(urls) < 4:
            line = proc.stdout.readline()
            assert line, f"sandbox exited early: {proc.communicate()[1]}"
            name, _, value = line.strip().partition(": ")
            urls[name] = value
        assert set(urls) == {"url", "api_url", "token_url", "admin_url"}
        port = int(urls["url"].rsplit(":", 1)[1])
        assert urls["api_url"] == f"http://127.0.0.1:{port}/2025-09"
        assert urls["token_url"] == f"http://127.0.0.1:{port}/oauth2/token"

        remote = Sandbox(port=port)  # only to address the running process
        r = get_token(remote, "cid", "s3cret")
        assert r.json()["expires_in"] == 60
        assert post_event(remote, token=r.json()["access_token"]).status == 201
        statuses = [post_event(remote, token="static-b").status for _ in range(2)]
        assert statuses == [201, 429]  # --max-per-second 3, the token request included
        assert state(remote)["events"] == 2

        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_usage_errors(tmp_path: Path) -> None:
    status, out, err = run_cli("sandbox", "--client-id", "cid")
    assert (status, out) == (2, "")
    assert "--client-secret-file" in err
    assert err.count("\n") == 1

    status, _, err = run_cli(
        "sandbox", "--client-id", "cid", "--client-secret-file", str(tmp_path / "missing")
    )
    assert status == 2
    assert "missing" in err
    assert err.count("\n") == 1

    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    status, _, err = run_cli("sandbox", "--static-token-file", str(empty))
    assert status == 2
    assert "no token" in err

    status, _, err = run_cli("sandbox", "--max-per-second", "0")
    assert status == 2


def test_cli_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, err = run_cli("sandbox", "--port", str(port))
    assert status == 1
    assert out == ""
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err
