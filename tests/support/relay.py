"""A relay on disk for tests: its config, secret files and data key, and its parts."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devkit.relay_site import AppServer
from devkit.relay_site import write_relay_config as devkit_relay_config
from relay.api import Dispatch
from relay.app import create_app
from relay.config import RelayConfig, load_config
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.migrate import upgrade
from relay.db.models import Command
from relay.services import Services

CLIENT_ID = "relay-test-client"


def write_relay_config(directory: Path, *, stora_url: str = "http://127.0.0.1:9",
                       client_secret: str = "relay-test-secret", **options: Any) -> Path:
    """A valid relay.toml in ``directory`` (devkit.relay_site.write_relay_config)."""
    return devkit_relay_config(directory, stora_url=stora_url, client_id=CLIENT_ID,
                               client_secret=client_secret, **options)


@dataclass
class RelayOnDisk:
    """A relay's config, keyring and migrated database."""

    config: RelayConfig
    keyring: Keyring
    db: Database

    def services(self, *, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> Services:
        """The relay's parts over this database."""
        return Services.build(self.config, self.keyring, db=self.db, transport=transport,
                              clock=clock)


def relay_on_disk(directory: Path, **kwargs: Any) -> RelayOnDisk:
    """Write a config, open and migrate its database."""
    config = load_config(write_relay_config(directory, **kwargs))
    keyring = Keyring.from_file(config.secrets.data_key_file)
    db = Database(config.database.url)
    upgrade(db)
    return RelayOnDisk(config, keyring, db)


def random_site() -> str:
    """A Stora-looking site id."""
    return "site_" + secrets.token_hex(6)



class PollingDispatch:
    """A stand-in for the MQTT link: publishes nothing, waits by reading the database
    (a test's fake gateway answers commands by writing their results)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1

    async def wait_for_result(self, jti: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.session() as s:
                row = s.get(Command, jti)
                if row is None or row.status != "pending":
                    return None if row is None else row.status
            await asyncio.sleep(0.02)
        return None


class RelayServer(AppServer):
    """The relay's app (with ``dispatch``, by default :class:`PollingDispatch`) on its
    configured port, in a thread of this process."""

    def __init__(self, services: Services, dispatch: Dispatch | None = None) -> None:
        self.services = services
        self.dispatch = dispatch or PollingDispatch(services.db)
        super().__init__(create_app(services, self.dispatch),
                         services.config.relay.listen_port)

    def __enter__(self) -> RelayServer:
        self.start()
        return self
