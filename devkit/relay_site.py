"""A relay on this machine, for the demo, the tests and the benchmarks: its config and
secret files in a directory, and an ASGI app served by uvicorn in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from devkit.mosquitto import free_port
from relay.crypto import generate_key_text

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["AppServer", "write_relay_config"]


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def write_relay_config(directory: Path, *, stora_url: str, client_id: str,
                       client_secret: str, public_url: str | None = None,
                       database: str | None = None, listen_port: int | None = None,
                       mqtt_port: int = 1883, app_name: str = "TestEntry",
                       timeline_source_id: str = "tsrc_test", extra: str = "") -> Path:
    """A valid relay.toml in ``directory``, its secret files beside it (mode 600), the
    database a SQLite file there unless ``database`` names one."""
    directory.mkdir(parents=True, exist_ok=True)
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    _secret(secrets_dir / "client-secret", client_secret)
    _secret(secrets_dir / "data-key", generate_key_text())
    listen_port = listen_port or free_port()
    public_url = public_url or f"http://127.0.0.1:{listen_port}"
    db_url = database or f"sqlite:///{directory / 'relay.db'}"
    path = directory / "relay.toml"
    path.write_text(f"""\
[relay]
public_url = "{public_url}"
listen = "127.0.0.1:{listen_port}"
app_name = "{app_name}"

[database]
url = "{db_url}"

[stora]
base_url = "{stora_url}/2025-09"
authorize_url = "{stora_url}/oauth2/authorize"
token_url = "{stora_url}/oauth2/token"
client_id = "{client_id}"
client_secret_file = "secrets/client-secret"
timeline_source_id = "{timeline_source_id}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}

[secrets]
data_key_file = "secrets/data-key"
{extra}""")
    return path


class AppServer:
    """An ASGI app served by uvicorn on ``port`` of 127.0.0.1, in a thread of this process
    (the app's lifespan, e.g. the relay's MQTT link, runs with it)."""

    def __init__(self, app: FastAPI, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="relay-server",
                                        daemon=True)

    def start(self, timeout: float = 10.0) -> AppServer:
        """Serve; returns once it listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the relay's server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (the lifespan's work is cancelled) and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
