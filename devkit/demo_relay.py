"""The demo's relay: the partner's cloud service between the sandbox (Stora) and the
simulated site.

:func:`start_relay` starts it on the demo's broker with the sandbox as Stora, connects
the demo operator through the consent page (driven over HTTP, as a browser would: the
relay's ``/connect``, the sandbox's Approve, the relay's callback), registers the site
(its gateway credential and the relay's signing key go into the agent's config, which
then posts its Timeline Events through the relay's broker) and makes a staff API key
for the app's unlocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import func, select

from devkit.demo_site import APP, REFERENCES, SITE
from devkit.mosquitto import free_port
from devkit.relay_site import AppServer, write_relay_config
from devkit.sandbox import PartnerApp, Sandbox
from relay.config import load_config
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.migrate import upgrade
from relay.db.models import UnitState
from relay.server import build
from relay.services import Services
from sitelink.jws import public_key_text

__all__ = ["OPERATOR", "DemoRelay", "partner_app", "start_relay"]

#: The demo operator's id in the sandbox.
OPERATOR: Final = "demo-operator"
CLIENT_ID: Final = "demo-relay"
CLIENT_SECRET: Final = "demo-relay-secret-not-a-secret"  # noqa: S105 (a demo's, on 127.0.0.1)
#: How long the relay's first reconciliation may take to learn the site's units.
SYNC_TIMEOUT_S: Final = 10.0


def partner_app(relay_port: int) -> PartnerApp:
    """The relay as the sandbox's registered partner app."""
    return PartnerApp(CLIENT_ID, CLIENT_SECRET,
                      (f"http://127.0.0.1:{relay_port}/oauth/callback",), name=APP)


def add_operator(sandbox: Sandbox) -> None:
    """The demo operator, with the demo site and its units, all rented."""
    sandbox.create_operator(OPERATOR, name="Demo Self Storage", sites=[{
        "id": SITE, "name": "Demo Site",
        "units": [{"id": unit, "reference_id": ref, "status": "occupied"}
                  for unit, ref in REFERENCES.items()]}])


@dataclass
class DemoRelay:
    """The running relay and what the demo needs of it."""

    services: Services
    server: AppServer
    operator_id: str
    api_key: str
    credential: str
    kid: str
    public_key: str

    @property
    def url(self) -> str:
        """The relay's base URL."""
        return self.server.url

    def call(self, cmd: str, unit: str, **body: Any) -> dict[str, Any]:
        """An app's unlock or lock through the relay's API: the command record."""
        answer = httpx.post(f"{self.url}/v1/sites/{SITE}/units/{unit}/{cmd}", json=body,
                            headers={"Authorization": f"Bearer {self.api_key}"},
                            params={"wait": 8}, timeout=15)
        record: dict[str, Any] = answer.json()
        if answer.status_code not in (200, 202):
            raise RuntimeError(f"the relay answered {answer.status_code}: {answer.text}")
        return record

    def stop(self) -> None:
        """Stop serving (and the link and jobs with it)."""
        self.server.stop()
        self.services.close()


def _connect(relay_url: str, sandbox: Sandbox) -> None:
    with httpx.Client(base_url=relay_url, timeout=10) as browser:
        to_stora = browser.get("/connect")
        query = {k: v[0] for k, v in parse_qs(urlsplit(to_stora.headers["location"]).query
                                             ).items()}
        consent = httpx.post(f"{sandbox.url}/oauth2/authorize", timeout=10,
                             data={**query, "operator": OPERATOR, "decision": "approve"})
        back = urlsplit(consent.headers["location"])
        page = browser.get(back.path, params={k: v[0] for k, v in parse_qs(back.query).items()})
        if page.status_code != 200:
            raise RuntimeError(f"connecting the demo operator failed: {page.status_code}")


def _wait_for_units(services: Services) -> None:
    """Until the reconciliation after connect has recorded every unit of the site."""
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while time.monotonic() < deadline:
        with services.db.read() as s:
            known = s.scalar(select(func.count()).select_from(UnitState)) or 0
        if known >= len(REFERENCES):
            return
        time.sleep(0.05)
    raise RuntimeError("the relay did not learn the site's units from Stora")


def start_relay(directory: Path, sandbox: Sandbox, mqtt_port: int, relay_port: int,
                ) -> DemoRelay:
    """Start the relay, connect the operator, register the site; see the module doc."""
    config = load_config(write_relay_config(
        directory, stora_url=sandbox.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
        listen_port=relay_port, mqtt_port=mqtt_port, app_name=APP,
        timeline_source_id="tsrc_demo"))
    keyring = Keyring.from_file(config.secrets.data_key_file)
    db = Database(config.database.url)
    upgrade(db)
    services = Services.build(config, keyring, db=db)
    server = AppServer(build(services).app, relay_port).start()
    try:
        _connect(server.url, sandbox)
        operator_id = services.operators.list()[0].id
        _, credential = services.sites.add(SITE, operator_id)
        kid, key = services.signing_keys.current()
        _, api_key = services.api_keys.create(operator_id, f"{APP} app", "staff")
        _wait_for_units(services)
    except BaseException:
        server.stop()
        services.close()
        raise
    return DemoRelay(services, server, operator_id, api_key, credential, kid,
                     public_key_text(key))


def relay_port() -> int:
    """A free port for the relay (the sandbox must know its callback URL first)."""
    return free_port()
