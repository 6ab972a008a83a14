"""The gateway's configuration as frozen, typed dataclasses, and their defaults.

Built and checked by :mod:`gateway.config.load` (see docs/design/configuration.md); the
rest of the gateway can trust a :class:`Config` and never sees a dict of strings.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Final, Literal

from drivers.settings import RETRIES, TIMEOUT_MS

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_DB",
    "DEFAULT_SOCKET",
    "MQTT_MAX_PACKET_BYTES",
    "MQTT_MAX_PACKET_RANGE",
    "TELEMETRY_INTERVAL_RANGE",
    "TELEMETRY_INTERVAL_S",
    "CommandsConfig",
    "Config",
    "ControlConfig",
    "ControllerConfig",
    "EnergizeTo",
    "LockConfig",
    "MqttConfig",
    "SiteConfig",
    "StoraAuth",
    "StoraConfig",
    "StorageConfig",
    "TelemetryConfig",
]

DEFAULT_CONFIG_PATH: Final = "/etc/stora-gateway/gateway.toml"
CONFIG_ENV_VAR: Final = "STORA_GATEWAY_CONFIG"
DEFAULT_DB: Final = "/var/lib/stora-gateway/gateway.db"
DEFAULT_SOCKET: Final = "/run/stora-gateway/control.sock"
#: ``[telemetry] interval_s``: default and bounds.  Under 5 s the status would cost the
#: broker and the SD card more than it tells; over an hour a dead gateway looks alive.
TELEMETRY_INTERVAL_S: Final = 30
TELEMETRY_INTERVAL_RANGE: Final = (5, 3600)

#: ``[mqtt] max_packet_bytes``: default and bounds.  The default is the shipped site
#: broker's ``max_packet_size 65536`` (deploy/mosquitto/site-broker.conf).  At least a
#: 4 KiB command (contract §5) with its topic and properties; at most 16 MiB, because
#: nothing the agent exchanges comes near it and a Pi has the memory of a few such packets.
MQTT_MAX_PACKET_BYTES: Final = 65536
MQTT_MAX_PACKET_RANGE: Final = (8192, 16 * 1024 * 1024)

EnergizeTo = Literal["unlock", "lock"]
StoraAuth = Literal["client_credentials", "static", "broker"]


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """``[site]``: the Stora site this gateway serves."""

    id: str
    app_name: str


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """``[mqtt]``: the broker link to the relay. File paths are absolute or ``None``.

    A ``host`` that starts with ``/`` is the path of the broker's unix socket (as libpq
    reads its host), and ``port`` is then unused: only local users the socket's directory
    admits can reach it, and nobody can pose as the broker while it restarts.
    ``max_packet_bytes`` is the largest MQTT packet either way: sent to the broker as MQTT
    5 "Maximum Packet Size", enforced on what arrives and on what :class:`MqttLink
    <gateway.link.MqttLink>` publishes.
    """

    host: str
    port: int
    topic_prefix: str
    client_id: str
    username: str
    password_file: Path | None
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    keepalive_s: int
    max_packet_bytes: int = MQTT_MAX_PACKET_BYTES

    @property
    def unix_socket(self) -> bool:
        """True when ``host`` is the path of a unix socket rather than a host name."""
        return self.host.startswith("/")

    @property
    def where(self) -> str:
        """The broker's address for messages: the socket path, or ``host:port``."""
        return self.host if self.unix_socket else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    """``[commands]``: who may sign commands and how much clock slack is allowed.

    ``trusted_keys`` maps a JWS ``kid`` to the raw 32-byte Ed25519 public key.
    """

    # A read-only view, so a frozen Config really cannot change; it is left out of the
    # hash because a mapping proxy is not hashable.
    trusted_keys: Mapping[str, bytes] = field(hash=False)
    clock_skew_s: int
    max_lifetime_s: int
    #: When the wall clock may judge command freshness (gateway/clock/): "ntp" (the
    #: kernel says it is synchronized) or "system" (a box with an RTC or another time
    #: discipline); both refuse a clock earlier than the trusted-time floor
    #: (gateway/clock/).
    clock: str = "ntp"


