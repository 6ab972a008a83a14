"""The site's hardware, built from configuration: buses, controllers and lock points.

This is the one place where driver names from the config meet driver classes.  Adding a
driver means writing it under ``drivers/`` (with its simulator) and registering one
builder in ``BUILDERS`` below; nothing else in ``gateway/`` changes.

Controllers that name the same serial ``port`` share one ``SerialBus``: one transaction
at a time on the wire, whatever mix of boards hangs off it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from drivers.base import Controller, LockPoint, ProbeResult
from drivers.link import LinkTiming, SerialBus, SerialFactory, open_serial
from gateway.config import Config, ControllerConfig, LockConfig
from gateway.errors import GatewayError

LOGGER = logging.getLogger(__name__)


class HardwareUnavailableError(GatewayError):
    """The configuration names a driver this build cannot drive."""


@dataclass
class Site:
    """Everything the gateway can drive at one site, built from its config."""

    config: Config
    controllers: dict[str, Controller] = field(default_factory=dict)
    buses: dict[str, SerialBus] = field(default_factory=dict)
    shared: dict[tuple[str, str], Any] = field(default_factory=dict)

    def controller_for(self, lock: LockConfig) -> Controller:
        """The controller that drives ``lock``."""
        return self.controllers[lock.controller]

    def close(self) -> None:
        """Release every port."""
        for controller in self.controllers.values():
            controller.close()
        for bus in self.buses.values():
            bus.close()


def point_of(lock: LockConfig) -> LockPoint:
    """The driver's view of one configured lock."""
    return LockPoint(
        channel=lock.channel if lock.channel is not None else 0,
        door_input=lock.door_input,
        energize_to=lock.energize_to,
        status_input=lock.status_input,
        device=lock.device,
    )


Builder = Callable[[ControllerConfig, "Site", SerialBus | None], Controller]


def _build_modbus(cfg: ControllerConfig, site: Site, bus: SerialBus | None) -> Controller:
    from drivers.modbus import ModbusBus, ModbusController
    from drivers.modbus.frames import PulseStyle

    assert bus is not None
    key = ("modbus", bus.url)
    if key not in site.shared:
        site.shared[key] = ModbusBus(bus)
    return ModbusController(
        cfg.name,
        site.shared[key],
        cfg.address,
        channels=cfg.channels,
        inputs=cfg.inputs,
        pulse=cfg.pulse,
        pulse_style=PulseStyle(cfg.pulse_style),
        pulse_base=cfg.pulse_base,
    )


def _build_lockboard(cfg: ControllerConfig, site: Site, bus: SerialBus | None) -> Controller:
    from drivers.lockboard import LockboardController

    assert bus is not None
    del site
    return LockboardController(cfg.name, bus, cfg.address, channels=cfg.channels)


def _mqtt_driver_broker(cfg: ControllerConfig, site: Site, kind: str) -> dict[str, Any]:
    """Where and how an MQTT driver's link connects, as ``BrokerSettings`` arguments.

    Without ``host``/``port`` it is the ``[mqtt]`` broker, by the same transport (TCP,
    TLS or the unix socket) but with the controller's own account: the shipped brokers
    bind a client id to its account, so sharing the agent's would disconnect the agent
    (config.py refuses it).  A broker of its own gets the controller's account too and
    never ``[mqtt]``'s TLS, so nothing of the cloud link travels to another host
    (hardware.md, "zigbee2mqtt" and "tasmota").  The client id carries the pid, so a CLI
    that opens the hardware itself does not kick the agent's link on a broker that does
    not bind ids; one that does replaces it with the account name.
    """
    import os

    from gateway.link import _tls_context, read_secret_file

    mqtt = site.config.mqtt
    own = cfg.broker_host is not None or cfg.broker_port is not None
    host = cfg.broker_host or mqtt.host
    port = cfg.broker_port or (1883 if own else mqtt.port)
    password = read_secret_file(cfg.broker_password_file)
    return {
        "host": host,
        "port": port,
        "client_id": f"{mqtt.client_id}-{kind}-{os.getpid()}",
        "username": cfg.broker_username or None,
        "password": password,
        "tls": _tls_context(mqtt) if mqtt.tls and not own else None,
        "keepalive_s": mqtt.keepalive_s,
    }


def _build_zigbee2mqtt(cfg: ControllerConfig, site: Site, bus: SerialBus | None) -> Controller:
    """A Zigbee2MQTT bridge: its own MQTT connection and account, shared per broker."""
    from drivers.zigbee2mqtt import BridgeLink, BrokerSettings, Zigbee2MqttController

    del bus
    settings = BrokerSettings(**_mqtt_driver_broker(cfg, site, "z2m"))
    key = ("zigbee2mqtt", f"{settings.where}:{settings.username or ''}")
    if key not in site.shared:
        site.shared[key] = BridgeLink(settings)
    devices = [lock.device for lock in site.config.locks
               if lock.controller == cfg.name and lock.device is not None]
    return Zigbee2MqttController(cfg.name, site.shared[key], cfg.base_topic or "zigbee2mqtt",
                                 devices)


