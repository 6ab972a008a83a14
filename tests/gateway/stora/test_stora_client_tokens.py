"""The Stora client (gateway/stora/) against the sandbox over real HTTP: tokens.

What is tested is the guarantee, counted at the server: every event exists exactly once
(``count_by_external_id``), no 1-second or 60-second window holds more requests than
allowed, and no fault leaves an event stuck on a replayed error.  Time is a fake clock
shared by the sandbox and the client; the client "sleeps" by advancing it, so a minute
of rate limiting costs nothing.
Only the concurrency tests use real time, a fraction of a second each.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from devkit.sandbox import Sandbox
from devkit.testing import FakeClock
from gateway.stora.answers import AuthFailed, Delivered, PostOutcome, Retry
from gateway.stora.errors import CredentialRejected, TokenUnavailable
from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.tokens import ClientCredentialsTokens, FileTokens
from tests.support.stora_client import SECRET, Rig, body_for, make_client


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
