"""The Stora client (gateway/stora/) against the sandbox over real HTTP.

What is tested is the guarantee, counted at the server: every event exists exactly once
(``count_by_external_id``), no 1-second or 60-second window holds more requests than
allowed, and no fault leaves an event stuck on a replayed error.  Time is a fake clock
shared by the sandbox and the client; the client "sleeps" by advancing it, so a minute
of rate limiting costs nothing.  Only the slow-server and concurrency tests use real
time, a fraction of a second each.  ``httpx.MockTransport`` stands in where the sandbox
cannot misbehave the required way (a proxy's 502, a dripping body, odd 429 headers).
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devkit.sandbox import EVENT_SCOPE, Sandbox, max_in_window
from gateway.config import StoraConfig
from gateway.stora import (
    MAX_TOKEN_RESPONSE_BYTES,
    REPLAY_SAFE_S,
    USER_AGENT,
    AuthFailed,
    ClientCredentialsTokens,
    CredentialRejected,
    Dead,
    Delivered,
    FileTokens,
    IdempotencyKey,
    PostOutcome,
    RateLimiter,
    Retry,
    StoraClient,
    TokenUnavailable,
    backoff_delay,
    credential_retry_delay,
    make_http_client,
    parse_retry_delay,
)
from gateway.stora.http import MAX_TEXT_CHARS, cap_text, parse_http_date, safe_id
from tests.support.hostile_http import HostileServer, Reply, Request, json_reply

T0 = 1_800_000_000.5
PER_S, PER_MIN = 5, 20
CLIENT_ID, SECRET = "cid", "s3cr3t-value-never-logged"
TOKEN_PATH = "/oauth2/token"
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


def body_for(external_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": {"id": "tsrc_test"},
        "site": {"id": "site_1"},
        "external": {"id": external_id},
        "description": "Unit unlocked via TestApp — A-101",
        "variables": {"unit": "unit_a", "reference": "A-101"},
        **extra,
    }


@dataclass
class Rig:
    """A sandbox, a client talking to it, and the shared fake clock."""

    sandbox: Sandbox
    clock: FakeClock
    client: StoraClient
    limiter: RateLimiter
    http: httpx.Client
    tmp: Path

    def token_requests(self) -> int:
        return sum(r.path == TOKEN_PATH for r in self.sandbox.requests)

    def event_posts(self) -> list[Any]:
        return [r for r in self.sandbox.requests if r.path == EVENTS_PATH]

    def rate_limited(self) -> int:
        return sum(r.status == 429 for r in self.sandbox.requests)

    def deliver(
        self, external_id: str, key: IdempotencyKey | None = None, max_attempts: int = 10
    ) -> tuple[PostOutcome, list[PostOutcome]]:
        """What the outbox drain does for one event: post, wait as told, persist the key."""
        key = key or IdempotencyKey(external_id)
        body = body_for(external_id)
        history: list[PostOutcome] = []
        for attempt in range(max_attempts):
            outcome = self.client.post_event(body, key, attempt=attempt)
            history.append(outcome)
            if not isinstance(outcome, Retry):
                return outcome, history
            self.clock.advance(outcome.delay_s)
            key = outcome.key
        raise AssertionError(f"not delivered after {max_attempts} attempts: {history}")

    def windows_respected(self) -> None:
        times = self.sandbox.request_times()
        assert max_in_window(times, 1.0) <= PER_S
        assert max_in_window(times, 60.0) <= PER_MIN


def make_limiter(
    clock: FakeClock, history: tuple[float, ...] | list[float] = ()
) -> RateLimiter:
    return RateLimiter(
        PER_S, PER_MIN, history, clock=clock, monotonic=clock, sleep=clock.advance
    )


def make_client(
    sandbox: Sandbox,
    clock: FakeClock,
    tmp: Path,
    http: httpx.Client,
    *,
    auth: str = "client_credentials",
    limiter: RateLimiter | None = None,
    secret: str = SECRET,
    token: str = "static-1",
    base_url: str | None = None,
) -> StoraClient:
    limiter = limiter or make_limiter(clock)
    tokens: ClientCredentialsTokens | FileTokens
    if auth == "client_credentials":
        (tmp / "secret").write_text(secret + "\n")
        tokens = ClientCredentialsTokens(
            token_url=sandbox.token_url,
            client_id=CLIENT_ID,
            secret_file=tmp / "secret",
            scope=EVENT_SCOPE,
            http=http,
            limiter=limiter,
            monotonic=clock,
            clock=clock,
            rng=random.Random(7),
        )
    else:
        (tmp / "token").write_text(f"# {auth} token\n{token}\n")
        tokens = FileTokens(tmp / "token", auth)
    return StoraClient(
        base_url or sandbox.api_url,
        tokens,
        limiter,
        http=http,
        clock=clock,
        rng=random.Random(11),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(
        timeout=httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0),
        headers={"User-Agent": USER_AGENT},
    ) as client:
        yield client


@pytest.fixture
def sandbox(clock: FakeClock) -> Iterator[Sandbox]:
    with Sandbox(
        clients={CLIENT_ID: SECRET},
        static_tokens={"static-1", "static-2"},
        max_per_second=PER_S,
        max_per_minute=PER_MIN,
        clock=clock,
    ) as sb:
        yield sb


@pytest.fixture
def rig(sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path) -> Rig:
    client = make_client(sandbox, clock, tmp_path, http)
    return Rig(sandbox, clock, client, client.limiter, http, tmp_path)


def tokens_of(rig: Rig) -> ClientCredentialsTokens:
    tokens = rig.client.tokens
    assert isinstance(tokens, ClientCredentialsTokens)
    return tokens


# -- tokens ------------------------------------------------------------------------------------
def test_token_is_fetched_once_and_reused(rig: Rig) -> None:
    for i in range(3):
        outcome, _ = rig.deliver(f"ext-{i}")
        assert isinstance(outcome, Delivered)
        assert outcome.event_id is not None
        assert outcome.event_id.startswith("aevt_")
    assert rig.token_requests() == 1
    assert rig.sandbox.count_by_external_id() == {"ext-0": 1, "ext-1": 1, "ext-2": 1}


def test_token_is_refreshed_ahead_of_expiry(rig: Rig) -> None:
    tokens = tokens_of(rig)
    first = tokens.token()
    # 2 h tokens are refreshed when less than 10 % (720 s) of their life remains.
    rig.clock.advance(7200 - 720 - 1)
    assert tokens.token() == first
    assert rig.token_requests() == 1
    rig.clock.advance(2)
    second = tokens.token()
    assert second != first
    assert rig.token_requests() == 2
    outcome, _ = rig.deliver("after-refresh")
    assert isinstance(outcome, Delivered)
    assert rig.token_requests() == 2


def test_concurrent_callers_share_one_refresh(rig: Rig) -> None:
    tokens = tokens_of(rig)
    rig.sandbox.set_slow(0.2)  # the token request is in flight while the others arrive
    n = 8
    barrier = threading.Barrier(n)
    got: list[str] = []

    def worker(action: Callable[[], str]) -> None:
        barrier.wait()
        got.append(action())

    def run(action: Callable[[], str]) -> None:
        threads = [threading.Thread(target=worker, args=(action,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(got) == n

    run(tokens.token)
    assert len(set(got)) == 1
    assert rig.token_requests() == 1
    old = got[0]
    got.clear()

    def after_401() -> str:
        tokens.invalidate(old)  # N concurrent 401s for the same token
        return tokens.token()

    run(after_401)
    assert len(set(got)) == 1
    assert got[0] != old
    assert rig.token_requests() == 2


def test_expired_tokens_mid_run_cost_one_refresh_and_no_duplicate(rig: Rig) -> None:
    for i in range(3):
        assert isinstance(rig.deliver(f"before-{i}")[0], Delivered)
    assert rig.sandbox.expire_tokens() == 1
    outcome, history = rig.deliver("during")
    assert isinstance(outcome, Delivered)
    # The 401 was stored under generation 0 (sandbox default): only a new key delivers,
    # and rotating is safe because that key was never unanswered.
    assert len(history) == 1
    assert outcome.key.generation == 1
    for i in range(3):
        assert isinstance(rig.deliver(f"after-{i}")[0], Delivered)
    assert rig.token_requests() == 2
    counts = rig.sandbox.count_by_external_id()
    assert set(counts.values()) == {1}
    assert len(counts) == 7
    assert rig.rate_limited() == 0
    rig.windows_respected()


def test_expiry_under_concurrent_posts_refreshes_once(rig: Rig) -> None:
    assert isinstance(rig.deliver("warm-up")[0], Delivered)
    rig.sandbox.expire_tokens()
    results: list[PostOutcome] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        results.append(rig.deliver(f"conc-{i}")[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4
    assert all(isinstance(r, Delivered) for r in results)
    assert rig.token_requests() == 2
    counts = rig.sandbox.count_by_external_id()
    assert all(counts[f"conc-{i}"] == 1 for i in range(4))
    # No assertion on 429s here: one thread's fake "sleep" moves the shared clock while
    # another's request is in flight, i.e. a second of simulated network latency, which
    # the limiter's margin is not meant to absorb.  The sequential tests count them.


def test_unstored_401s_also_deliver_exactly_once(rig: Rig) -> None:
    rig.sandbox.store_unauthorized = False
    assert isinstance(rig.deliver("a")[0], Delivered)
    rig.sandbox.expire_tokens()
    outcome, _ = rig.deliver("b")
    assert isinstance(outcome, Delivered)
    assert rig.sandbox.count_by_external_id() == {"a": 1, "b": 1}


def test_lost_commit_then_expired_token_is_a_replayed_success(rig: Rig) -> None:
    assert isinstance(rig.deliver("warm-up")[0], Delivered)
    rig.sandbox.drop_after_commit(1)
    key = IdempotencyKey("lost")
    first = rig.client.post_event(body_for("lost"), key)
    assert isinstance(first, Retry)
    assert first.reason == "no_answer"
    assert not first.rotate_key
    assert first.key.generation == 0
    assert first.key.unanswered_since == rig.clock()
    rig.sandbox.expire_tokens()
    outcome = rig.client.post_event(body_for("lost"), first.key, attempt=1)
    assert isinstance(outcome, Delivered)
    assert outcome.key.generation == 0
    assert outcome.event_id == rig.sandbox.events()[-1]["id"]
    assert rig.sandbox.count_by_external_id()["lost"] == 1


def test_unanswered_key_then_stored_401_rotates_after_same_key_retry(rig: Rig) -> None:
    assert isinstance(rig.deliver("warm-up")[0], Delivered)
    rig.sandbox.set_outage(True)
    first = rig.client.post_event(body_for("x"), IdempotencyKey("x"))
    assert isinstance(first, Retry)
    assert first.key.unanswered_since is not None
    rig.sandbox.set_outage(False)
    rig.sandbox.expire_tokens()
    before = len(rig.event_posts())
    outcome = rig.client.post_event(body_for("x"), first.key, attempt=1)
    assert isinstance(outcome, Delivered)
    assert outcome.key.generation == 1
    keys = [r.idempotency_key for r in rig.event_posts()[before:]]
    # old token; same key with the renewed token (a lost commit would show here); next key
    assert keys == ["x.0", "x.0", "x.1"]
    assert rig.sandbox.count_by_external_id()["x"] == 1


def test_bad_secret_is_credential_rejected_without_a_tight_loop(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = tokens_of(rig)
    (rig.tmp / "secret").write_text("wrong-secret-value\n")
    with pytest.raises(CredentialRejected) as info:
        tokens.token()
    assert "invalid_client" in str(info.value)
    assert 45 <= info.value.retry_after_s <= 60
    outcome = rig.client.post_event(body_for("e"), IdempotencyKey("e"))
    assert isinstance(outcome, AuthFailed)
    assert outcome.retry_after_s > 30
    assert rig.token_requests() == 1  # held off: no second token request
    assert rig.event_posts() == []
    # Fixing the secret needs no restart; the source tries again after its hold-off.
    (rig.tmp / "secret").write_text(SECRET + "\n")
    rig.clock.advance(outcome.retry_after_s)
    delivered, _ = rig.deliver("e", outcome.key)
    assert isinstance(delivered, Delivered)
    assert "wrong-secret-value" not in caplog.text
    assert SECRET not in caplog.text
    assert tokens.token() not in caplog.text
    assert "wrong-secret-value" not in repr(info.value)
    assert SECRET not in repr(tokens)


def test_token_endpoint_outage_keeps_the_valid_token_and_holds_off(rig: Rig) -> None:
    tokens = tokens_of(rig)
    first = tokens.token()
    rig.clock.advance(7200 - 600)  # inside the refresh-ahead margin, still valid
    rig.sandbox.set_outage(True)
    assert tokens.token() == first  # refresh failed; the current token still serves
    assert tokens.token() == first
    refused = sum(r.refused for r in rig.sandbox.requests)
    assert refused == 1  # the second call was held off, not another request
    rig.clock.advance(700)  # now expired
    with pytest.raises(TokenUnavailable) as info:
        tokens.token()
    assert info.value.retry_after_s >= 1.0


def test_static_token_rejected_then_fixed(
    sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path
) -> None:
    client = make_client(sandbox, clock, tmp_path, http, auth="static", token="not-a-token")
    outcome = client.post_event(body_for("s"), IdempotencyKey("s"))
    assert isinstance(outcome, AuthFailed)
    assert outcome.key.generation == 1
    assert [r.idempotency_key for r in sandbox.requests] == ["s.0", "s.1"]
    (tmp_path / "token").write_text("static-1\n")
    delivered = client.post_event(body_for("s"), outcome.key)
    # s.1 replays its stored 401; it was answered, so s.2 is safe and delivers.
    assert isinstance(delivered, Delivered)
    assert delivered.key.generation == 2
    assert sandbox.count_by_external_id() == {"s": 1}


@pytest.mark.parametrize("kind", ["static", "broker"])
def test_token_file_rotation_needs_no_restart(
    sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path, kind: str
) -> None:
    client = make_client(sandbox, clock, tmp_path, http, auth=kind, token="static-1")
    assert isinstance(client.post_event(body_for("a"), IdempotencyKey("a")), Delivered)
    (tmp_path / "token").write_text("static-2\n")
    assert isinstance(client.post_event(body_for("b"), IdempotencyKey("b")), Delivered)
    creators = [e["creator"]["id"] for e in sandbox.events()]

    def tok(t: str) -> str:
        return f"tok_{hashlib.sha256(t.encode()).hexdigest()[:16]}"

    assert creators == [tok("static-1"), tok("static-2")]


def test_missing_token_file_is_credential_rejected(tmp_path: Path) -> None:
    tokens = FileTokens(tmp_path / "absent", "broker")
    with pytest.raises(CredentialRejected) as info:
        tokens.token()
    assert "token_file" in str(info.value)


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
        sandbox.set_slow(0.6)
        started = time.monotonic()
        timed_out = client.post_event(body_for("w"), IdempotencyKey("w"))
        assert time.monotonic() - started < 0.5
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
        deadline = time.monotonic() + 5
        while sandbox.state()["idempotency_keys"] < 1:  # the slow request has finished
            assert time.monotonic() < deadline
            time.sleep(0.02)
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
    clock = FakeClock()
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
    def drip() -> Iterator[bytes]:
        for _ in range(20):
            time.sleep(0.05)
            yield b" "

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, content=drip())

    client, _ = mock_client(handler, tmp_path, deadline_s=0.2)
    started = time.monotonic()
    outcome = client.post_event(body_for("d"), IdempotencyKey("d"))
    assert time.monotonic() - started < 0.6
    assert isinstance(outcome, Retry)
    assert outcome.reason == "no_answer"
    assert outcome.key.unanswered_since is not None


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


# -- issue 11: hostile answers ---------------------------------------------------------------------
DATE = "Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110's example
DATE_EPOCH = 784_111_777.0
TOKEN_BODY = '{"access_token": "tok-A_1", "token_type": "Bearer", "expires_in": 7200}'
CREATED = '{"event": {"id": "aevt_1"}}'


def hostile_client(
    server: HostileServer, tmp: Path, http: httpx.Client, *, deadline_s: float = 5.0,
    token_deadline_s: float = 5.0, on_server_date: Callable[[float], None] | None = None,
) -> StoraClient:
    """A client_credentials client whose token endpoint and API are ``server``."""
    clock = FakeClock()
    (tmp / "secret").write_text(SECRET + "\n")
    limiter = make_limiter(clock)
    tokens = ClientCredentialsTokens(
        token_url=server.url + TOKEN_PATH, client_id=CLIENT_ID, secret_file=tmp / "secret",
        scope=EVENT_SCOPE, http=http, limiter=limiter, monotonic=clock, clock=clock,
        rng=random.Random(7), deadline_s=token_deadline_s)
    return StoraClient(server.url + "/2025-09", tokens, limiter, http=http, clock=clock,
                       rng=random.Random(11), deadline_s=deadline_s,
                       on_server_date=on_server_date)


def routes(token: Reply, event: Reply) -> Callable[[Request], Reply]:
    return lambda request: token if request.path == TOKEN_PATH else event


def test_stora_text_cannot_forge_or_swell_log_lines(
        tmp_path: Path, http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    forged = "aevt_1\n2026-05-01 12:00:00 ERROR gateway.agent: door A-101 forced\x1b[31m"
    error = json.dumps({"error": {
        "code": "forbidden\r\nINFO forged line", "type": "invalid_request_error",
        "message": "no\n\x1b[2J" + "x" * 10_000, "request_id": "r\n" * 5_000,
        "details": [{"message": "\n" * 3_000, "pointer": "/a\u202e"}]}})
    replies = iter([json_reply(201, json.dumps({"event": {"id": forged}})),
                    json_reply(422, error)])
    with HostileServer(lambda r: json_reply(200, TOKEN_BODY) if r.path == TOKEN_PATH
                       else next(replies)) as server, caplog.at_level(logging.DEBUG):
        client = hostile_client(server, tmp_path, http)
        delivered = client.post_event(body_for("f1"), IdempotencyKey("f1"))
        dead = client.post_event(body_for("f2"), IdempotencyKey("f2"))
    assert isinstance(delivered, Delivered)
    assert delivered.event_id is None  # not id-shaped: not kept
    assert isinstance(dead, Dead)
    record = dead.as_record()
    assert record["code"] == "forbidden\\r\\nINFO forged line"  # escaped, visible
    texts = [record["code"], record["message"], record["request_id"],
             *(d[k] for d in record["details"] for k in ("message", "pointer"))]
    assert all(len(t) <= MAX_TEXT_CHARS and t.isprintable() for t in texts)
    messages = [r.getMessage() for r in caplog.records]
    assert any("not id-shaped" in m for m in messages)
    for message in messages:
        assert "\n" not in message
        assert "\r" not in message
        assert "\x1b" not in message
        assert len(message) < 2_000


def test_a_body_nested_too_deep_is_no_error_envelope_and_no_crash(
        tmp_path: Path, http: httpx.Client) -> None:
    deep = json_reply(422, "[" * 100_000)
    with HostileServer(routes(json_reply(200, TOKEN_BODY), deep)) as server:
        outcome = hostile_client(server, tmp_path, http).post_event(body_for("n"),
                                                                    IdempotencyKey("n"))
    assert isinstance(outcome, Dead)
    assert (outcome.status, outcome.code) == (422, "http_422")


def test_a_token_endpoint_that_redirects_is_a_refused_credential(
        tmp_path: Path, http: httpx.Client) -> None:
    moved = Reply(302, headers=[("Location", "https://elsewhere.invalid/steal\nX: y")])
    with HostileServer(routes(moved, json_reply(201, CREATED))) as server:
        client = hostile_client(server, tmp_path, http)
        outcome = client.post_event(body_for("r"), IdempotencyKey("r"))
        assert isinstance(outcome, AuthFailed)
        assert "token_url" in outcome.reason
        assert "302" in outcome.reason
        assert len(server.requests) == 1  # not followed: the secret went nowhere else
        assert client.tokens.health().state == "failing"


@pytest.mark.parametrize("token_side", [True, False])
def test_dripped_headers_end_by_the_deadline(
        tmp_path: Path, token_side: bool) -> None:
    """httpx's read timeout never fires on a byte every 0.2 s; the overall deadline does."""
    drip = Reply(200, TOKEN_BODY.encode(), head_drip_s=0.2)
    script = (routes(drip, json_reply(201, CREATED)) if token_side
              else routes(json_reply(200, TOKEN_BODY), drip))
    with HostileServer(script) as server, make_http_client() as http:
        client = hostile_client(server, tmp_path, http, deadline_s=1.0, token_deadline_s=1.0)
        started = time.monotonic()
        outcome = client.post_event(body_for("d"), IdempotencyKey("d"))
        took = time.monotonic() - started
    assert took < 1.0 + 0.8
    assert isinstance(outcome, Retry)
    if token_side:
        assert outcome.reason == "token_unavailable"
        assert "no complete answer within 1 s" in (outcome.detail or "")
    else:
        assert outcome.reason == "no_answer"
        assert outcome.key.unanswered_since is not None  # it may have been created