def _build_tasmota(cfg: ControllerConfig, site: Site, bus: SerialBus | None) -> Controller:
    """A Tasmota device: one MQTT connection (and account) per broker, shared by its devices.

    The device relocks a strike by itself (``PulseTime``), not a maglock:
    ``self_relocking`` says whether any lock on it is a strike.
    """
    from drivers.tasmota import BrokerSettings, TasmotaClient, TasmotaController

    del bus
    settings = BrokerSettings(**_mqtt_driver_broker(cfg, site, "tasmota"))
    where = settings.host if settings.host.startswith("/") else \
        f"{settings.host}:{settings.port}"
    key = ("tasmota", f"{where}:{settings.username or ''}")
    if key not in site.shared:
        site.shared[key] = TasmotaClient(settings)
    locks = [lock for lock in site.config.locks if lock.controller == cfg.name]
    return TasmotaController(cfg.name, site.shared[key], cfg.topic or "", cfg.channels,
                             cfg.inputs, self_relocking=not locks or any(
                                 lock.energize_to == "unlock" for lock in locks))


def _build_osdp(cfg: ControllerConfig, site: Site, bus: SerialBus | None) -> Controller:
    """An OSDP peripheral: libosdp's control panel on its own port (one PD per port).

    The key file is read here (the config only checks its permissions); a bad one gives
    a controller that refuses to drive the PD and says why in its health.
    """
    from drivers.osdp import OsdpController, ScbkError, load_scbk

    del bus  # libosdp owns the wire: the OSDP channel opens the port itself
    assert cfg.port is not None
    if ("osdp", cfg.port) in site.shared:
        raise HardwareUnavailableError(
            f"controller {cfg.name!r}: port {cfg.port} already has an OSDP peripheral; "
            "this version drives one PD per port")
    site.shared[("osdp", cfg.port)] = cfg.name
    scbk, error = None, None
    if cfg.scbk_file is not None and not cfg.allow_insecure:
        try:
            scbk = load_scbk(cfg.scbk_file)
        except ScbkError as exc:
            error = str(exc)
    return OsdpController(cfg.name, cfg.port, cfg.baudrate, cfg.address,
                          channels=cfg.channels, inputs=cfg.inputs, scbk=scbk,
                          scbk_error=error, allow_insecure=cfg.allow_insecure)


#: driver name -> builder.  Serial drivers get their shared bus; MQTT drivers get None.
BUILDERS: dict[str, Builder] = {
    "osdp": _build_osdp,
    "modbus": _build_modbus,
    "lockboard": _build_lockboard,
    "zigbee2mqtt": _build_zigbee2mqtt,
    "tasmota": _build_tasmota,
}

SERIAL_DRIVERS = frozenset({"modbus", "lockboard", "osdp"})


def _timing(cfg: ControllerConfig) -> LinkTiming:
    return LinkTiming.for_baudrate(cfg.baudrate, cfg.timeout_ms / 1000.0, cfg.retries)


def build_site(
    config: Config,
    *,
    factory: SerialFactory = open_serial,
    only: Sequence[str] | None = None,
) -> Site:
    """Build buses and controllers for ``config`` (or only the named controllers).

    No port is opened here: each bus opens on its first transaction, so one missing
    adapter does not stop the others from working.
    """
    site = Site(config)
    for cfg in config.controllers:
        if only is not None and cfg.name not in only:
            continue
        builder = BUILDERS.get(cfg.driver)
        if builder is None:
            raise HardwareUnavailableError(
                f"controller {cfg.name!r}: driver {cfg.driver!r} is not available in this "
                f"version (available: {', '.join(sorted(BUILDERS))})"
            )
        bus = None
        if cfg.driver in SERIAL_DRIVERS and cfg.port is not None:
            bus = site.buses.get(cfg.port)
            if bus is None:
                bus = SerialBus(cfg.port, cfg.baudrate, timing=_timing(cfg), factory=factory)
                site.buses[cfg.port] = bus
        site.controllers[cfg.name] = builder(cfg, site, bus)
    return site


@contextmanager
def opened_site(
    config: Config, *, factory: SerialFactory = open_serial, only: Sequence[str] | None = None
) -> Iterator[Site]:
    """``build_site`` as a context manager that always releases the ports."""
    site = build_site(config, factory=factory, only=only)
    try:
        yield site
    finally:
        site.close()


# -- scan ---------------------------------------------------------------------------------
Probe = Callable[[int], ProbeResult | None]
"""Ask one address on a bus; what answered there, or ``None`` for silence."""

#: ``on_address(done, total, address, found)``: called as each address is finished.
OnAddress = Callable[[int, int, int, ProbeResult | None], None]


class Stop(Protocol):
    """Set when the person scanning pressed Ctrl-C (``threading.Event`` is one)."""

    def is_set(self) -> bool:
        """True once asked to stop."""
        ...


