"""The Stora API sandbox over real HTTP (devkit/sandbox/): rate limits and fault switches."""

from __future__ import annotations

import http.client
import math
import time

import pytest

from devkit.sandbox import Sandbox, max_in_window
from devkit.testing import FakeClock, returns_within
from tests.support.sandbox import EVENTS, STATIC, T0, get_token, post_event, state


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
    sandbox.set_slow(60)
    sandbox.drop_after_commit(3)
    sandbox.reject_external_ids({"ext-1"})
    sandbox.fail_next(1, 403, message_chars=1000, details=3)
    sandbox.redirect_next(2, 307)
    sandbox.reset_faults()
    # Not slow any more: back long before the 60 s it was set to.
    assert returns_within(20, lambda: post_event(sandbox).status, "a request") == 201
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
