"""What the partner-sandbox tests share (tests/devkit/test_sandbox_partner_*.py): the
partner app, the Authorization Code flow over httpx, two operators, and a webhook
receiver (a stdlib ``http.server`` on a free port).  No tests here.

Requests go over real HTTP to the sandbox; its clock is the fake one of
tests/devkit/conftest.py, moved with :meth:`Sandbox.advance`, never slept on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httpx

from devkit.sandbox import PartnerApp, Sandbox
from devkit.testing import FakeClock
from tests.support import sandbox as support

CLIENT_ID = "relay-app"
CLIENT_SECRET = "relay-secret"
REDIRECT = "https://relay.example/oauth/callback"
APP = PartnerApp(CLIENT_ID, CLIENT_SECRET, (REDIRECT,), name="TestRelay")
SCOPES = ("public.site:read public.unit:read public.webhook_endpoint:read "
          "public.webhook_endpoint:write public.timeline_event:write")
#: The partner's access tokens live 6 s, as the relay's tests will use.
ACCESS_TTL = 6

ACME = [{"id": "site_acme1", "name": "Acme North",
         "access_hours": {"monday": "08:00-20:00", "sunday": "closed"},
         "units": [{"id": f"unit_acme{i}", "reference_id": f"A-{100 + i}"} for i in range(1, 6)]
         + [{"id": "unit_acme_occ", "reference_id": "A-200", "status": "occupied"}]},
        {"id": "site_acme2", "name": "Acme South",
         "units": [{"id": "unit_acme_s1", "reference_id": "S-1"}]}]
BOLT = [{"id": "site_bolt1", "name": "Bolt Depot",
         "units": [{"id": "unit_bolt1", "reference_id": "B-1", "status": "occupied"}]}]


def options(clock: FakeClock, **extra: Any) -> dict[str, Any]:
    """The sandbox's options: the shared ones, the partner app, short retries."""
    return {**support.sandbox_options(clock), "partner_app": APP,
            "access_token_ttl_s": ACCESS_TTL, "webhook_retry_s": (0.05, 0.05, 0.05),
            "webhook_timeout_s": 2.0, **extra}


def add_operators(sandbox: Sandbox) -> None:
    """``acme`` (two sites, seven units) and ``bolt`` (one site, one unit)."""
    sandbox.create_operator("acme", name="Acme Storage", sites=ACME)
    sandbox.create_operator("bolt", name="Bolt Self Storage", sites=BOLT)


def pkce() -> tuple[str, str]:
    """A fresh ``(code_verifier, code_challenge)`` (S256)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_query(challenge: str, **extra: str) -> dict[str, str]:
    query = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
             "scope": SCOPES, "state": "st-1", "code_challenge": challenge,
             "code_challenge_method": "S256"}
    query.update(extra)
    return {k: v for k, v in query.items() if v != ""}


def redirected(r: httpx.Response) -> dict[str, str]:
    """The query of a 302 to the redirect URI (which it must be)."""
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def approve(client: httpx.Client, operator: str, challenge: str, **extra: str) -> str:
    """Post "Approve" for ``operator``; the code."""
    form = {**authorize_query(challenge, **extra), "operator": operator, "decision": "approve"}
    got = redirected(client.post("/oauth2/authorize", data=form))
    assert got["state"] == "st-1"
    return got["code"]


def exchange(client: httpx.Client, code: str, verifier: str, **extra: str) -> httpx.Response:
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "code_verifier": verifier}
    body.update(extra)
    return client.post("/oauth2/token", json=body)


def refresh(client: httpx.Client, refresh_token: str, **extra: str) -> httpx.Response:
    body = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    body.update(extra)
    return client.post("/oauth2/token", json=body)


def connect(client: httpx.Client, operator: str, scope: str = SCOPES) -> dict[str, Any]:
    """The whole flow for ``operator``: the token answer."""
    verifier, challenge = pkce()
    code = approve(client, operator, challenge, scope=scope)
    r = exchange(client, code, verifier)
    assert r.status_code == 200, r.text
    return cast(dict[str, Any], r.json())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def oauth_error(r: httpx.Response, status: int, error: str) -> None:
    """``r`` is the RFC 6749 §5.2 error ``error`` with ``status``."""
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"error", "error_description"}
    assert doc["error"] == error


def api_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``r`` is the stora-api §6 error ``code`` with ``status``; the error object."""
    assert r.status_code == status, r.text
    error = cast(dict[str, Any], r.json()["error"])
    assert error["code"] == code
    return error


def endpoint_body(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "relay", "api_version": "2025-09", "url": url,
            "event_types": ["unit.updated"], "metadata": {"relay": "key-1"}, **extra}


def verify(secret: str, header: str, body: bytes) -> int:
    """Check an ``X-Stora-Signature`` as a receiver must (HMAC-SHA256 of ``t.body`` keyed
    with the secret's UTF-8 bytes, constant-time); its ``t``.  AssertionError if bad."""
    parts = dict(p.split("=", 1) for p in header.split(","))
    assert set(parts) == {"t", "v1"}
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, parts["v1"]), "bad signature"
    return int(parts["t"])


@dataclass
class Hit:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver on a free local port: records each POST and answers the next
    of ``statuses`` (200 once they run out)."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.hits: list[Hit] = []
        self.statuses = list(statuses)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.hits.append(Hit(self.path, dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhooks/stora/key-1"

    def count(self) -> int:
        with self._lock:
            return len(self.hits)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