@dataclass(frozen=True, slots=True)
class ScanReport:
    """What one ``scan`` found, and whether it was stopped before the last address."""

    controller: str
    found: list[ProbeResult]
    probed: int
    total: int
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        """``scan --json`` (the same through the agent and directly)."""
        return {"controller": self.controller,
                "found": [{"address": r.address, "description": r.description}
                          for r in self.found],
                "probed": self.probed, "total": self.total, "interrupted": self.interrupted}


def _modbus_probe(bus: SerialBus, site: Site | None, timeout_s: float | None) -> Probe:
    from drivers.modbus import ModbusBus
    from drivers.modbus import scan as modbus_scan

    # The agent's own Modbus client for that bus when it has one (no second client).
    shared = site.shared.get(("modbus", bus.url)) if site is not None else None
    client = shared if isinstance(shared, ModbusBus) else ModbusBus(bus)
    wait = {} if timeout_s is None else {"timeout_s": timeout_s}

    def probe(address: int) -> ProbeResult | None:
        found = modbus_scan(client, [address], **wait)
        return found[0] if found else None

    return probe


def _lockboard_probe(bus: SerialBus, site: Site | None, timeout_s: float | None) -> Probe:
    from drivers.lockboard import scan as lockboard_scan

    del site
    wait = {} if timeout_s is None else {"timeout_s": timeout_s}

    def probe(address: int) -> ProbeResult | None:
        found = lockboard_scan(bus, [address], **wait)
        return found[0] if found else None

    return probe


#: driver name -> (a probe over a bus, default address range).  Each probe is one
#: transaction, so a scan on the agent's bus lets commands through between addresses.
SCANNERS: dict[str, tuple[Callable[[SerialBus, Site | None, float | None], Probe], range]] = {
    "modbus": (_modbus_probe, range(1, 248)),
    "lockboard": (_lockboard_probe, range(32)),
}


def _scannable(config: Config, name: str) -> tuple[ControllerConfig, Callable[
        [SerialBus, Site | None, float | None], Probe], range]:
    cfg = config.controller(name)
    if cfg is None:
        known = ", ".join(c.name for c in config.controllers)
        raise HardwareUnavailableError(f"unknown controller {name!r} (known: {known})")
    scanner = SCANNERS.get(cfg.driver)
    if scanner is None or cfg.port is None:
        raise HardwareUnavailableError(
            f"controller {name!r}: driver {cfg.driver!r} has no bus scan"
        )
    return cfg, *scanner


def _run_scan(name: str, probe: Probe, addresses: Iterable[int],
              on_address: OnAddress | None, stop: Stop | None) -> ScanReport:
    wanted = list(addresses)
    found: list[ProbeResult] = []
    for done, address in enumerate(wanted, 1):
        if stop is not None and stop.is_set():
            return ScanReport(name, found, done - 1, len(wanted), interrupted=True)
        result = probe(address)
        if result is not None:
            found.append(result)
        if on_address is not None:
            on_address(done, len(wanted), address, result)
    return ScanReport(name, found, len(wanted), len(wanted))


def scan_controller(
    config: Config,
    name: str,
    addresses: Iterable[int] | None = None,
    *,
    factory: SerialFactory = open_serial,
    timeout_s: float | None = None,
    on_address: OnAddress | None = None,
    stop: Stop | None = None,
) -> ScanReport:
    """Probe ``addresses`` on the bus of controller ``name`` and list what answers.

    Opens the port itself (no agent running).  ``timeout_s`` is the wait per address
    (default: the driver's); ``on_address`` hears of each address as it is done;
    ``stop`` ends the scan between two addresses.
    """
    cfg, make_probe, default_range = _scannable(config, name)
    assert cfg.port is not None
    # Silence is the common answer in a scan: no retries (garbled replies are retried
    # by the drivers' own scan rules).
    timing = LinkTiming.for_baudrate(cfg.baudrate, timeout_s or 0.1, retries=0)
    bus = SerialBus(cfg.port, cfg.baudrate, timing=timing, factory=factory)
    try:
        return _run_scan(name, make_probe(bus, None, timeout_s),
                         addresses if addresses is not None else default_range,
                         on_address, stop)
    finally:
        bus.close()


def scan_site_bus(
    site: Site,
    name: str,
    addresses: Iterable[int] | None = None,
    *,
    timeout_s: float | None = None,
    on_address: OnAddress | None = None,
    stop: Stop | None = None,
) -> ScanReport:
    """``scan_controller`` on a running site's own bus (the agent owns the port).

    Every probe is one transaction on the shared bus, so the site's commands and reads
    take turns with the scan; the bus's timing and reopen state are the site's.
    """
    cfg, make_probe, default_range = _scannable(site.config, name)
    bus = site.buses.get(cfg.port or "")
    if bus is None:
        raise HardwareUnavailableError(f"controller {name!r}: its bus is not open here")
    return _run_scan(name, make_probe(bus, site, timeout_s),
                     addresses if addresses is not None else default_range, on_address, stop)