def test_a_compressed_token_answer_is_not_inflated(tmp_path: Path, http: httpx.Client) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB in ~64 KiB
    assert len(bomb) < MAX_TOKEN_RESPONSE_BYTES
    token = Reply(200, bomb, [("Content-Type", "application/json"),
                              ("Content-Encoding", "gzip")])
    with HostileServer(routes(token, json_reply(201, CREATED))) as server:
        outcome = hostile_client(server, tmp_path, http).post_event(body_for("z"),
                                                                    IdempotencyKey("z"))
    assert isinstance(outcome, Retry)
    assert outcome.reason == "token_unavailable"
    assert "compressed (gzip)" in (outcome.detail or "")
    assert server.requests[0].headers["accept-encoding"] == "identity"


def test_an_unusable_token_value_is_refused(tmp_path: Path, http: httpx.Client) -> None:
    bad = json.dumps({"access_token": "tok\r\nX-Injected: 1", "token_type": "Bearer"})
    with HostileServer(routes(json_reply(200, bad), json_reply(201, CREATED))) as server:
        outcome = hostile_client(server, tmp_path, http).post_event(body_for("t"),
                                                                    IdempotencyKey("t"))
    assert isinstance(outcome, Retry)
    assert "unusable token" in (outcome.detail or "")
    assert [r.path for r in server.requests] == [TOKEN_PATH]


