"""The gateway's configuration: one TOML file read into frozen, typed dataclasses.

The file format is contract §3 (with the per-driver keys of its table); this module is
the only place that knows it.  Everything is checked while the objects are built, so the
rest of the gateway can trust a :class:`Config` and never sees a dict of strings.

Every problem, from a missing file to a lock channel beyond its board, is a
:class:`~gateway.errors.ConfigError` naming the file, the dotted key and the reason,
e.g. ``gateway.toml: locks[3].channel: channel 9 is out of range for controller 'bus1'
(0–7)``.  Every problem a file has is found in one pass and raised together as
:class:`ConfigErrors` (itself a ConfigError: the first problem, with the whole list in
``errors``): a bad value in one lock does not stop the checking of the others.  Only what
makes every later check meaningless (a missing or unreadable file, bad UTF-8, TOML
syntax) stops at once, as a single ConfigError.  How the reading keeps going after a
problem is :mod:`gateway.config.reader`'s docstring.

Ids have the shapes Stora gives them (stora-api §1): ``site.id`` starts with ``site_``,
lock units with ``unit_``, ``stora.timeline_source_id`` with ``tsrc_`` and
``stora.timeline_template_id`` (when set) with ``aetpl_``, so a config that would have
every Timeline Event refused is refused here first.

Rules the contract leaves open, decided here:

* Relative paths (``*_file``, ``storage.path``, ``control.socket``) are taken relative
  to the directory of the config file, never the working directory, so the agent and a
  technician's CLI agree on them wherever they are started.
* A file path given as ``""`` means "not set" and becomes ``None``; text values keep
  ``""`` for "not set", as the contract's TOML shows them.
* Secret files are only ``stat``-ed, never read: a :class:`Config` holds no secret, so it
  can be logged or dumped (:meth:`Config.redacted`) without care.
* ``Config.lock_by_id`` accepts a unit id or a reference label; references are compared
  without regard to case (a technician types ``a-101`` for ``A-101``), so two references
  that differ only in case are rejected as duplicates, and so is a reference that equals
  another lock's unit id.
* One serial port is one bus: the controllers on it share the driver and baudrate and
  differ in address.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from drivers.ports import port_problem
from gateway.config.reader import (
    ConfigErrors,
    MissingFileError,
    Problems,
    Table,
    check_stora_id,
    check_topic_segment,
    config_problems,
    guarded,
    os_reason,
    show,
    show_int,
)
from gateway.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "DRIVERS",
    "CommandsConfig",
    "Config",
    "ConfigErrors",
    "ControlConfig",
    "ControllerConfig",
    "LockConfig",
    "MissingFileError",
    "MqttConfig",
    "SiteConfig",
    "StoraConfig",
    "StorageConfig",
    "TelemetryConfig",
    "config_path_from_env",
    "config_problems",
    "known_keys",
    "load_config",
    "parse_config",
    "parse_config_bytes",
]

DEFAULT_CONFIG_PATH: Final = "/etc/stora-gateway/gateway.toml"
CONFIG_ENV_VAR: Final = "STORA_GATEWAY_CONFIG"
_DEFAULT_DB: Final = "/var/lib/stora-gateway/gateway.db"
_DEFAULT_SOCKET: Final = "/run/stora-gateway/control.sock"
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

# A config file is a few kilobytes; refusing anything huge keeps a wrong --config (a log
# file, /dev/zero) from eating the memory of a small box.
_MAX_FILE_BYTES: Final = 1024 * 1024

EnergizeTo = Literal["unlock", "lock"]
StoraAuth = Literal["client_credentials", "static", "broker"]

_T = TypeVar("_T")


# --------------------------------------------------------------------------- dataclasses


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
    #: When the wall clock may judge command freshness (gateway/clock.py): "ntp" (the
    #: kernel says it is synchronized) or "system" (a box with an RTC or another time
    #: discipline); both refuse a clock earlier than the trusted-time floor
    #: (gateway/clock.py).
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
    the driver has none).
    """

    name: str
    driver: str
    port: str | None
    baudrate: int
    address: int
    channels: int
    inputs: int
    pulse: bool
    pulse_style: str
    pulse_base: int | None
    timeout_ms: int
    retries: int
    base_topic: str | None
    broker_host: str | None
    broker_port: int | None
    topic: str | None
    scbk_file: Path | None
    allow_insecure: bool
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


# --------------------------------------------------------------------------- entry points


def config_path_from_env(explicit: str | None) -> str:
    """The config file to use: ``explicit`` (``--config``), else ``$STORA_GATEWAY_CONFIG``,
    else :data:`DEFAULT_CONFIG_PATH`.  Empty strings count as not given.
    """
    if explicit:
        return explicit
    return os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML file at ``path``.

    Raises :class:`ConfigError`, and nothing else, for every problem: missing or
    unreadable file, bad UTF-8, TOML syntax (with line and column), and every rule of
    :func:`parse_config`.
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as fp:
            raw = fp.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "config file does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(file, "", "is a directory, not a config file") from exc
    except PermissionError as exc:
        raise ConfigError(file, "", "permission denied reading the config file") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(file, "", f"cannot read the config file: {os_reason(exc)}") from exc
    return parse_config_bytes(raw, file, Path(file).absolute().parent)


