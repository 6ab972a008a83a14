"""Operators' access tokens (contract §7.5) over real HTTP, the sandbox as Stora: refreshed
ahead of expiry with no 401 reaching a caller, one refresh per operator however many
workers ask at once, the newest refresh token kept (the sandbox rotates and revokes the
old one at once), ``invalid_grant`` -> ``reauth_required`` until the operator connects
again, and the old token kept while a refresh cannot reach Stora.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.db.engine import Database
from relay.db.models import Operator
from relay.ratelimit import RateLimiter
from relay.stora import StoraApi, StoraError
from relay.tokens import REFRESH_AT, ReauthRequiredError, Tokens, TokenUnavailableError
from tests.support.relay_connect import BrokerStack, broker_stack, sites_spec

TTL_S = 6
RUN_S = 120.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[BrokerStack]:
    with broker_stack(tmp_path / "relay", {"acme": sites_spec("acme", 2)}) as s:
        yield s


def row(stack: BrokerStack, operator_id: str) -> Operator:
    with stack.services.db.session() as s:
        found = s.get(Operator, operator_id)
        assert found is not None
        return found


def set_token_times(stack: BrokerStack, operator_id: str, *, expires_in: float,
                    lifetime: float | None = None) -> None:
    """Move the relay's view of the token's expiry (the sandbox's stays as it was)."""
    with stack.services.db.session() as s:
        found = s.get(Operator, operator_id)
        assert found is not None
        found.token_expires_at = time.time() + expires_in
        if lifetime is not None:
            found.token_lifetime_s = lifetime


def list_sites(stack: BrokerStack, operator_id: str) -> Any:
    def call(token: str) -> Any:
        stack.limiter.acquire(operator_id, "test")
        return stack.services.stora.request("GET", "sites", token)
    return stack.tokens.call(operator_id, call)


def statuses(stack: BrokerStack, path_end: str) -> list[int | None]:
    return [r.status for r in stack.sandbox.requests if r.path.endswith(path_end)]


@pytest.mark.timeout(300)
def test_six_second_tokens_for_two_minutes_of_traffic_and_no_401(tmp_path: Path) -> None:
    with broker_stack(tmp_path / "relay", {"acme": sites_spec("acme", 1)},
                      access_token_ttl_s=TTL_S) as stack:
        op = stack.connect("acme")
        issued = time.time()
        credential = stack.add_site("site_acme1", op)
        errors: list[Exception] = []
        answers: list[int] = []
        stop = time.monotonic() + RUN_S

        def reader() -> None:
            while time.monotonic() < stop:
                try:
                    list_sites(stack, op)
                except Exception as exc:  # every failure is the finding
                    errors.append(exc)
                time.sleep(0.1)

        def gateway() -> None:
            with httpx.Client(timeout=30) as http:
                i = 0
                while time.monotonic() < stop:
                    answers.append(stack.post(http, credential, "site_acme1",
                                              f"e-{i}").status_code)
                    i += 1
                    time.sleep(0.1)

        threads = [threading.Thread(target=reader) for _ in range(2)]
        threads.append(threading.Thread(target=gateway))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - issued
        state = stack.sandbox.operator_state("acme")
        refreshes = row(stack, op).refreshes
    assert errors == []
    assert answers
    assert set(answers) == {201}
    assert 401 not in statuses(stack, "/sites") + statuses(stack, "/timeline/events")
    # One refresh per token lifetime, each at 75 % of it: no more, no fewer.
    assert state["refreshes"] == refreshes
    assert state["tokens_issued"] == refreshes + 1
    expected = elapsed / (REFRESH_AT * TTL_S)
    print(f"\n{refreshes} refreshes in {elapsed:.1f} s (expected {expected:.1f}); "
          f"{len(answers)} events, sandbox requests {state['requests']}")
    assert abs(refreshes - expected) <= 1


def test_twenty_concurrent_calls_at_expiry_make_exactly_one_refresh(
        stack: BrokerStack) -> None:
    """Ten threads of this worker and ten other 'replicas' (their own Tokens, engine and
    limiter on the same database) ask at once for an expired token."""
    op = stack.connect("acme")
    old = stack.tokens.access_token(op)
    set_token_times(stack, op, expires_in=-1)
    url = stack.services.db.url
    replicas: list[Tokens] = []
    extra: list[tuple[Database, StoraApi]] = []
    for _ in range(10):
        db = Database(url)
        api = StoraApi(stack.services.config.stora)
        limiter = RateLimiter(db, max_per_second=50, max_per_minute=3000)
        replicas.append(Tokens(db, stack.services.keyring, api, limiter))
        extra.append((db, api))
    workers = [stack.tokens] * 10 + replicas
    barrier = threading.Barrier(len(workers))
    got: list[str] = []
    failed: list[Exception] = []

    def ask(tokens: Tokens) -> None:
        barrier.wait()
        try:
            got.append(tokens.access_token(op))
        except Exception as exc:
            failed.append(exc)

    threads = [threading.Thread(target=ask, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for db, api in extra:
        api.close()
        db.close()
    assert failed == []
    assert len(got) == 20
    assert len(set(got)) == 1
    assert got[0] != old
    assert stack.sandbox.operator_state("acme")["refreshes"] == 1
    assert row(stack, op).refreshes == 1
    assert list_sites(stack, op)["sites"]


def test_a_401_reloads_the_token_and_retries_once(stack: BrokerStack) -> None:
    op = stack.connect("acme")
    assert stack.sandbox.expire_tokens() == 1  # the sandbox forgets the access token
    assert list_sites(stack, op)["sites"]  # 401, refresh, retry: the caller sees none
    assert row(stack, op).refreshes == 1
    assert statuses(stack, "/sites")[-2:] == [401, 200]

    def always_401(token: str) -> None:
        raise StoraError(401, "invalid_token", "no")

    with pytest.raises(StoraError) as refused:
        stack.tokens.call(op, always_401)
    assert refused.value.status == 401
    assert row(stack, op).refreshes == 2  # the stored token was the one refused: renewed


def test_a_revoked_grant_means_reauth_required_then_503_until_reconnected(
        stack: BrokerStack) -> None:
    op = stack.connect("acme")
    credential = stack.add_site("site_acme1", op)
    with httpx.Client(timeout=10) as http:
        assert stack.post(http, credential, "site_acme1", "e-1").status_code == 201
        assert stack.sandbox.revoke_grant("acme") == 1
        refused = stack.post(http, credential, "site_acme1", "e-2")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "reauth_required"
        info = stack.services.operators.get(op)
        assert info is not None
        assert info.status == "reauth_required"
        # One refresh was tried and refused; from now on nothing at all is sent.
        assert statuses(stack, "/oauth2/token")[-1:] == [400]
        sent = len(stack.sandbox.requests)
        again = stack.post(http, credential, "site_acme1", "e-2")
        assert again.status_code == 503
        with pytest.raises(ReauthRequiredError):
            stack.tokens.access_token(op)
        assert len(stack.sandbox.requests) == sent

        assert stack.connect("acme") == op  # the same operator, recognised by its sites
        resumed = stack.post(http, credential, "site_acme1", "e-2")
        assert resumed.status_code == 201
    assert [e["external"]["id"] for e in stack.sandbox.events("acme")] == ["e-1", "e-2"]


def test_a_refresh_that_cannot_reach_stora_keeps_the_old_token_while_it_is_valid(
        stack: BrokerStack) -> None:
    op = stack.connect("acme")
    credential = stack.add_site("site_acme1", op)
    old = stack.tokens.access_token(op)
    # Due (past 75 % of a 60-s life) but valid for 10 s more, as the relay sees it.
    set_token_times(stack, op, expires_in=10, lifetime=60)
    stack.sandbox.set_outage(True)
    assert stack.tokens.access_token(op) == old
    lease = row(stack, op)
    assert lease.refresh_lease_owner is None
    assert lease.refresh_lease_until is not None  # a back-off: no worker retries at once
    assert stack.tokens.access_token(op) == old  # and no second attempt meanwhile
    assert statuses(stack, "/oauth2/token").count(None) == 1
    set_token_times(stack, op, expires_in=-1)
    with pytest.raises(TokenUnavailableError) as unavailable:
        stack.tokens.access_token(op)
    assert unavailable.value.retryable
    with httpx.Client(timeout=10) as http:
        held = stack.post(http, credential, "site_acme1", "e-1")
        assert held.status_code == 503
        assert held.json()["error"]["code"] == "token_unavailable"
        assert int(held.headers["retry-after"]) >= 1
        stack.sandbox.set_outage(False)
        time.sleep(1.3)  # the back-off: 2 % of 60 s
        assert stack.post(http, credential, "site_acme1", "e-1").status_code == 201
    assert stack.tokens.access_token(op) != old
    assert row(stack, op).refreshes == 1
