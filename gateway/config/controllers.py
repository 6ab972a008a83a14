"""``[[controllers]]``: each table read by its driver's settings, and the checks across them.

What a driver accepts (its keys, their ranges and defaults) is the driver's own
(``drivers/<driver>/settings.py``, listed in :mod:`drivers.registry`); this module knows
what is common to every controller: its name, which driver, one bus per port, one
address per board, and that an MQTT driver's link does not log in as the agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from drivers.registry import DRIVERS, all_controller_keys, driver_spec
from gateway.config.model import ControllerConfig, MqttConfig
from gateway.config.problems import guarded
from gateway.config.reader import Table

__all__ = ["KEYS_LOCKS_USE", "Controllers", "check_mqtt_accounts", "parse_controllers"]

#: Keys of a controller that locks depend on: with a problem in one of them, the checks
#: of its locks' channels and inputs would only repeat it.
KEYS_LOCKS_USE: Final = ("name", "driver", "channels", "inputs")


def _parse_controller(t: Table) -> ControllerConfig | None:
    """One controller, or ``None`` when its driver is unknown (nothing else to check)."""
    name = t.get_str("name", nonempty=True)
    driver = t.get_str("driver")
    spec = driver_spec(driver)
    if spec is None:
        if t.ok("driver"):
            import difflib  # only on a mistake: the agent need not keep it (~160 KB)

            close = difflib.get_close_matches(driver, DRIVERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            t.error("driver", f"unknown driver {driver!r}{hint}; known drivers: "
                              f"{', '.join(DRIVERS)}")
        return None
    # Every driver's keys are loaded only when this table has a key its driver lacks.
    strays = any(key not in spec.keys for key in t.data)
    t.check_keys(spec.keys, driver=driver,
                 other_drivers_keys=all_controller_keys() if strays else ())
    # The settings' fields are named as ControllerConfig's (a name that is not one is a
    # TypeError here, at once); what this driver does not take keeps its default.
    values: dict[str, Any] = spec.parse(t).values()
    return ControllerConfig(name=name, driver=driver, **values)


@dataclass(slots=True)
class Controllers:
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


def _nothing() -> None:
    """The fallback of an item that could not be built: it is left out."""


def parse_controllers(tables: list[Table]) -> Controllers:
    """Every ``[[controllers]]`` table, and the rules across them (names, buses)."""
    found = Controllers()
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
        if t.ok(*KEYS_LOCKS_USE):
            found.usable.setdefault(c.name, c)
    return found


def check_mqtt_accounts(mqtt: MqttConfig, found: Controllers) -> None:
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


