"""What a driver declares about its settings, and the helpers its ``settings`` reads with.

Each driver package declares one :class:`DriverSpec` in its ``settings`` module: the keys
its ``[[controllers]]`` table accepts, their ranges and defaults, a ``parse`` that reads
them into the driver's typed settings (a :class:`ControllerSettings`), and the module
whose ``build`` (and, for a bus that can be scanned, ``probe``) makes controllers.
:mod:`drivers.registry` lists them by name.

Reading goes through a :class:`SettingsReader`: the config loader's table reader
(``gateway.config.reader.Table``) is one, which records each problem against the
file and the dotted key; this package never imports the gateway.

The settings modules are light (no pymodbus, paho nor pyserial): every CLI command reads
the config.  The controller modules are imported by name when a site is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, Self, TypeVar

from drivers.base import Controller, LockPoint, ProbeResult
from drivers.ports import port_problem

if TYPE_CHECKING:
    from drivers.link import SerialBus
    from drivers.mqtt.settings import BrokerSettings

__all__ = [
    "BAUDRATES",
    "MQTT_DEVICE_KEYS",
    "PULSE_STYLES",
    "RETRIES",
    "SERIAL_KEYS",
    "TIMEOUT_MS",
    "BrokerKeys",
    "BuildContext",
    "BuildRefusedError",
    "Builder",
    "ControllerSettings",
    "DriverSpec",
    "MqttDeviceSettings",
    "Probe",
    "ProbeMaker",
    "Range",
    "SerialSettings",
    "SettingsReader",
    "check_foreign",
    "read_broker",
    "read_serial_port",
]

_T = TypeVar("_T")


class SettingsReader(Protocol):
    """One controller's TOML table being read: typed getters that record each problem.

    A getter whose ``default`` is ``None`` treats the key as required; a wrong value is
    recorded against the key (which :meth:`ok` then reports) and a fallback of the right
    type is returned, so reading goes on and every problem of a file is found in one run.
    """

    def has(self, name: str) -> bool:
        """True when ``name`` is present in the table."""
        ...

    def ok(self, *names: str) -> bool:
        """True when none of ``names`` had a problem."""
        ...

    def error(self, name: str, reason: str) -> None:
        """Record a problem with key ``name`` and go on."""
        ...

    def get_str(self, name: str, default: str | None = None, *, nonempty: bool = False) -> str:
        """A string; with ``nonempty``, blank text is refused too."""
        ...

    def get_int(self, name: str, default: int | None = None, lo: int | None = None,
                hi: int | None = None) -> int:
        """An integer within ``lo``..``hi`` when given."""
        ...

    def get_bool(self, name: str, default: bool) -> bool:
        """A TOML boolean."""
        ...

    def get_choice(self, name: str, default: str, choices: Mapping[str, _T]) -> _T:
        """One of the string keys of ``choices``, returned as its value."""
        ...

    def get_topic(self, name: str, default: str | None = None) -> str:
        """An MQTT topic (or prefix) without wildcards or empty levels at the ends."""
        ...

    def get_secret_file(self, name: str) -> Path | None:
        """An optional path to a secret file no one but its owner may access."""
        ...


@dataclass(frozen=True, slots=True)
class Range:
    """The bounds and default of one numbered setting."""

    lo: int
    hi: int
    default: int

    def read(self, r: SettingsReader, name: str) -> int:
        """The value of ``name`` checked against this range."""
        return r.get_int(name, self.default, self.lo, self.hi)


#: Keys every controller on a serial bus takes, and every MQTT-device controller.
SERIAL_KEYS: Final = frozenset({"name", "driver", "port", "baudrate", "address",
                                "timeout_ms", "retries"})
MQTT_DEVICE_KEYS: Final = frozenset({"name", "driver", "host", "port", "username",
                                     "password_file"})
BAUDRATES: Final = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
# Per-request timeout and retries on a serial bus: a Modbus RTU reply at 9600 baud
# takes ~30 ms; 200 ms leaves room for slow boards without stalling the bus.
TIMEOUT_MS: Final = Range(10, 10_000, 200)
RETRIES: Final = Range(0, 10, 2)
PULSE_STYLES: Final = {"flash_coil": "flash_coil", "holding_register": "holding_register"}


@dataclass(frozen=True, kw_only=True, slots=True)
class ControllerSettings:
    """The settings of one controller, as its driver's ``parse`` read them.

    The base of every driver's settings class; its fields are named as the keys of the
    ``[[controllers]]`` table (and as ``gateway.config.ControllerConfig``'s), so the
    gateway records and returns them by name without knowing the driver.
    """

    @classmethod
    def from_fields(cls, value_of: Callable[[str], object]) -> Self:
        """The settings rebuilt from a record of them, read field by field by name."""
        return cls(**{f.name: value_of(f.name) for f in fields(cls)})

    def values(self) -> dict[str, object]:
        """The settings by field name (the keys of the controller's table)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class SerialSettings(ControllerSettings):
    """What every controller on a serial (RS-485) bus has: its bus and its address."""

    port: str
    baudrate: int
    address: int
    timeout_ms: int = TIMEOUT_MS.default
    retries: int = RETRIES.default


@dataclass(frozen=True, kw_only=True, slots=True)
class MqttDeviceSettings(ControllerSettings):
    """What every MQTT-device controller has: the broker and account of its link.

    ``broker_host``/``broker_port`` name another broker than the agent's ``[mqtt]``
    (``None``: the same); ``broker_username``/``broker_password_file`` are the link's own
    account, never the agent's.
    """

    broker_host: str | None = None
    broker_port: int | None = None
    broker_username: str = ""
    broker_password_file: Path | None = None


def read_serial_port(r: SettingsReader) -> tuple[str, int]:
    """``port`` (an allowed device path or URL) and ``baudrate`` of a serial controller."""
    port = r.get_str("port", nonempty=True)
    problem = port_problem(port) if r.ok("port") else None
    if problem is not None:
        r.error("port", problem)
    baudrate = r.get_int("baudrate", 9600)
    if baudrate not in BAUDRATES and r.ok("baudrate"):
        r.error("baudrate", f"{baudrate} is not supported; use one of "
                            f"{', '.join(map(str, BAUDRATES))}")
    return port, baudrate


@dataclass(frozen=True, slots=True)
class BrokerKeys:
    """The ``host``/``port`` and account keys of an MQTT-device controller table."""

    host: str | None
    port: int | None
    username: str
    password_file: Path | None


def read_broker(r: SettingsReader) -> BrokerKeys:
    """The ``host``/``port`` and account keys of an MQTT-device controller."""
    # host/port name another broker than [mqtt], when set.
    host = r.get_str("host", "", nonempty=True) if r.has("host") else None
    port = r.get_int("port", 0, 1, 65535) if r.has("port") else None
    # The link's own account on that broker, never the agent's (contract §3 addition;
    # the config loader refuses sharing it on the [mqtt] broker).
    username = r.get_str("username", "")
    password_file = r.get_secret_file("password_file")
    if password_file is not None and not username and r.ok("username"):
        r.error("password_file", "needs username: MQTT sends a password only with a "
                                 "user name")
    return BrokerKeys(host, port, username, password_file)


#: How the keys some drivers take are read; another driver's table holding one has
#: it reported as "not valid for driver X" and, when its value is wrong, that too,
#: at the same point of the reading as for the drivers that take it.
_FOREIGN: Final[Mapping[str, Callable[[SettingsReader], object]]] = {
    "scbk_file": lambda r: r.get_secret_file("scbk_file"),
    "allow_insecure": lambda r: r.get_bool("allow_insecure", False),
    "pulse": lambda r: r.get_bool("pulse", False),
    "pulse_style": lambda r: r.get_choice("pulse_style", "flash_coil", PULSE_STYLES),
    "pulse_base": lambda r: r.get_int("pulse_base", 0, 0, 0xFFFF) if r.has("pulse_base")
    else None,
    "timeout_ms": lambda r: TIMEOUT_MS.read(r, "timeout_ms"),
    "retries": lambda r: RETRIES.read(r, "retries"),
}


def check_foreign(r: SettingsReader, *names: str) -> None:
    """Check the values of keys this driver does not take, as the drivers that do."""
    for name in names:
        _FOREIGN[name](r)


class BuildRefusedError(Exception):
    """The configuration asks for something the driver cannot do (say why, one line)."""


@dataclass(slots=True)
class BuildContext:
    """What a driver's ``build`` gets besides its settings.

    ``bus``: the serial bus the controller's ``port`` names (shared by the controllers
    on it; ``None`` for MQTT drivers).  ``shared``: objects controllers of one site share,
    by ``(driver, key)`` (a bus's Modbus client, a broker's MQTT client).  ``points``: the
    locks configured on this controller.  ``broker``: for MQTT drivers, where and as whom
    to connect, given a short name of the driver for the client id.
    """

    name: str
    bus: SerialBus | None
    shared: dict[tuple[str, str], object]
    points: Sequence[LockPoint]
    broker: Callable[[str], BrokerSettings]


class Builder(Protocol):
    """A driver module's ``build``: one controller from its settings."""

    def __call__(self, settings: ControllerSettings, ctx: BuildContext, /) -> Controller:
        """The controller ``ctx.name`` as ``settings`` describe it."""
        ...


Probe = Callable[[int], ProbeResult | None]
"""Ask one address on a bus; what answered there, or ``None`` for silence."""


class ProbeMaker(Protocol):
    """A driver module's ``probe``: a one-address scan over ``bus``.

    ``shared`` is a running site's shared objects (``None`` when the port is the
    caller's own); ``timeout_s`` the wait per address (``None``: the driver's).
    """

    def __call__(self, bus: SerialBus, shared: Mapping[tuple[str, str], object] | None,
                 timeout_s: float | None, /) -> Probe:
        """The probe."""
        ...


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """What one driver accepts and how it is built.

    ``settings`` is its settings class.  ``address``/``channels``/``inputs``: the ranges
    of its numbers (``None``: it has none, and the setting is 0; a serial driver has an
    address).  ``lock_refuses``: the ``[[locks]]`` keys a lock on this driver may not
    have, with why; ``locks_by_device``: its locks are named by ``device``, not by
    ``channel``.  ``parse`` reads the table (its keys already checked against ``keys``).
    ``module`` holds ``build`` and, when ``scan`` is set (the default address range of a
    bus scan), ``probe``; it is imported when first needed.
    """

    name: str
    keys: frozenset[str]
    settings: type[ControllerSettings]
    parse: Callable[[SettingsReader], ControllerSettings]
    module: str
    address: Range | None = None
    channels: Range | None = None
    inputs: Range | None = None
    scan: range | None = None
    lock_refuses: Mapping[str, str] = field(default_factory=dict)
    locks_by_device: bool = False

    @property
    def serial(self) -> bool:
        """True for a driver of boards on a serial bus (they have an address)."""
        return self.address is not None

    def builder(self) -> Builder:
        """The driver's ``build``."""
        build: Builder = importlib.import_module(self.module).build
        return build

    def prober(self) -> ProbeMaker:
        """The driver's ``probe`` (only when :attr:`scan` is set)."""
        probe: ProbeMaker = importlib.import_module(self.module).probe
        return probe
