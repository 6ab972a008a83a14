"""The relay's connect flow, tokens, rate limiter and Timeline broker in front of the
sandbox (Stora for partners), over real HTTP, for tests/relay/test_relay_tokens.py and
test_relay_broker.py.

:func:`broker_stack` starts a sandbox with the relay registered as its partner app and the
operators asked for, then the relay's operator pages and broker routes on uvicorn in a
thread (its own small app, so these tests do not depend on what else ``create_app``
mounts).  :meth:`BrokerStack.connect` runs the connect flow as a browser would: the
relay's ``/connect``, the sandbox's authorize (auto-approved for that operator), the
relay's callback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from devkit.mosquitto import free_port
from devkit.relay_site import AppServer
from devkit.sandbox import PartnerApp, Sandbox
from relay.broker import BROKER_PATH, TimelineBroker, broker_routes
from relay.db.engine import Database
from relay.ratelimit import RateLimiter
from relay.services import Services
from relay.tokens import Tokens
from relay.web import pages
from tests.support.relay import CLIENT_ID, relay_on_disk

CLIENT_SECRET = "relay-test-secret"
SOURCE_ID = "tsrc_test"


def sites_spec(prefix: str, count: int) -> list[dict[str, Any]]:
    """``count`` sites ``site_<prefix>1…`` with one unit each."""
    return [{"id": f"site_{prefix}{i}", "name": f"{prefix.title()} {i}",
             "units": [{"id": f"unit_{prefix}{i}", "reference_id": f"U-{i}",
                        "status": "occupied"}]} for i in range(1, count + 1)]


def event_body(site: str, external_id: str) -> dict[str, Any]:
    """A Timeline Event as the gateway builds it (contract §6)."""
    return {"source": {"id": SOURCE_ID}, "site": {"id": site},
            "external": {"id": external_id},
            "description": f"Unit unlocked via TestEntry — {external_id}"}


@dataclass
class BrokerStack:
    """A running sandbox and relay (pages + broker), and the relay's parts."""

    sandbox: Sandbox
    services: Services
    limiter: RateLimiter
    tokens: Tokens
    broker: TimelineBroker
    url: str

    def connect(self, operator: str) -> str:
        """The whole connect flow for the sandbox's ``operator``, approved; the relay's id
        for it.  The requests the flow sent before the relay knew the operator are
        charged to its rate limit, as the connector will (see the report of issue 14)."""
        before = self.sandbox.operator_state(operator)["requests"]
        self.sandbox.set_consent(operator, auto="approve")
        with httpx.Client(base_url=self.url, follow_redirects=True, timeout=10) as browser:
            page = browser.get("/connect")
        assert page.status_code == 200, page.text
        assert str(page.url).startswith(self.url + "/oauth/callback"), page.url
        sites = {s["id"] for s in self.sandbox.operator_state(operator)["sites"]}
        found = [o.id for o in self.services.operators.list() if sites & set(o.sites)]
        assert len(found) == 1, found
        sent = self.sandbox.operator_state(operator)["requests"] - before
        self.limiter.record(found[0], "connect", sent)
        return found[0]

    def add_site(self, site: str, operator_id: str) -> str:
        """Register a gateway site; its credential."""
        return self.services.sites.add(site, operator_id)[1]

    def post(self, http: httpx.Client, credential: str, site: str, external_id: str, *,
             key: str | None = None, body: Mapping[str, Any] | None = None,
             url: str | None = None) -> httpx.Response:
        """One gateway's POST to the broker (``key`` defaults to ``<external id>.0``), of
        this relay or the one at ``url`` (a replica)."""
        headers = {"Authorization": f"Bearer {credential}",
                   "Content-Type": "application/json",
                   "Idempotency-Key": key or f"{external_id}.0"}
        content = json.dumps(body or event_body(site, external_id)).encode()
        return http.post((url or self.url) + BROKER_PATH, content=content, headers=headers)

    @contextmanager
    def replica(self) -> Iterator[str]:
        """Another replica of the broker: the same config and keys, its own engine,
        limiter and tokens on the same database, on a port of its own; its URL."""
        config = self.services.config
        services = Services.build(config, self.services.keyring,
                                  db=Database(config.database.url))
        # The same windows as this relay's limiter (``windows`` overrides the maxima).
        limiter = RateLimiter(services.db, max_per_second=1, max_per_minute=1,
                              windows=self.limiter.windows)
        tokens = Tokens(services.db, services.keyring, services.stora, limiter)
        app = FastAPI()
        app.include_router(broker_routes(TimelineBroker(services.sites, tokens, limiter,
                                                        services.stora)))
        port = free_port()
        try:
            with AppServer(app, port) as server:
                yield server.url
        finally:
            services.close()


@contextmanager
def broker_stack(directory: Path, operators: Mapping[str, Sequence[Mapping[str, Any]]], *,
                 max_per_second: int = 50, max_per_minute: int = 3000,
                 access_token_ttl_s: float | None = None,
                 database: str | None = None) -> Iterator[BrokerStack]:
    """A sandbox with ``operators`` (id -> site specs) and a relay that uses it as Stora
    (on ``database``, default SQLite in ``directory``); both enforce ``max_per_second`` /
    ``max_per_minute`` per operator."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = PartnerApp(CLIENT_ID, CLIENT_SECRET, (url + "/oauth/callback",), name="TestEntry")
    options: dict[str, Any] = {"partner_app": app, "max_per_second": max_per_second,
                               "max_per_minute": max_per_minute,
                               "webhook_retry_s": (0.05,), "webhook_timeout_s": 1.0}
    if access_token_ttl_s is not None:
        options["access_token_ttl_s"] = access_token_ttl_s
    with Sandbox(**options) as sandbox:
        for ident, sites in operators.items():
            sandbox.create_operator(ident, sites=sites)
        on_disk = relay_on_disk(directory, stora_url=sandbox.url, public_url=url,
                                listen_port=port, client_secret=CLIENT_SECRET,
                                database=database)
        services = on_disk.services()
        limiter = RateLimiter(services.db, max_per_second=max_per_second,
                              max_per_minute=max_per_minute)
        tokens = Tokens(services.db, services.keyring, services.stora, limiter)
        broker = TimelineBroker(services.sites, tokens, limiter, services.stora)
        relay = FastAPI()
        relay.include_router(pages(services))
        relay.include_router(broker_routes(broker))
        try:
            with AppServer(relay, port):
                yield BrokerStack(sandbox, services, limiter, tokens, broker, url)
        finally:
            services.close()
