"""The site's hardware, built from configuration: buses, controllers and lock points.

Controllers are built through the driver registry (:mod:`drivers.registry`): each
driver's ``build`` gets its settings and a :class:`~drivers.settings.BuildContext`, so
adding a driver changes nothing in ``gateway/``.

Controllers that name the same serial ``port`` share one ``SerialBus``: one transaction
at a time on the wire, whatever mix of boards hangs off it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from drivers.base import Controller, LockPoint, ProbeResult
from drivers.link import LinkTiming, SerialBus, SerialFactory, open_serial
from drivers.mqtt.settings import BrokerSettings
from drivers.registry import DRIVERS, driver_spec
from drivers.settings import (
    BuildContext,
    BuildRefusedError,
    DriverSpec,
    Probe,
    ProbeMaker,
)
from gateway.config import Config, ControllerConfig, LockConfig
from gateway.errors import GatewayError
from gateway.link.tls import broker_tls_context, read_secret_file

LOGGER = logging.getLogger(__name__)


class HardwareUnavailableError(GatewayError):
    """The configuration names a driver this build cannot drive."""


@dataclass
class Site:
    """Everything the gateway can drive at one site, built from its config."""

    config: Config
    controllers: dict[str, Controller] = field(default_factory=dict)
    buses: dict[str, SerialBus] = field(default_factory=dict)
    shared: dict[tuple[str, str], object] = field(default_factory=dict)

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


def _broker(cfg: ControllerConfig, site: Site, kind: str) -> BrokerSettings:
    """Where and how an MQTT driver's link connects.

    Without ``host``/``port`` it is the ``[mqtt]`` broker, by the same transport (TCP,
    TLS or the unix socket) but with the controller's own account: the shipped brokers
    bind a client id to its account, so sharing the agent's would disconnect the agent
    (the config refuses it).  A broker of its own gets the controller's account too and
    never ``[mqtt]``'s TLS, so nothing of the cloud link travels to another host
    (hardware.md, "zigbee2mqtt" and "tasmota").  The client id carries the pid, so a CLI
    that opens the hardware itself does not kick the agent's link on a broker that does
    not bind ids; one that does replaces it with the account name.
    """
    mqtt = site.config.mqtt
    own = cfg.broker_host is not None or cfg.broker_port is not None
    return BrokerSettings(
        host=cfg.broker_host or mqtt.host,
        port=cfg.broker_port or (1883 if own else mqtt.port),
        client_id=f"{mqtt.client_id}-{kind}-{os.getpid()}",
        username=cfg.broker_username or None,
        password=read_secret_file(cfg.broker_password_file),
        tls=broker_tls_context(mqtt) if mqtt.tls and not own else None,
        keepalive_s=mqtt.keepalive_s,
    )


def _build(cfg: ControllerConfig, spec: DriverSpec, site: Site,
           bus: SerialBus | None) -> Controller:
    """One controller, by its driver's ``build`` (:mod:`drivers.registry`)."""
    settings = spec.settings.from_fields(partial(getattr, cfg))
    points = [point_of(lock) for lock in site.config.locks if lock.controller == cfg.name]
    ctx = BuildContext(name=cfg.name, bus=bus, shared=site.shared, points=points,
                       broker=partial(_broker, cfg, site))
    try:
        return spec.builder()(settings, ctx)
    except BuildRefusedError as exc:
        raise HardwareUnavailableError(str(exc)) from exc


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
        spec = driver_spec(cfg.driver)
        if spec is None:
            raise HardwareUnavailableError(
                f"controller {cfg.name!r}: driver {cfg.driver!r} is not available in this "
                f"version (available: {', '.join(DRIVERS)})"
            )
        bus = None
        if spec.serial and cfg.port is not None:
            bus = site.buses.get(cfg.port)
            if bus is None:
                bus = SerialBus(cfg.port, cfg.baudrate, timing=_timing(cfg), factory=factory)
                site.buses[cfg.port] = bus
        site.controllers[cfg.name] = _build(cfg, spec, site, bus)
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


def _scannable(config: Config, name: str) -> tuple[ControllerConfig, ProbeMaker, range]:
    """The controller ``name``, its driver's probe and default address range.

    Each probe is one transaction, so a scan on the agent's bus lets commands through
    between addresses.
    """
    cfg = config.controller(name)
    if cfg is None:
        known = ", ".join(c.name for c in config.controllers)
        raise HardwareUnavailableError(f"unknown controller {name!r} (known: {known})")
    spec = driver_spec(cfg.driver)
    if spec is None or spec.scan is None or cfg.port is None:
        raise HardwareUnavailableError(
            f"controller {name!r}: driver {cfg.driver!r} has no bus scan"
        )
    return cfg, spec.prober(), spec.scan


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
    return _run_scan(name, make_probe(bus, site.shared, timeout_s),
                     addresses if addresses is not None else default_range, on_address, stop)