@dataclass(frozen=True, slots=True)
class StoraConfig:
    """``[stora]``: the Stora API (or the relay's broker endpoint) and its credentials."""

    base_url: str
    auth: StoraAuth
    token_url: str
    client_id: str
    client_secret_file: Path | None
    token_file: Path | None
    scope: str
    timeline_source_id: str
    timeline_template_id: str
    max_per_second: int
    max_per_minute: int


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where the SQLite database (outbox, state, audit) lives."""

    path: Path


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """``[control]``: the local control socket the CLI talks to the agent through."""

    socket: Path


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """``[telemetry]``: the periodic health report (gateway/ops/telemetry.py).

    ``interval_s`` is how often the retained ``P/S/status`` is refreshed;
    ``prometheus_textfile``, when set, is a ``*.prom`` file rewritten atomically at the
    same interval for node_exporter's textfile collector (``None``: off).
    """

    interval_s: int = TELEMETRY_INTERVAL_S
    prometheus_textfile: Path | None = None


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """One ``[[controllers]]`` entry.

    Fields that a driver does not use are ``None``, ``0`` or ``False``: ``port``,
    ``baudrate`` and ``address`` are for the serial drivers (``port`` is a device path or
    ``socket://``/``rfc2217://`` URL allowed by :func:`drivers.ports.port_problem`,
    ``None`` for the MQTT drivers, whose ``baudrate`` and ``address`` are ``0``);
    ``base_topic`` is for zigbee2mqtt, ``topic`` for tasmota, and ``broker_host`` /
    ``broker_port`` for either when its devices sit on another broker than ``[mqtt]``.
    ``channels`` / ``inputs`` are the number of outputs / inputs the board has (0 where
    the driver has none).  The fields are the driver's settings
    (:class:`drivers.settings.ControllerSettings`) by name.
    """

    name: str
    driver: str
    # The defaults are what a controller whose driver does not take the key records.
    port: str | None = None
    baudrate: int = 0
    address: int = 0
    channels: int = 0
    inputs: int = 0
    pulse: bool = False
    pulse_style: str = "flash_coil"
    pulse_base: int | None = None
    timeout_ms: int = TIMEOUT_MS.default
    retries: int = RETRIES.default
    base_topic: str | None = None
    broker_host: str | None = None
    broker_port: int | None = None
    topic: str | None = None
    scbk_file: Path | None = None
    allow_insecure: bool = False
    #: The MQTT drivers' own broker account (keys ``username``, ``password_file``): never
    #: the agent's, because a broker that binds client ids to accounts gives each
    #: account one connection (deploy/README.md, "Broker accounts").
    broker_username: str = ""
    broker_password_file: Path | None = None

    @property
    def serial(self) -> bool:
        """True for a controller on a serial (RS-485) bus."""
        return self.port is not None


@dataclass(frozen=True, slots=True)
class LockConfig:
    """One ``[[locks]]`` entry: a Stora unit and where its lock is wired.

    ``channel`` is ``None`` only for zigbee2mqtt locks, which have a ``device`` instead.
    """

    unit: str
    reference: str
    controller: str
    channel: int | None
    door_input: int | None
    status_input: int | None
    device: str | None
    energize_to: EnergizeTo
    unlock_seconds: int


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of one gateway."""

    path: Path
    site: SiteConfig
    mqtt: MqttConfig
    commands: CommandsConfig
    stora: StoraConfig
    storage: StorageConfig
    control: ControlConfig
    controllers: tuple[ControllerConfig, ...]
    locks: tuple[LockConfig, ...]
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def lock_by_id(self, text: str) -> LockConfig | None:
        """The lock whose unit id is ``text``, else whose reference is ``text`` (any case).

        This is how the CLI's ``UNIT`` argument is resolved (contract §2).
        """
        wanted = text.strip()
        for lock in self.locks:
            if lock.unit == wanted:
                return lock
        folded = wanted.casefold()
        for lock in self.locks:
            if lock.reference.casefold() == folded:
                return lock
        return None

    def controller(self, name: str) -> ControllerConfig | None:
        """The controller called ``name``, or ``None``."""
        for controller in self.controllers:
            if controller.name == name:
                return controller
        return None

    def redacted(self) -> dict[str, Any]:
        """The whole configuration as a JSON-able dict, safe to print or publish.

        There is nothing to blank out: secrets never sit in the file, only the paths of
        the files holding them, and this module never reads those files.  Public keys are
        shown as base64url so an operator can compare them with the relay's.
        """
        dumped = _jsonable(self)
        assert isinstance(dumped, dict)
        return dumped


def _jsonable(value: object) -> Any:
    """Convert a config value into plain JSON types (dict, list, str, int, bool, None)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
