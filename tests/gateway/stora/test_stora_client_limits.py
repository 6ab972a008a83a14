"""The Stora client (gateway/stora/): rate limits (against the sandbox over real HTTP and
the limiter alone) and the waiting policies.

What is tested is the guarantee, counted at the server: every event exists exactly once
(``count_by_external_id``), no 1-second or 60-second window holds more requests than
allowed, and no fault leaves an event stuck on a replayed error.  Time is a fake clock
shared by the sandbox and the client; the client "sleeps" by advancing it, so a minute
of rate limiting costs nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devkit.sandbox import EVENT_SCOPE, Sandbox, max_in_window
from devkit.testing import FakeClock
from gateway.config import StoraConfig
from gateway.stora.answers import Delivered, Retry
from gateway.stora.client import StoraClient
from gateway.stora.idempotency import REPLAY_SAFE_S, IdempotencyKey
from gateway.stora.ratelimit import (
    RateLimiter,
    backoff_delay,
    credential_retry_delay,
    parse_retry_delay,
)
from tests.support.stora_client import (
    CLIENT_ID,
    PER_MIN,
    PER_S,
    SECRET,
    T0,
    Rig,
    body_for,
    make_client,
    make_limiter,
)


# -- rate limits -----------------------------------------------------------------------------
def test_drain_never_exceeds_either_window_and_meets_no_429(rig: Rig) -> None:
    start = rig.clock()
    for i in range(50):
        assert isinstance(rig.deliver(f"e{i}")[0], Delivered)
    assert rig.rate_limited() == 0
    rig.windows_respected()
    assert set(rig.sandbox.count_by_external_id().values()) == {1}
    # 51 requests at 20 a minute: two full minutes of waiting, and not much more
    # (the limiter waits as long as needed and no longer).
    elapsed = rig.clock() - start
    assert 120 <= elapsed <= 125


def test_limits_hold_across_a_restart(
    sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path
) -> None:
    persisted: list[float] = []
    limiter = RateLimiter(
        PER_S, PER_MIN, clock=clock, monotonic=clock, sleep=clock.advance,
        on_record=persisted.append,
    )
    first = make_client(sandbox, clock, tmp_path, http, limiter=limiter)
    for i in range(12):
        assert isinstance(first.post_event(body_for(f"a{i}"), IdempotencyKey(f"a{i}")), Delivered)
    assert persisted[-len(limiter.history()):] == pytest.approx(limiter.history())
    # "Restart": a new limiter and token source from what was persisted, new token request.
    second = make_client(sandbox, clock, tmp_path, http, limiter=make_limiter(clock, persisted))
    for i in range(12):
        outcome = second.post_event(body_for(f"b{i}"), IdempotencyKey(f"b{i}"))
        while isinstance(outcome, Retry):
            clock.advance(outcome.delay_s)
            outcome = second.post_event(body_for(f"b{i}"), outcome.key)
        assert isinstance(outcome, Delivered)
    assert sum(r.status == 429 for r in sandbox.requests) == 0
    times = sandbox.request_times()
    assert max_in_window(times, 1.0) <= PER_S
    assert max_in_window(times, 60.0) <= PER_MIN


def test_a_restart_without_history_would_hit_429(
    sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path
) -> None:
    """The control for the test above: forgetting the history is caught by the sandbox."""
    first = make_client(sandbox, clock, tmp_path, http)
    i = 0
    while not isinstance(
        first.post_event(body_for(f"a{i}"), IdempotencyKey(f"a{i}")), Retry
    ):  # until the minute's budget is spent
        i += 1
    assert len(sandbox.requests) == PER_MIN
    second = make_client(sandbox, clock, tmp_path, http)
    outcome = second.post_event(body_for("b"), IdempotencyKey("b"))
    assert isinstance(outcome, Retry)
    assert outcome.reason == "token_unavailable"
    assert sum(r.status == 429 for r in sandbox.requests) == 1


class Clocks:
    """A wall clock and a monotonic clock that advance together; the wall one can jump."""

    def __init__(self) -> None:
        self.wall = FakeClock(T0)
        self.mono = FakeClock(1_000.0)

    def sleep(self, seconds: float) -> None:
        self.wall.advance(seconds)
        self.mono.advance(seconds)

    def limiter(self, ps: int, pm: int, history: list[float] | None = None) -> RateLimiter:
        return RateLimiter(
            ps, pm, history or [], clock=self.wall, monotonic=self.mono, sleep=self.sleep
        )


steps = st.lists(
    st.tuples(
        st.sampled_from(["try", "try", "acquire", "restart", "jump"]),
        st.one_of(st.floats(0, 1.5), st.floats(0, 70)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ps=st.integers(1, 6), extra=st.integers(0, 20), ops=steps)
def test_limiter_never_exceeds_either_window(ps: int, extra: int, ops: list[Any]) -> None:
    """Any mix of attempts, waits, restarts and wall-clock jumps stays within both windows."""
    pm = ps + extra
    clocks = Clocks()
    limiter = clocks.limiter(ps, pm)
    sent: list[float] = []  # true (monotonic) send times
    for op, dt in ops:
        clocks.sleep(dt)
        if op == "try":
            if limiter.try_acquire() == 0.0:
                sent.append(clocks.mono())
        elif op == "acquire":
            assert limiter.acquire() == 0.0
            sent.append(clocks.mono())
            # Waiting exactly as told is enough: the next wait is at most one window.
            assert limiter.delay() <= 60.2
        elif op == "restart":
            limiter = clocks.limiter(ps, pm, limiter.history())
        else:  # the wall clock steps back; sending must neither stall nor burst
            before = limiter.delay()
            clocks.wall.now -= 3600
            assert limiter.delay() == pytest.approx(before)
    assert max_in_window(sent, 1.0) <= ps
    assert max_in_window(sent, 60.0) <= pm


def test_limiter_waits_no_longer_than_needed() -> None:
    clocks = Clocks()
    limiter = clocks.limiter(2, 3)
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() == pytest.approx(1.1)  # 1 s window plus the margin
    clocks.sleep(1.1)
    assert limiter.try_acquire() == 0.0
    assert limiter.delay() == pytest.approx(60.1 - 1.1)  # the minute window now


def test_persisted_times_from_the_future_count_as_now() -> None:
    clocks = Clocks()
    # Written by a run whose wall clock was an hour ahead: clamped, not dropped.
    limiter = clocks.limiter(5, 3, [T0 + 3600, T0 + 3601, T0 + 3602])
    assert limiter.delay() == pytest.approx(60.1)
    # Stale entries are dropped; recent ones keep counting.
    limiter = clocks.limiter(5, 3, [T0 - 3600, T0 - 30, T0 - 20, T0 - 10])
    assert limiter.delay() == pytest.approx(30.1)


def test_pause_until_is_capped_and_ignores_the_past() -> None:
    clocks = Clocks()
    limiter = clocks.limiter(5, 20)
    limiter.pause_until(T0 - 10)
    assert limiter.delay() == 0.0
    limiter.pause_until(T0 + 12)
    assert limiter.delay() == pytest.approx(12)
    limiter.pause_until(T0 + 86_400)
    assert limiter.delay() == pytest.approx(900)


def test_storm_waits_until_reset_with_no_extra_429(rig: Rig) -> None:
    assert isinstance(rig.deliver("warm-up")[0], Delivered)
    rig.sandbox.storm(30)
    outcome = rig.client.post_event(body_for("s"), IdempotencyKey("s"))
    assert isinstance(outcome, Retry)
    assert outcome.reason == "rate_limited"
    assert outcome.status == 429
    assert not outcome.rotate_key
    assert 30 <= outcome.delay_s <= 31.5  # until RateLimit-Reset, plus jitter
    # Nothing else goes out before the reset either: the limiter itself is paused.
    assert rig.client.limiter.delay() >= 29.9
    rig.clock.advance(outcome.delay_s)
    for i in range(10):
        assert isinstance(rig.deliver(f"after-{i}")[0], Delivered)
    assert rig.rate_limited() == 1
    assert set(rig.sandbox.count_by_external_id().values()) == {1}


# -- the waiting policies --------------------------------------------------------------------------
def test_backoff_is_full_jitter_with_a_cap() -> None:
    rng = random.Random(5)
    for attempt in range(12):
        ceiling = min(300.0, 2.0**attempt)
        draws = [backoff_delay(attempt, rng=rng) for _ in range(50)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling / 2
    assert backoff_delay(10_000, rng=rng) <= 300


def test_credential_retry_is_slow_and_capped() -> None:
    rng = random.Random(5)
    assert all(45 <= credential_retry_delay(0, rng=rng) <= 60 for _ in range(50))
    assert all(675 <= credential_retry_delay(n, rng=rng) <= 900 for n in range(4, 40))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"RateLimit-Reset": str(int(T0) + 10)}, 9.5),  # epoch seconds (stora-api §5)
        ({"RateLimit-Reset": "7"}, 7.0),  # a delta, as the IETF draft has it
        ({"Retry-After": "4"}, 4.0),
        ({"Retry-After": "4", "RateLimit-Reset": str(int(T0) + 10)}, 9.5),  # the later
        ({"Retry-After": format_datetime(datetime.fromtimestamp(T0 + 20.5, UTC), usegmt=True)},
         20.5),
        ({"RateLimit-Reset": str(int(T0) - 5)}, None),  # in the past
        ({"Retry-After": "Tomorrow"}, None),
        ({}, None),
        ({"Retry-After": "99999"}, 900.0),  # capped
    ],
)
def test_parse_retry_delay(headers: Mapping[str, str], expected: float | None) -> None:
    got = parse_retry_delay(headers, T0)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_key_format_and_rotation() -> None:
    key = IdempotencyKey("sgw-abc")
    assert key.value == "sgw-abc.0"
    assert key.replay_deadline() is None
    marked = key.unanswered(100.0).unanswered(200.0)
    assert marked.unanswered_since == 100.0
    assert marked.replay_deadline() == 100.0 + REPLAY_SAFE_S
    assert marked.rotated() == IdempotencyKey("sgw-abc", 1, None)
    with pytest.raises(ValueError):
        IdempotencyKey("has space")


@pytest.mark.parametrize("auth", ["client_credentials", "static"])
def test_from_config_builds_a_working_client(tmp_path: Path, auth: str) -> None:
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "token").write_text("static-1\n")
    with Sandbox(clients={CLIENT_ID: SECRET}, static_tokens={"static-1"}) as sb:
        cfg = StoraConfig(
            base_url=sb.api_url, auth=auth, token_url=sb.token_url,  # type: ignore[arg-type]
            client_id=CLIENT_ID, client_secret_file=tmp_path / "secret",
            token_file=tmp_path / "token", scope=EVENT_SCOPE,
            timeline_source_id="tsrc_test", timeline_template_id="",
            max_per_second=PER_S, max_per_minute=PER_MIN,
        )
        recorded: list[float] = []
        history = [time.time() - 1]
        with StoraClient.from_config(cfg, history=history, on_record=recorded.append) as c:
            assert c.tokens.kind == auth
            outcome = c.post_event(body_for("cfg"), IdempotencyKey("cfg"))
            assert isinstance(outcome, Delivered)
            assert len(c.limiter.history()) == len(recorded) + 1
        assert sb.count_by_external_id() == {"cfg": 1}
