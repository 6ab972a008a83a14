"""A relay on disk for tests: its config, secret files and data key, and its parts."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from devkit.relay_site import AppServer
from devkit.relay_site import write_relay_config as devkit_relay_config
from relay.api import Dispatch
from relay.app import create_app
from relay.config import RelayConfig, load_config
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.migrate import upgrade
from relay.db.models import Base, Command
from relay.services import Services

CLIENT_ID = "relay-test-client"
#: Makes the database of a relay written without ``database=`` (``None``: a SQLite file
#: beside its config).  tests/relay/conftest.py sets it per test for the PostgreSQL run.
_new_database: Callable[[], str] | None = None


@contextmanager
def databases_from(factory: Callable[[], str]) -> Iterator[None]:
    """Within the block, each relay written without ``database=`` gets ``factory()``."""
    global _new_database  # noqa: PLW0603 (one test at a time sets it, for its duration)
    before, _new_database = _new_database, factory
    try:
        yield
    finally:
        _new_database = before


def new_database_url(directory: Path) -> str:
    """A database for a relay in ``directory``: the current factory's, else a SQLite file
    there."""
    return _new_database() if _new_database is not None else f"sqlite:///{directory / 'relay.db'}"


def write_relay_config(directory: Path, *, stora_url: str = "http://127.0.0.1:9",
                       client_secret: str = "relay-test-secret", **options: Any) -> Path:
    """A valid relay.toml in ``directory`` (devkit.relay_site.write_relay_config); its
    database is :func:`new_database_url`'s unless ``database`` is given."""
    if options.get("database") is None:
        options["database"] = new_database_url(directory)
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


def stored_bytes(db: Database) -> bytes:
    """Everything the database holds: SQLite's files (the WAL too) byte for byte; on
    PostgreSQL every row of every table, as text."""
    if db.path is not None:
        return b"".join(p.read_bytes() for p in db.path.parent.glob(db.path.name + "*"))
    with db.read() as s:
        rows = [repr(tuple(row)) for table in Base.metadata.sorted_tables
                for row in s.execute(table.select())]
    return "\n".join(rows).encode()


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """A sample of the relay's ``GET /metrics`` (parsed as Prometheus parses it); 0 when
    the series does not exist yet."""
    answer = http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


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
    configured port (or ``port``: another replica), in a thread of this process."""

    def __init__(self, services: Services, dispatch: Dispatch | None = None, *,
                 port: int | None = None) -> None:
        self.services = services
        self.dispatch = dispatch or PollingDispatch(services.db)
        super().__init__(create_app(services, self.dispatch),
                         port or services.config.relay.listen_port)

    def __enter__(self) -> RelayServer:
        self.start()
        return self