def test_cap_text_and_safe_id() -> None:
    assert cap_text("short") == "short"
    capped = cap_text("é" * 1000, 50)
    assert len(capped) <= 50
    assert capped.endswith(f"…(+{1000 - capped.index('…')} chars)")
    assert cap_text("a\nb\x1b") == "a\\nb\\x1b"
    assert safe_id("aevt_01H-x") == "aevt_01H-x"
    for bad in ("", "a\nb", "a b", "x" * 65, 5, None, "aevt_1\n"):
        assert safe_id(bad) is None


# -- the server's Date, a second source of time for the clock -----------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    (DATE, DATE_EPOCH),
    ("Sunday, 06-Nov-94 08:49:37 GMT", DATE_EPOCH),  # RFC 850, obsolete but valid
    ("Sun, 06 Nov 1994 08:49:37 -0000", None),  # "no zone": not trusted
    ("yesterday", None), ("", None), (None, None), ("Sun, 06 Nov 1994 " + "9" * 80, None),
    ("Mon, 99 Foo 1994 08:49:37 GMT", None),
])
def test_parse_http_date(value: str | None, expected: float | None) -> None:
    assert parse_http_date(value) == expected


def test_every_trusted_answer_reports_its_date(tmp_path: Path, http: httpx.Client) -> None:
    dates: list[float] = []
    token = json_reply(200, TOKEN_BODY, date=DATE)
    with HostileServer(routes(token, json_reply(201, CREATED, date=DATE))) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=dates.append)
        assert isinstance(client.post_event(body_for("a"), IdempotencyKey("a")), Delivered)
    assert dates == [DATE_EPOCH, DATE_EPOCH]  # the token answer, then the event's


