"""Where and how an MQTT connection reaches its broker: :class:`BrokerSettings`, and the
password file it may read the secret from."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerSettings", "is_socket_path", "read_secret_file"]


def is_socket_path(host: str) -> bool:
    """True when a broker ``host`` is the path of a unix socket (it starts with ``/``)."""
    return host.startswith("/")


def read_secret_file(path: Path | None) -> str | None:
    """A password kept in the file ``path`` (``None``: none), without one trailing newline.

    Raises OSError or UnicodeDecodeError; the text never appears in either.
    """
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    # One newline is what `echo secret > file` adds; more is taken as meant.
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how to connect.  ``password`` is the secret itself, never logged.

    A ``host`` that starts with ``/`` is the path of the broker's unix socket (``port``
    is then unused).  ``client_id`` must differ from every other client of that broker
    (the agent's own link included), or the broker disconnects one of the two; on a
    broker that binds client ids to accounts, so must ``username`` (one account, one
    connection).  ``tls`` is a ready client context (chain and hostname checked,
    :func:`drivers.mqtt.tls.client_tls_context`) or ``None`` for plain TCP.

    Timings: ``connect_timeout_s`` bounds TCP connect, TLS handshake, CONNACK and the
    first SUBACK together; ``backoff_initial_s`` / ``backoff_max_s`` are the reconnect
    delays (:mod:`drivers.mqtt.backoff`: a LAN broker restarts in seconds; the cap keeps
    a dead one tried every 30 s); a connection that stayed up ``stable_after_s`` resets
    the backoff.
    """

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 10.0

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return (f"BrokerSettings(host={self.host!r}, port={self.port}, "
                f"client_id={self.client_id!r}, username={self.username!r}, "
                f"tls={self.tls is not None})")

    @property
    def unix_socket(self) -> bool:
        """True when ``host`` is a unix socket path."""
        return is_socket_path(self.host)

    @property
    def where(self) -> str:
        """``host:port`` (or the socket path), for messages."""
        return self.host if self.unix_socket else f"{self.host}:{self.port}"
