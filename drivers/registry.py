"""The driver registry: every driver by name, with its settings and how to build it.

The gateway's config loader and its hardware builder know drivers only through
:data:`REGISTRY`: each driver's :class:`~drivers.settings.DriverSpec` (its keys, ranges,
``parse`` and the module that builds its controllers) lives in its package's ``settings``
module.  Adding a driver means one package and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from drivers.lockboard.settings import SPEC as LOCKBOARD
from drivers.modbus.settings import SPEC as MODBUS
from drivers.osdp.settings import SPEC as OSDP
from drivers.settings import DriverSpec
from drivers.tasmota.settings import SPEC as TASMOTA
from drivers.zigbee2mqtt.settings import SPEC as ZIGBEE2MQTT

__all__ = ["ALL_CONTROLLER_KEYS", "DRIVERS", "REGISTRY", "driver_spec"]

#: Driver name -> what it accepts and how it is built.
REGISTRY: Final[Mapping[str, DriverSpec]] = MappingProxyType({
    spec.name: spec for spec in (MODBUS, LOCKBOARD, OSDP, ZIGBEE2MQTT, TASMOTA)
})
#: The driver names, sorted (as messages list them).
DRIVERS: Final = tuple(sorted(REGISTRY))
#: Every key some driver accepts: one of them in another driver's table is "not valid
#: for driver X" rather than unknown.
ALL_CONTROLLER_KEYS: Final = frozenset[str]().union(*(s.keys for s in REGISTRY.values()))


def driver_spec(name: str) -> DriverSpec | None:
    """The driver called ``name``, or ``None``."""
    return REGISTRY.get(name)