@pytest.mark.parametrize("date", [None, "garbage", "Sun, 06 Nov 1994 08:49:37 -0000"])
def test_no_or_bad_date_is_ignored(tmp_path: Path, http: httpx.Client, date: str | None) -> None:
    dates: list[float] = []
    script = routes(json_reply(200, TOKEN_BODY, date=date), json_reply(201, CREATED, date=date))
    with HostileServer(script) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=dates.append)
        assert isinstance(client.post_event(body_for("a"), IdempotencyKey("a")), Delivered)
        assert client.probe_server_time() is None
    assert dates == []


@pytest.mark.parametrize(("url", "trusted"), [
    ("https://public-api.stora.co/2025-09", True),
    ("http://public-api.stora.co/2025-09", False),  # anyone on the path could write it
    ("http://10.0.0.1/2025-09", False),
    ("http://localhost:8080/2025-09", True),
    ("http://[::1]:8080/2025-09", True),
])
def test_dates_are_taken_only_over_tls_or_from_loopback(
        tmp_path: Path, url: str, trusted: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"event": {"id": "aevt_1"}}, headers={"Date": DATE})

    dates: list[float] = []
    (tmp_path / "token").write_text("tok-1\n")
    clock = FakeClock()
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = StoraClient(url, FileTokens(tmp_path / "token"), make_limiter(clock),
                             http=http, clock=clock, on_server_date=dates.append)
        assert isinstance(client.post_event(body_for("u"), IdempotencyKey("u")), Delivered)
        assert client.probe_server_time() == (DATE_EPOCH if trusted else None)
    assert dates == ([DATE_EPOCH] * 2 if trusted else [])


