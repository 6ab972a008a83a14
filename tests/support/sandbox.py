"""Requests the Stora API sandbox tests share (tests/devkit/test_sandbox_*.py): one call over
``http.client`` on a real socket, a token, an event, the admin API, and the fake clock.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from devkit.sandbox import EVENT_SCOPE, Sandbox
from devkit.testing import FakeClock

T0 = 1_800_000_000.5  # the fake clock's start; .5 so integer-second windows would differ

EVENTS = "/2025-09/timeline/events"

STATIC = "static-token-1"

ERROR_KEYS = {"code", "type", "message", "request_id", "details", "links"}


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


def state(sandbox: Sandbox) -> dict[str, Any]:
    r = call(sandbox, "GET", "/_sandbox/state")
    assert r.status == 200
    return r.json()  # type: ignore[no-any-return]


def clock() -> FakeClock:
    return FakeClock(T0)


def sandbox_options(clock: FakeClock) -> dict[str, Any]:
    """Limits high enough that a frozen clock never meets them."""
    return {"clients": {"cid": "secret"}, "static_tokens": {STATIC}, "max_per_second": 10_000,
            "max_per_minute": 10_000, "clock": clock}


def limited(clock: FakeClock) -> Iterator[Sandbox]:
    with Sandbox(
        clients={"cid": "secret"},
        static_tokens={STATIC},
        max_per_second=5,
        max_per_minute=8,
        clock=clock,
    ) as sb:
        yield sb
