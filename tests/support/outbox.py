"""The rig the outbox drainer tests share (tests/gateway/outbox/test_outbox_*.py): a
store, the sandbox over real HTTP and a drainer on one fake clock, and an event record."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox import EVENT_SCOPE, Sandbox, max_in_window
from devkit.testing import FakeClock
from gateway.outbox.drainer import Drainer
from gateway.outbox.timeline import external_id_for, make_event
from gateway.stora.client import StoraClient
from gateway.stora.http import USER_AGENT
from gateway.stora.ratelimit import RateLimiter
from gateway.stora.tokens import ClientCredentialsTokens, FileTokens
from gateway.store import SEND_HISTORY_KEEP_S, Store

T0 = 1_800_000_000.5

PER_S, PER_MIN = 10, 60  # Stora's documented limits (stora-api §5), sandbox and client alike

CLIENT_ID, SECRET = "cid", "s3cr3t-value"

STATIC = "static-1"

EVENTS_PATH = "/2025-09/timeline/events"


def record(n: int | str, unit: str = "unit_a101") -> Any:
    return make_event(
        "unlocked", app_name="TestGate", site_id="site_test", unit=unit, reference="A-101",
        external_id=external_id_for("site_test", "outbox-test", str(n)), occurred_at=T0,
        actor="tenant app", detail="for 8 s; unit A-101",
    )


@dataclass
class Rig:
    """A sandbox, a store, a drainer, one fake clock; what the alarms said."""

    sandbox: Sandbox
    clock: FakeClock
    db: Path
    http: httpx.Client
    tmp: Path
    store: Store = field(init=False)
    drainer: Drainer = field(init=False)
    alarms: list[tuple[str, str | None, str]] = field(default_factory=list)

    def open(self, *, auth: str = "static", base_url: str | None = None,
             drainer_cls: type[Drainer] = Drainer, token_url: str | None = None,
             **drainer_options: Any) -> Drainer:
        """(Re)open the store and build a drainer whose limiter starts from the history."""
        self.store = Store(self.db, clock=self.clock)
        history = self.store.send_history(self.clock() - SEND_HISTORY_KEEP_S)
        limiter = RateLimiter(PER_S, PER_MIN, history, clock=self.clock, monotonic=self.clock,
                              sleep=self.clock.advance, on_record=self.store.record_send)
        tokens: ClientCredentialsTokens | FileTokens
        if auth == "client_credentials":
            (self.tmp / "secret").write_text(SECRET + "\n")
            tokens = ClientCredentialsTokens(
                token_url=token_url or self.sandbox.token_url, client_id=CLIENT_ID,
                secret_file=self.tmp / "secret", scope=EVENT_SCOPE, http=self.http,
                limiter=limiter, monotonic=self.clock, clock=self.clock,
                rng=random.Random(7))
        else:
            (self.tmp / "token").write_text(STATIC + "\n")
            tokens = FileTokens(self.tmp / "token", "static")
        client = StoraClient(base_url or self.sandbox.api_url, tokens, limiter, http=self.http,
                             clock=self.clock, rng=random.Random(11))
        self.drainer = drainer_cls(self.store, client, source_id="tsrc_test", template_id=None,
                                   alarm=lambda *a: self.alarms.append(a), clock=self.clock,
                                   **drainer_options)
        return self.drainer

    def add(self, count: int, start: int = 0) -> list[str]:
        """Queue ``count`` events (one transaction each, as units do); their external ids."""
        ids = []
        for n in range(start, start + count):
            rec = record(n)
            with self.store.transaction() as tx:
                assert tx.add_event(rec)
            ids.append(rec.external_id)
        return ids

    def drain(self, stop_when: Callable[[], bool] | None = None,
              max_steps: int = 20_000) -> int:
        return self.drainer.run_until_idle(self.clock.advance, stop_when=stop_when,
                                           max_steps=max_steps)

    def delivered(self) -> int:
        return self.store.event_count("delivered")

    def posts(self) -> list[Any]:
        return [r for r in self.sandbox.requests if r.path == EVENTS_PATH]

    def statuses(self) -> list[int | None]:
        return [r.status for r in self.sandbox.requests]

    def assert_windows(self) -> None:
        times = self.sandbox.request_times()
        assert max_in_window(times, 1.0) <= PER_S
        assert max_in_window(times, 60.0) <= PER_MIN

    def assert_exactly_once(self, ids: list[str], missing: frozenset[str] = frozenset()) -> None:
        counts = self.sandbox.count_by_external_id()
        assert {i: counts.get(i, 0) for i in ids} == {i: 0 if i in missing else 1 for i in ids}
        assert self.sandbox.state()["body_mismatches"] == 0  # one body per key, always


def clock() -> FakeClock:
    return FakeClock(T0)


def http() -> Iterator[httpx.Client]:
    # TCP_NODELAY: httpx writes the headers and the body of a POST separately, and with
    # Nagle's algorithm the body then waits for the server's delayed ACK (~40 ms a request).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(timeout=httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0),
                      headers={"User-Agent": USER_AGENT}, transport=transport) as client:
        yield client


def sandbox_options(clock: FakeClock) -> dict[str, Any]:
    return {"clients": {CLIENT_ID: SECRET}, "static_tokens": {STATIC}, "max_per_second": PER_S,
            "max_per_minute": PER_MIN, "clock": clock}


def rig(sandbox: Sandbox, clock: FakeClock, http: httpx.Client, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(sandbox, clock, tmp_path / "gateway.db", http, tmp_path)
    r.open()
    yield r
    r.store.close()
