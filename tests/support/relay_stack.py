"""The relay in front of the sandbox (Stora for partners), for end-to-end tests.

:func:`relay_stack` starts a sandbox with the relay registered as its partner app and
one operator, ``acme``, with two sites; then the relay's app on uvicorn, configured to
use that sandbox as Stora.  :meth:`Stack.connect` runs the whole connect flow over real
HTTP, as a browser would: the relay's ``/connect``, the sandbox's consent form
(Approve), the relay's callback.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from devkit.mosquitto import free_port
from devkit.sandbox import PartnerApp, Sandbox
from relay.services import Services
from tests.support.relay import CLIENT_ID, RelayServer, relay_on_disk

CLIENT_SECRET = "relay-test-secret"
ACME_SITES = [
    {"id": "site_acme1", "name": "Acme North",
     "units": [{"id": f"unit_acme{i}", "reference_id": f"A-{100 + i}", "status": "occupied"}
               for i in range(1, 6)]},
    {"id": "site_acme2", "name": "Acme South",
     "units": [{"id": "unit_acme_s1", "reference_id": "S-1", "status": "occupied"}]},
]


def query_of(url: str) -> dict[str, str]:
    """The query parameters of ``url`` (one value each)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@dataclass
class Stack:
    """A running sandbox and relay, and a browser-like HTTP client of the relay."""

    sandbox: Sandbox
    relay: RelayServer
    services: Services
    browser: httpx.Client
    connected: list[str] = field(default_factory=list)

    @property
    def callback_url(self) -> str:
        """The relay's redirect URI."""
        return self.relay.url + "/oauth/callback"

    def start_connect(self) -> dict[str, str]:
        """``GET /connect``: the query of the authorize URL it redirects to."""
        answer = self.browser.get("/connect")
        assert answer.status_code == 302, answer.text
        location = answer.headers["location"]
        assert location.startswith(self.sandbox.url + "/oauth2/authorize?")
        return query_of(location)

    def consent(self, query: dict[str, str], operator: str = "acme",
                decision: str = "approve") -> str:
        """Post the sandbox's consent form; the URL it sends the browser back to."""
        form = {**query, "operator": operator, "decision": decision}
        answer = httpx.post(self.sandbox.url + "/oauth2/authorize", data=form)
        assert answer.status_code == 302, answer.text
        return answer.headers["location"]

    def callback(self, url: str) -> httpx.Response:
        """Follow Stora's redirect back to the relay."""
        assert url.startswith(self.callback_url + "?"), url
        return self.browser.get("/oauth/callback", params=query_of(url))

    def connect(self, operator: str = "acme") -> httpx.Response:
        """The whole flow, approved: the relay's answer to the callback."""
        answer = self.callback(self.consent(self.start_connect(), operator))
        assert answer.status_code == 200, answer.text
        return answer


@contextmanager
def relay_stack(directory: Path, *, sandbox_options: dict[str, Any] | None = None,
                services_options: dict[str, Any] | None = None) -> Iterator[Stack]:
    """A sandbox with operator ``acme`` and a relay that uses it as Stora."""
    port = free_port()
    relay_url = f"http://127.0.0.1:{port}"
    app = PartnerApp(CLIENT_ID, CLIENT_SECRET, (relay_url + "/oauth/callback",),
                     name="TestEntry")
    options: dict[str, Any] = {"max_per_second": 50, "max_per_minute": 1000,
                               "webhook_retry_s": (0.05, 0.1, 0.2), "webhook_timeout_s": 2.0,
                               **(sandbox_options or {})}
    with Sandbox(partner_app=app, **options) as sandbox:
        sandbox.create_operator("acme", name="Acme Storage", sites=ACME_SITES)
        on_disk = relay_on_disk(directory, stora_url=sandbox.url, listen_port=port,
                                client_secret=CLIENT_SECRET)
        services = on_disk.services(**(services_options or {}))
        try:
            with RelayServer(services) as server, httpx.Client(
                    base_url=server.url, follow_redirects=False, timeout=10) as browser:
                yield Stack(sandbox, server, services, browser)
        finally:
            services.close()


def new_state() -> str:
    """A state the relay never issued."""
    return secrets.token_urlsafe(32)