def test_a_failing_date_hook_does_not_stop_delivery(
        tmp_path: Path, http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    def hook(epoch: float) -> None:
        raise RuntimeError("the clock is broken")

    script = routes(json_reply(200, TOKEN_BODY, date=DATE), json_reply(201, CREATED, date=DATE))
    with HostileServer(script) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=hook)
        for n in range(3):
            outcome = client.post_event(body_for(f"h{n}"), IdempotencyKey(f"h{n}"))
            assert isinstance(outcome, Delivered)
        assert client.probe_server_time() == DATE_EPOCH
    assert sum("server-Date hook failed;" in r.getMessage() for r in caplog.records) == 1


def test_probe_server_time_asks_without_a_token(tmp_path: Path, http: httpx.Client) -> None:
    dates: list[float] = []
    not_found = json_reply(404, '{"error": {"code": "invalid_endpoint"}}', date=DATE)
    with HostileServer(lambda r: not_found) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=dates.append)
        assert client.probe_server_time() == DATE_EPOCH  # any status counts
        (probe,) = server.requests
        assert (probe.method, probe.path) == ("GET", "/2025-09")
        assert "authorization" not in probe.headers
        assert dates == [DATE_EPOCH]
        for _ in range(PER_S - 1):  # the probe takes rate-limit slots like any request
            client.probe_server_time()
        assert client.probe_server_time() is None  # no slot: nothing sent
        assert len(server.requests) == PER_S
    gone = hostile_client(server, tmp_path, http)  # the server is stopped: no answer
    assert gone.probe_server_time() is None


