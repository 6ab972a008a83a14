"""A relay on disk for tests: its config, secret files and data key, and its parts."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from relay.app import create_app
from relay.config import RelayConfig, load_config
from relay.crypto import Keyring, generate_key_text
from relay.db.engine import Database
from relay.db.migrate import upgrade
from relay.services import Services

CLIENT_ID = "relay-test-client"


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def write_relay_config(directory: Path, *, public_url: str = "http://127.0.0.1:8080",
                       stora_url: str = "http://127.0.0.1:9",
                       client_secret: str = "relay-test-secret",
                       database: str | None = None, listen_port: int = 8080,
                       extra: str = "") -> Path:
    """A valid relay.toml in ``directory`` (secret files beside it, mode 600)."""
    directory.mkdir(parents=True, exist_ok=True)
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    _secret(secrets_dir / "client-secret", client_secret)
    _secret(secrets_dir / "data-key", generate_key_text())
    db_url = database or f"sqlite:///{directory / 'relay.db'}"
    path = directory / "relay.toml"
    path.write_text(f"""\
[relay]
public_url = "{public_url}"
listen = "127.0.0.1:{listen_port}"
app_name = "TestEntry"

[database]
url = "{db_url}"

[stora]
base_url = "{stora_url}/2025-09"
authorize_url = "{stora_url}/oauth2/authorize"
token_url = "{stora_url}/oauth2/token"
client_id = "{CLIENT_ID}"
client_secret_file = "secrets/client-secret"
timeline_source_id = "tsrc_test"

[mqtt]
host = "127.0.0.1"
port = 1883

[secrets]
data_key_file = "secrets/data-key"
{extra}""")
    return path


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


def relay_on_disk(directory: Path, **kwargs: str) -> RelayOnDisk:
    """Write a config, open and migrate its database."""
    config = load_config(write_relay_config(directory, **kwargs))
    keyring = Keyring.from_file(config.secrets.data_key_file)
    db = Database(config.database.url)
    upgrade(db)
    return RelayOnDisk(config, keyring, db)


def random_site() -> str:
    """A Stora-looking site id."""
    return "site_" + secrets.token_hex(6)



class RelayServer:
    """The relay's app served by uvicorn on a free port, in a thread of this process."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(
            create_app(services), host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="relay-server",
                                        daemon=True)

    def __enter__(self) -> RelayServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the relay's server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
