"""The rig the Stora client tests share (tests/gateway/stora/test_stora_client_*.py): a
client on the sandbox over real HTTP with one fake clock, its limiter, and an event
body."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox import EVENT_SCOPE, Sandbox, max_in_window
from devkit.testing import FakeClock
from gateway.stora.answers import PostOutcome, Retry
from gateway.stora.client import StoraClient
from gateway.stora.http import USER_AGENT
from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.ratelimit import RateLimiter
from gateway.stora.tokens import ClientCredentialsTokens, FileTokens
from tests.support.hostile_http import HostileServer, Reply, Request
from tests.support.sandbox import event_body as body_for  # the sandbox tests' event body

T0 = 1_800_000_000.5

PER_S, PER_MIN = 5, 20

CLIENT_ID, SECRET = "cid", "s3cr3t-value-never-logged"

TOKEN_PATH = "/oauth2/token"

EVENTS_PATH = "/2025-09/timeline/events"


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


def clock() -> FakeClock:
    return FakeClock(T0)


def http() -> Iterator[httpx.Client]:
    with httpx.Client(
        timeout=httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0),
        headers={"User-Agent": USER_AGENT},
    ) as client:
        yield client


def sandbox_options(clock: FakeClock) -> dict[str, Any]:
    return {"clients": {CLIENT_ID: SECRET}, "static_tokens": {"static-1", "static-2"},
            "max_per_second": PER_S, "max_per_minute": PER_MIN, "clock": clock}


def rig(sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path) -> Rig:
    client = make_client(sandbox, clock, tmp_path, http)
    return Rig(sandbox, clock, client, client.limiter, http, tmp_path)


TOKEN_BODY = '{"access_token": "tok-A_1", "token_type": "Bearer", "expires_in": 7200}'

CREATED = '{"event": {"id": "aevt_1"}}'


def hostile_client(
    server: HostileServer, tmp: Path, http: httpx.Client, *, deadline_s: float = 5.0,
    token_deadline_s: float = 5.0, on_server_date: Callable[[float], None] | None = None,
) -> StoraClient:
    """A client_credentials client whose token endpoint and API are ``server``."""
    clock = FakeClock(T0)
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