def test_probe_never_raises_when_the_send_time_cannot_be_kept(tmp_path: Path) -> None:
    def full_disk(at: float) -> None:
        raise OSError(28, "No space left on device")

    (tmp_path / "token").write_text("tok-1\n")
    with HostileServer(lambda r: json_reply(404, "{}", date=DATE)) as server:
        client = StoraClient(server.url, FileTokens(tmp_path / "token"),
                             RateLimiter(PER_S, PER_MIN, on_record=full_disk))
        assert client.probe_server_time() is None
        client.close()
    assert server.requests == []


def test_a_dripping_probe_ends_by_its_deadline(tmp_path: Path) -> None:
    with HostileServer(lambda r: Reply(200, b"x" * 100, head_drip_s=0.1)) as server, \
            make_http_client() as http:
        started = time.monotonic()
        assert hostile_client(server, tmp_path, http).probe_server_time(deadline_s=0.5) is None
        assert time.monotonic() - started < 1.2


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (EC P-256: quick to make)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


def test_over_tls_dates_count_and_a_stuck_handshake_ends_by_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # make_http_client trusts it from here
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    (tmp_path / "token").write_text("tok-1\n")
    dates: list[float] = []
    with HostileServer(lambda r: json_reply(404, "{}", date=DATE), context) as server, \
            make_http_client() as http:
        client = StoraClient(server.url + "/2025-09", FileTokens(tmp_path / "token"),
                             RateLimiter(PER_S, PER_MIN), http=http,
                             on_server_date=dates.append)
        assert client.probe_server_time() == DATE_EPOCH
    assert dates == [DATE_EPOCH]
    with socket.socket() as silent, make_http_client() as http:  # accepts, never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/2025-09"
        client = StoraClient(url, FileTokens(tmp_path / "token"), RateLimiter(PER_S, PER_MIN),
                             http=http)
        started = time.monotonic()
        assert client.probe_server_time(deadline_s=0.5) is None
        assert time.monotonic() - started < 1.3