def parse_config_bytes(raw: bytes, file: str, base_dir: Path) -> Config:
    """Decode, parse and validate the bytes of a config file, as :func:`load_config` does.

    ``file`` names it in errors and becomes ``Config.path``; relative paths resolve
    against ``base_dir``.  A signed ``config.set`` validates the new text with this,
    against the directory the real file is named in, before anything is written.
    """
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(file, "", "file is larger than 1 MiB; not a gateway config")
    try:
        # utf-8-sig: tolerate the byte-order mark some Windows editors add.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            file, "", f"not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", _toml_reason(exc)) from exc
    except RecursionError as exc:
        raise ConfigError(file, "", "TOML syntax error: arrays nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise ConfigError(file, "", f"TOML syntax error: {exc}") from exc
    return parse_config(data, file, base_dir)


def _toml_reason(exc: tomllib.TOMLDecodeError) -> str:
    """``"TOML syntax error at line 3, column 7: invalid value"`` from a TOMLDecodeError.

    Python < 3.14 has no ``lineno``/``colno`` attributes; the position is the
    parenthesised tail of the message ("Invalid value (at line 3, column 7)").
    """
    message = str(exc)
    lineno = getattr(exc, "lineno", None)
    colno = getattr(exc, "colno", None)
    match = re.fullmatch(r"(?s)(.*?)\s*\((at line \d+, column \d+|at end of document)\)", message)
    if match:
        what, where = match.group(1), match.group(2)
    else:
        what, where = message, ""
    if isinstance(lineno, int) and isinstance(colno, int):
        where = f"at line {lineno}, column {colno}"
    what = what[:1].lower() + what[1:]
    return f"TOML syntax error {where}: {what}" if where else f"TOML syntax error: {what}"


def parse_config(data: Mapping[str, Any], file: str, base_dir: Path) -> Config:
    """Validate already-parsed TOML ``data`` and build a :class:`Config`.

    ``file`` is used in error messages and as ``Config.path``; relative paths in the data
    resolve against ``base_dir``.  Raises :class:`ConfigError` only: a
    :class:`ConfigErrors` listing every problem found, or a single ConfigError when the
    top of the document is not a table.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(file, "", f"expected a TOML table at the top, found {show(data)}")
    problems = Problems()
    root = Table(data, file, "", base_dir.absolute(), problems)
    root.check_keys(_SECTIONS, section=True)
    site = _section(root.table("site", required=True), _parse_site, _no_site)
    mqtt_table = root.table("mqtt")
    mqtt = _section(mqtt_table, lambda t: _parse_mqtt(t, site),
                    lambda: _parse_mqtt(_scratch(root, "mqtt"), site))
    commands = _section(root.table("commands", required=True), _parse_commands, _no_commands)
    stora = _section(root.table("stora", required=True), _parse_stora, _no_stora)
    storage = _section(root.table("storage"), _parse_storage,
                       lambda: StorageConfig(path=Path(_DEFAULT_DB)))
    control = _section(root.table("control"), _parse_control,
                       lambda: ControlConfig(socket=Path(_DEFAULT_SOCKET)))
    telemetry = _section(root.table("telemetry"), _parse_telemetry, TelemetryConfig)
    parsed = _parse_controllers(root.tables("controllers"))
    # With [[controllers]] itself wrong, a lock naming one cannot be judged.
    parsed.unnamed |= not root.ok("controllers")
    # Judging accounts needs the [mqtt] broker and user as they are meant to be.
    if mqtt_table is not None and mqtt_table.ok("host", "port", "username"):
        _check_mqtt_accounts(mqtt, parsed)
    locks = _parse_locks(root.tables("locks"), parsed)
    problems.raise_any()
    return Config(
        path=Path(file),
        site=site,
        mqtt=mqtt,
        commands=commands,
        stora=stora,
        storage=storage,
        control=control,
        controllers=tuple(c for _, c in parsed.built),
        locks=locks,
        telemetry=telemetry,
    )


_SECTIONS: Final = ("site", "mqtt", "commands", "stora", "storage", "control", "telemetry",
                    "controllers", "locks")


def _section(table: Table | None, parse: Callable[[Table], _T],
             fallback: Callable[[], _T]) -> _T:
    """One section parsed, or ``fallback()`` when it is missing, not a table, or stopped
    by a problem that made the rest of it meaningless (recorded)."""
    if table is None:
        return fallback()
    return guarded(table.problems, lambda: parse(table), fallback)


def _nothing() -> None:
    """The fallback of an item that could not be built: it is left out."""


def _scratch(root: Table, name: str) -> Table:
    """An empty table whose problems go nowhere: parsed, it gives a section's defaults."""
    return Table({}, root.file, name, root.base_dir, Problems())


def known_keys() -> dict[str, frozenset[str]]:
    """Every key the loader accepts, by section.

    ``site``, ``mqtt``, ``commands``, ``stora``, ``storage``, ``control``, ``telemetry``,
    ``locks``, and ``controllers.<driver>`` for each driver (``commands.trusted_keys``
    holds key ids of the operator's choosing, so it has no fixed keys).  The shipped
    example config and the docs are checked against this, so a new key without an
    example fails a test.
    """
    keys: dict[str, frozenset[str]] = {
        "site": _SITE_KEYS,
        "mqtt": _MQTT_KEYS,
        "commands": _COMMANDS_KEYS,
        "stora": _STORA_KEYS,
        "storage": frozenset({"path"}),
        "control": frozenset({"socket"}),
        "telemetry": _TELEMETRY_KEYS,
        "locks": _LOCK_KEYS,
    }
    for driver, spec in _DRIVERS.items():
        keys[f"controllers.{driver}"] = spec.keys
    return keys


# --------------------------------------------------------------------------- sections


_SITE_KEYS: Final = frozenset({"id", "app_name"})


def _parse_site(t: Table) -> SiteConfig:
    t.check_keys(_SITE_KEYS)
    site_id = t.get_str("id")
    if t.ok("id") and check_stora_id(t, "id", site_id, "site_", "site id"):
        check_topic_segment(t, "id", site_id)
    return SiteConfig(id=site_id, app_name=t.get_str("app_name", nonempty=True))


def _no_site() -> SiteConfig:
    return SiteConfig(id="", app_name="")


_MQTT_KEYS: Final = frozenset({
    "host", "port", "topic_prefix", "client_id", "username", "password_file", "tls",
    "ca_file", "cert_file", "key_file", "keepalive_s", "max_packet_bytes",
})


def _parse_mqtt(t: Table, site: SiteConfig) -> MqttConfig:
    t.check_keys(_MQTT_KEYS)
    host = t.get_str("host", "127.0.0.1", nonempty=True)
    port = t.get_int("port", 1883, 1, 65535)
    if t.ok("host") and "\0" in host:
        t.error("host", f"must not contain a NUL character, found {show(host)}")
    max_packet_bytes = t.get_int("max_packet_bytes", MQTT_MAX_PACKET_BYTES,
                                 *MQTT_MAX_PACKET_RANGE)
    topic_prefix = t.get_topic("topic_prefix", "stora-gw")
    client_id = t.get_str("client_id", "").strip() or f"stora-gw-{site.id}"
    username = t.get_str("username", "")
    password_file = t.get_secret_file("password_file")
    tls = t.get_bool("tls", False)
    ca_file = t.get_file("ca_file")
    cert_file = t.get_file("cert_file")
    key_file = t.get_secret_file("key_file")
    keepalive_s = t.get_int("keepalive_s", 30, 5, 3600)
    if tls and host.startswith("/") and t.ok("tls", "host"):
        # TLS checks the broker's name, which a socket path is not; the socket's
        # directory permissions are what keeps others out (deploy/README.md).
        t.error("tls", "must be false when mqtt.host is a unix socket path")
    if tls and ca_file is None and t.ok("tls", "ca_file"):
        t.error("ca_file", "required when mqtt.tls = true (the CA that signed the broker)")
    if (cert_file is None) != (key_file is None) and t.ok("cert_file", "key_file"):
        missing = "key_file" if key_file is None else "cert_file"
        t.error(missing, "cert_file and key_file go together for a client certificate")
    return MqttConfig(
        host=host, port=port, topic_prefix=topic_prefix, client_id=client_id,
        username=username, password_file=password_file, tls=tls, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file, keepalive_s=keepalive_s,
        max_packet_bytes=max_packet_bytes,
    )


_COMMANDS_KEYS: Final = frozenset({"trusted_keys", "clock_skew_s", "max_lifetime_s", "clock"})


def _parse_commands(t: Table) -> CommandsConfig:
    t.check_keys(_COMMANDS_KEYS)
    keys_table = t.table("trusted_keys", required=True)
    trusted = _parse_trusted_keys(t, keys_table) if keys_table is not None else {}
    return CommandsConfig(
        trusted_keys=MappingProxyType(trusted),
        clock_skew_s=t.get_int("clock_skew_s", 30, 0, 600),
        max_lifetime_s=t.get_int("max_lifetime_s", 300, 1, 86400),
        clock=t.get_choice("clock", "ntp", {"ntp": "ntp", "system": "system"}),
    )


def _parse_trusted_keys(t: Table, keys_table: Table) -> dict[str, bytes]:
    """Each key id and its raw public key; a bad key does not stop the others."""
    if not keys_table.data:
        t.error("trusted_keys", "must hold at least one key: kid = \"<Ed25519 public key>\"")
    trusted: dict[str, bytes] = {}
    for raw_kid in keys_table.data:
        kid = str(raw_kid)
        if not kid.strip():
            keys_table.error(kid, "a key id (kid) must not be empty")
            continue
        text = keys_table.get_str(kid)
        if keys_table.ok(kid):
            with keys_table.checking(kid):
                trusted[kid] = _parse_public_key(keys_table, kid, text)
    return trusted


def _no_commands() -> CommandsConfig:
    return CommandsConfig(trusted_keys=MappingProxyType({}), clock_skew_s=30,
                          max_lifetime_s=300)


_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def _parse_storage(t: Table) -> StorageConfig:
    t.check_keys({"path"})
    return StorageConfig(path=t.get_path("path", _DEFAULT_DB))


def _parse_control(t: Table) -> ControlConfig:
    t.check_keys({"socket"})
    return ControlConfig(socket=t.get_path("socket", _DEFAULT_SOCKET))


_TELEMETRY_KEYS: Final = frozenset({"interval_s", "prometheus_textfile"})


def _parse_telemetry(t: Table) -> TelemetryConfig:
    t.check_keys(_TELEMETRY_KEYS)
    interval = t.get_int("interval_s", TELEMETRY_INTERVAL_S, *TELEMETRY_INTERVAL_RANGE)
    textfile = t.get_opt_path("prometheus_textfile")
    # node_exporter's textfile collector reads only *.prom (Path(".prom").suffix is ""):
    # any other name would be written faithfully and never scraped, unnoticed.
    if textfile is not None and textfile.suffix != ".prom":
        t.error("prometheus_textfile",
                "must name a *.prom file (node_exporter's textfile collector reads no "
                f"other), found {show(t.data['prometheus_textfile'])}")
    return TelemetryConfig(interval_s=interval, prometheus_textfile=textfile)


def _parse_public_key(t: Table, kid: str, text: str) -> bytes:
    """Raw 32 Ed25519 public-key bytes from PEM or from base64url of the raw bytes."""
    wanted = (
        "expected an Ed25519 public key as PEM (-----BEGIN PUBLIC KEY-----) or as "
        "base64url of the raw 32 bytes"
    )
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        # Imported only for PEM: cryptography is a noticeable share of a Pi's cold start,
        # and every CLI command loads the config.
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(stripped.encode("utf-8"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            t.fail(kid, f"not a valid PEM public key ({os_reason(exc)}); {wanted}")
        if not isinstance(key, Ed25519PublicKey):
            t.fail(kid, f"the PEM key is not Ed25519 ({type(key).__name__}); {wanted}")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if not _B64URL.fullmatch(stripped):
        t.fail(kid, f"{wanted}, found {show(text)}")
    unpadded = stripped.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        t.fail(kid, f"not valid base64url; {wanted}")
    if len(raw) != 32:
        t.fail(kid, f"decodes to {len(raw)} bytes, not 32; {wanted}")
    # Any 32 bytes load as an Ed25519 public key (cryptography checks only the length);
    # the verifier builds the key objects when the agent starts.
    return raw


_STORA_KEYS: Final = frozenset({
    "base_url", "auth", "token_url", "client_id", "client_secret_file", "token_file",
    "scope", "timeline_source_id", "timeline_template_id", "max_per_second",
    "max_per_minute",
})
_AUTH_MODES: Final[Mapping[str, StoraAuth]] = {
    "client_credentials": "client_credentials", "static": "static", "broker": "broker",
}
_DEFAULT_BASE_URL: Final = "https://public-api.stora.co/2025-09"
_DEFAULT_TOKEN_URL: Final = "https://public-api.stora.co/oauth2/token"  # noqa: S105 - a URL
#: The scope ``POST /timeline/events`` needs (stora-api §3.2): a client credential
#: asking without it gets a token every event post is refused with (403).
EVENT_SCOPE: Final = "public.timeline_event:write"
#: stora-api §2.6: scopes are named ``public.<resource>:read|write``.
_SCOPE_RE: Final = re.compile(r"public\.[a-z_]+:(read|write)")


def _parse_stora(t: Table) -> StoraConfig:
    t.check_keys(_STORA_KEYS)
    base_url = t.get_url("base_url", _DEFAULT_BASE_URL)
    auth = t.get_choice("auth", "client_credentials", _AUTH_MODES)
    token_url = t.get_url("token_url", _DEFAULT_TOKEN_URL)
    client_id = t.get_str("client_id", "")
    client_secret_file = t.get_secret_file("client_secret_file")
    token_file = t.get_secret_file("token_file")
    scope = t.get_str("scope", EVENT_SCOPE)
    if t.ok("scope"):
        _check_scope(t, scope, auth)
    timeline_source_id = t.get_str("timeline_source_id", nonempty=True)
    if t.ok("timeline_source_id"):
        check_stora_id(t, "timeline_source_id", timeline_source_id, "tsrc_",
                       "timeline source id")
    timeline_template_id = t.get_str("timeline_template_id", "")
    if timeline_template_id and t.ok("timeline_template_id"):
        check_stora_id(t, "timeline_template_id", timeline_template_id, "aetpl_",
                       "timeline template id")
    # Stora's documented limits are per second and per minute; no sane limit is higher.
    max_per_second = t.get_int("max_per_second", 10, 1, 10_000)
    max_per_minute = t.get_int("max_per_minute", 60, 1, 600_000)
    if not t.ok("auth"):
        pass  # which credential keys are needed depends on the mode
    elif auth == "client_credentials":
        if not client_id.strip() and t.ok("client_id"):
            t.error("client_id", 'required when stora.auth = "client_credentials"')
        if client_secret_file is None and t.ok("client_secret_file"):
            t.error("client_secret_file", 'required when stora.auth = "client_credentials"')
    elif token_file is None and t.ok("token_file"):
        t.error("token_file", f'required when stora.auth = "{auth}"')
    if max_per_minute < max_per_second and t.ok("max_per_second", "max_per_minute"):
        t.error(
            "max_per_minute",
            f"must be at least max_per_second ({max_per_second}), found {max_per_minute}",
        )
    return StoraConfig(
        base_url=base_url, auth=auth, token_url=token_url, client_id=client_id,
        client_secret_file=client_secret_file, token_file=token_file, scope=scope,
        timeline_source_id=timeline_source_id, timeline_template_id=timeline_template_id,
        max_per_second=max_per_second, max_per_minute=max_per_minute,
    )


def _check_scope(t: Table, scope: str, auth: StoraAuth) -> None:
    """The scopes a client credential asks for: Stora's shape, and the one events need.

    Only ``client_credentials`` sends ``scope``; a static or broker token carries the
    scopes it was made with, which the gateway cannot see.
    """
    if auth != "client_credentials":
        return
    names = scope.split()
    wrong = [name for name in names if not _SCOPE_RE.fullmatch(name)]
    if wrong:
        t.error("scope", f"{show(wrong[0])} is not a Stora scope (public.<resource>:read "
                         "or :write, separated by spaces)")
    elif EVENT_SCOPE not in names:
        t.error("scope", f"must include {EVENT_SCOPE}: without it Stora refuses every "
                         f"Timeline Event (403), found {show(scope)}")


def _no_stora() -> StoraConfig:
    return StoraConfig(
        base_url=_DEFAULT_BASE_URL, auth="client_credentials", token_url=_DEFAULT_TOKEN_URL,
        client_id="", client_secret_file=None, token_file=None, scope=EVENT_SCOPE,
        timeline_source_id="", timeline_template_id="", max_per_second=10,
        max_per_minute=60,
    )


# --------------------------------------------------------------------------- controllers


@dataclass(frozen=True, slots=True)
class _Range:
    lo: int
    hi: int
    default: int


@dataclass(frozen=True, slots=True)
class _DriverSpec:
    """What one driver accepts: its keys and the ranges of its numbers."""

    keys: frozenset[str]
    address: _Range | None = None  # None: not a serial driver
    channels: _Range | None = None  # None: no numbered outputs (zigbee2mqtt)
    inputs: _Range | None = None  # None: no numbered inputs


_SERIAL_KEYS: Final = frozenset({"name", "driver", "port", "baudrate", "address", "timeout_ms",
                                 "retries"})
_MQTT_DEVICE_KEYS: Final = frozenset({"name", "driver", "host", "port", "username",
                                      "password_file"})

# The ranges come from the protocols: Modbus slave ids 1-247 (Modbus over serial line
# spec §2.2), OSDP PD addresses 0-126 (OSDP v2.2 §5.4; 127 is broadcast), a lock board's
# 5-bit DIP switch 0-31 with up to 48 locks, Tasmota's POWER1-8 and Switch1-8.
_DRIVERS: Final[Mapping[str, _DriverSpec]] = {
    "modbus": _DriverSpec(
        keys=_SERIAL_KEYS | {"pulse", "pulse_style", "pulse_base", "channels", "inputs"},
        address=_Range(1, 247, 1), channels=_Range(1, 256, 8), inputs=_Range(0, 256, 8),
    ),
    "lockboard": _DriverSpec(
        keys=_SERIAL_KEYS | {"channels"},
        address=_Range(0, 31, 0), channels=_Range(1, 48, 16),
    ),
    "osdp": _DriverSpec(
        keys=_SERIAL_KEYS | {"channels", "inputs", "scbk_file", "allow_insecure"},
        address=_Range(0, 126, 0), channels=_Range(1, 256, 4), inputs=_Range(0, 256, 4),
    ),
    "zigbee2mqtt": _DriverSpec(keys=_MQTT_DEVICE_KEYS | {"base_topic"}),
    "tasmota": _DriverSpec(
        keys=_MQTT_DEVICE_KEYS | {"topic", "channels", "inputs"},
        channels=_Range(1, 8, 1), inputs=_Range(0, 8, 0),
    ),
}
DRIVERS: Final = tuple(sorted(_DRIVERS))
_ALL_CONTROLLER_KEYS: Final = frozenset[str]().union(*(s.keys for s in _DRIVERS.values()))
_PULSE_STYLES: Final = {"flash_coil": "flash_coil", "holding_register": "holding_register"}
_BAUDRATES: Final = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
# Per-request timeout and retries on a serial bus: a Modbus RTU reply at 9600 baud
# takes ~30 ms; 200 ms leaves room for slow boards without stalling the bus.
_TIMEOUT_MS: Final = _Range(10, 10_000, 200)
_RETRIES: Final = _Range(0, 10, 2)
#: Keys of a controller that locks depend on: with a problem in one of them, the checks
#: of its locks' channels and inputs would only repeat it.
_KEYS_LOCKS_USE: Final = ("name", "driver", "channels", "inputs")


def _get_range(t: Table, name: str, rng: _Range | None) -> int:
    return 0 if rng is None else t.get_int(name, rng.default, rng.lo, rng.hi)


def _parse_controller(t: Table) -> ControllerConfig | None:
    """One controller, or ``None`` when its driver is unknown (nothing else to check)."""
    name = t.get_str("name", nonempty=True)
    driver = t.get_str("driver")
    spec = _DRIVERS.get(driver)
    if spec is None:
        if t.ok("driver"):
            close = difflib.get_close_matches(driver, DRIVERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            t.error("driver", f"unknown driver {driver!r}{hint}; known drivers: "
                              f"{', '.join(DRIVERS)}")
        return None
    t.check_keys(spec.keys, driver=driver, other_drivers_keys=_ALL_CONTROLLER_KEYS)
    serial = spec.address is not None
    port: str | None = None
    baudrate = 0
    broker_host: str | None = None
    broker_port: int | None = None
    broker_username = ""
    broker_password_file: Path | None = None
    if serial:
        port = t.get_str("port", nonempty=True)
        problem = port_problem(port) if t.ok("port") else None
        if problem is not None:
            t.error("port", problem)
        baudrate = t.get_int("baudrate", 9600)
        if baudrate not in _BAUDRATES and t.ok("baudrate"):
            t.error("baudrate", f"{baudrate} is not supported; use one of "
                                f"{', '.join(map(str, _BAUDRATES))}")
    else:
        # For MQTT drivers, host/port name another broker than [mqtt], when set.
        broker_host = t.get_str("host", "", nonempty=True) if t.has("host") else None
        broker_port = t.get_int("port", 0, 1, 65535) if t.has("port") else None
        # The link's own account on that broker, never the agent's (contract §3
        # addition; _check_mqtt_accounts refuses sharing it on the [mqtt] broker).
        broker_username = t.get_str("username", "")
        broker_password_file = t.get_secret_file("password_file")
        if broker_password_file is not None and not broker_username and t.ok("username"):
            t.error("password_file", "needs username: MQTT sends a password only with a "
                                     "user name")
    scbk_file = t.get_secret_file("scbk_file")
    allow_insecure = t.get_bool("allow_insecure", False)
    if (driver == "osdp" and scbk_file is None and not allow_insecure
            and t.ok("scbk_file", "allow_insecure")):
        # The driver refuses such a PD when the agent starts (hardware.md, "Secure
        # Channel keys"); said here, it cannot pass check-config and fail on site.
        t.error("scbk_file", "required for an osdp controller: the PD's Secure Channel key "
                             "(32 hex digits; hardware.md, \"Secure Channel keys\"), or "
                             "allow_insecure = true to drive it in the clear")
    return ControllerConfig(
        name=name,
        driver=driver,
        port=port,
        baudrate=baudrate,
        address=_get_range(t, "address", spec.address),
        channels=_get_range(t, "channels", spec.channels),
        inputs=_get_range(t, "inputs", spec.inputs),
        pulse=t.get_bool("pulse", False),
        # How a Modbus board is asked for a timed pulse (hardware.md, "Board-timed
        # unlock"): Waveshare's "flash on" coil write, or a holding-register write.
        pulse_style=t.get_choice("pulse_style", "flash_coil", _PULSE_STYLES),
        pulse_base=t.get_int("pulse_base", 0, 0, 0xFFFF) if t.has("pulse_base") else None,
        timeout_ms=_get_range(t, "timeout_ms", _TIMEOUT_MS),
        retries=_get_range(t, "retries", _RETRIES),
        base_topic=t.get_topic("base_topic", "zigbee2mqtt") if driver == "zigbee2mqtt" else None,
        broker_host=broker_host,
        broker_port=broker_port,
        topic=t.get_topic("topic") if driver == "tasmota" else None,
        scbk_file=scbk_file,
        allow_insecure=allow_insecure,
        broker_username=broker_username,
        broker_password_file=broker_password_file,
    )


@dataclass(slots=True)
class _Controllers:
    """The controllers as far as they could be read, for the checks of the locks.

    ``built``: each controller that could be built, with its table.  ``names``: every
    controller name read without a problem (first index).  ``usable``: the controllers
    whose keys that locks depend on are sound.  ``unnamed``: some controller's name
    could not be read, so a lock naming an unknown controller may mean that one.
    """

    built: list[tuple[Table, ControllerConfig]] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)
    usable: dict[str, ControllerConfig] = field(default_factory=dict)
    unnamed: bool = False


def _parse_controllers(tables: list[Table]) -> _Controllers:
    found = _Controllers()
    buses: dict[str, ControllerConfig] = {}  # port -> first controller on it
    addresses: dict[tuple[str, int], ControllerConfig] = {}
    for t in tables:
        c = guarded(t.problems, partial(_parse_controller, t), _nothing)
        if not t.ok("name"):
            found.unnamed = True
        if c is None:
            if t.ok("name"):
                found.names.setdefault(t.data["name"], t.index or 0)
            continue
        if t.ok("name"):
            if c.name in found.names:
                t.error("name", f"duplicate controller name {c.name!r} "
                                f"(also controllers[{found.names[c.name]}])")
            else:
                found.names[c.name] = t.index or 0
        if c.port is not None and t.ok("port", "driver", "baudrate"):
            first = buses.setdefault(c.port, c)
            if first.driver != c.driver:
                t.error("driver", f"port {c.port} is already a {first.driver} bus (controller "
                                  f"{first.name!r}); one bus speaks one protocol")
            elif first.baudrate != c.baudrate:
                t.error("baudrate", f"baudrate {c.baudrate} differs from {first.baudrate} of "
                                    f"controller {first.name!r} on the same port {c.port}; "
                                    "one bus runs at one speed")
            elif t.ok("address"):
                other = addresses.setdefault((c.port, c.address), c)
                if other is not c:
                    t.error("address", f"address {c.address} is already used by controller "
                                       f"{other.name!r} on the same port {c.port}")
        found.built.append((t, c))
        if t.ok(*_KEYS_LOCKS_USE):
            found.usable.setdefault(c.name, c)
    return found


def _check_mqtt_accounts(mqtt: MqttConfig, found: _Controllers) -> None:
    """Refuse an MQTT-driver link that would log in to the ``[mqtt]`` broker as the agent.

    The shipped brokers bind each client id to its account (``use_username_as_clientid``,
    deploy/README.md): an account has one connection, so a zigbee2mqtt or Tasmota link
    sharing the agent's account would disconnect the agent, and the agent it, forever.
    A broker without accounts (``mqtt.username`` empty: tests, the demo) is not concerned.
    """
    if not mqtt.username:
        return
    for t, c in found.built:
        if c.serial or not t.ok("host", "port", "username"):
            continue
        own = c.broker_host is not None or c.broker_port is not None
        host = c.broker_host or mqtt.host
        port = c.broker_port or (1883 if own else mqtt.port)  # as gateway/units/hardware.py
        if host != mqtt.host or (port != mqtt.port and not mqtt.unix_socket):
            continue  # another broker: its accounts are not the agent's
        if not c.broker_username:
            t.error("username", f"required for a {c.driver} controller on the [mqtt] "
                                "broker: give its link an account of its own, not "
                                f"mqtt.username {mqtt.username!r} (hardware.md)")
        elif c.broker_username == mqtt.username:
            t.error("username", f"must differ from mqtt.username {mqtt.username!r}: the "
                                "broker gives one account one connection, so this link "
                                "would disconnect the agent (hardware.md)")


# --------------------------------------------------------------------------- locks


_LOCK_KEYS: Final = frozenset({
    "unit", "reference", "controller", "channel", "door_input", "status_input", "device",
    "energize_to", "unlock_seconds",
})
_ENERGIZE: Final[Mapping[str, EnergizeTo]] = {"unlock": "unlock", "lock": "lock"}


def _not_for_driver(t: Table, name: str, driver: str, why: str) -> None:
    if t.has(name):
        t.error(name, f"key not valid for driver {driver}: {why}")


def _get_index(t: Table, name: str, what: str, c: ControllerConfig | None,
               count: int) -> int | None:
    """An optional 0-based output/input number that must exist on controller ``c``.

    ``None`` when absent or wrong; without a usable controller only its type is checked.
    """
    value = t.get_opt_int(name)
    if value is None or c is None or not t.ok(name):
        return value
    if not 0 <= value < count:
        span = f"0–{count - 1}" if count else f"it has no {what}s"
        t.error(name, f"{what} {show_int(value)} is out of range for controller "
                      f"{c.name!r} ({span})")
        return None
    return value


def _parse_lock(t: Table, found: _Controllers) -> LockConfig:
    t.check_keys(_LOCK_KEYS)
    unit = t.get_str("unit")
    if t.ok("unit") and check_stora_id(t, "unit", unit, "unit_", "unit id"):
        check_topic_segment(t, "unit", unit)
    reference = t.get_str("reference", nonempty=True)
    name = t.get_str("controller")
    c = found.usable.get(name) if t.ok("controller") else None
    if t.ok("controller") and name not in found.names and not found.unnamed:
        known = ", ".join(repr(n) for n in found.names) or "none are defined"
        t.error("controller", f"no controller named {name!r} (known: {known})")
    device: str | None = None
    channel: int | None = None
    if c is None:
        # The controller is unknown or has problems of its own (reported there): what
        # depends on it cannot be judged, and the checks across locks skip this one.
        t.bad.add("controller")
        channel = t.get_opt_int("channel")
    elif c.driver == "zigbee2mqtt":
        driver = c.driver
        _not_for_driver(t, "channel", driver, "a zigbee2mqtt lock is named by its device")
        _not_for_driver(t, "door_input", driver, "the Zigbee lock reports its door itself")
        _not_for_driver(t, "status_input", driver, "status_input is for modbus boards")
        if not t.has("device"):
            t.error("device", f"required for a lock on zigbee2mqtt controller {c.name!r}: "
                              "the device's friendly name")
        else:
            device = t.get_topic("device")
    else:
        driver = c.driver
        _not_for_driver(t, "device", driver, "device is for zigbee2mqtt locks; use channel")
        if driver == "lockboard":
            _not_for_driver(t, "door_input", driver,
                            "the lock board reports each lock's door state itself")
        if driver != "modbus":
            _not_for_driver(t, "status_input", driver,
                            "status_input (lock feedback) is read on modbus boards only")
        if not t.has("channel"):
            t.error("channel", "required key is missing: the output number on controller "
                               f"{c.name!r}")
        else:
            channel = _get_index(t, "channel", "channel", c, c.channels)
    inputs = c.inputs if c is not None else 0
    return LockConfig(
        unit=unit,
        reference=reference,
        controller=name,
        channel=channel,
        door_input=_get_index(t, "door_input", "input", c, inputs),
        status_input=_get_index(t, "status_input", "input", c, inputs),
        device=device,
        energize_to=t.get_choice("energize_to", "unlock", _ENERGIZE),
        unlock_seconds=t.get_int("unlock_seconds", 8, 1, 3600),
    )


def _parse_locks(tables: list[Table], found: _Controllers) -> tuple[LockConfig, ...]:
    locks: list[tuple[Table, LockConfig]] = []
    units: dict[str, int] = {}
    references: dict[str, int] = {}
    outputs: dict[tuple[str, int | str], int] = {}  # (controller, channel or device)
    inputs: dict[tuple[str, int], tuple[int, str]] = {}  # (controller, input) -> (lock, key)
    for t in tables:
        index = t.index or 0
        lock = guarded(t.problems, partial(_parse_lock, t, found), _nothing)
        if lock is None:
            continue
        locks.append((t, lock))
        if t.ok("unit"):
            if lock.unit in units:
                t.error("unit", f"duplicate unit id {lock.unit!r} (also "
                                f"locks[{units[lock.unit]}])")
            else:
                units[lock.unit] = index
        folded = lock.reference.casefold()
        if t.ok("reference"):
            if folded in references:
                t.error("reference", f"duplicate reference {lock.reference!r} "
                                     f"(also locks[{references[folded]}])")
            else:
                references[folded] = index
        if not t.ok("controller"):
            continue  # outputs and inputs belong to a controller that is not sound
        _check_wiring(t, lock, outputs, inputs)
    # A reference that is another lock's unit id would make `unlock UNIT` ambiguous.
    for t, lock in locks:
        owner = units.get(lock.reference)
        if owner is not None and owner != t.index and t.ok("reference"):
            t.error("reference", f"{lock.reference!r} is also the unit id of "
                                 f"locks[{owner}]; a reference must differ from every unit "
                                 "id")
    return tuple(lock for _, lock in locks)


def _check_wiring(t: Table, lock: LockConfig, outputs: dict[tuple[str, int | str], int],
                  inputs: dict[tuple[str, int], tuple[int, str]]) -> None:
    """No two locks on one output of a controller, nor on one of its inputs."""
    index = t.index or 0
    where: tuple[str, int | str] | None = None
    if lock.device is not None and t.ok("device"):
        where, key, label = (lock.controller, lock.device), "device", f"device {lock.device!r}"
    elif lock.channel is not None and t.ok("channel"):
        where, key, label = (lock.controller, lock.channel), "channel", f"channel {lock.channel}"
    if where is not None:
        if where in outputs:
            t.error(key, f"{label} of controller {lock.controller!r} is already used by "
                         f"locks[{outputs[where]}]")
        else:
            outputs[where] = index
    for input_key in ("door_input", "status_input"):
        number = getattr(lock, input_key)
        if number is None or not t.ok(input_key):
            continue
        if (lock.controller, number) in inputs:
            other, other_key = inputs[(lock.controller, number)]
            t.error(input_key, f"input {number} of controller {lock.controller!r} is "
                               f"already used as locks[{other}].{other_key}")
        else:
            inputs[(lock.controller, number)] = (index, input_key)
