"""The driver registry: every driver by name, with its settings and how to build it.

The gateway's config loader and its hardware builder know drivers only through this
module: each driver's :class:`~drivers.settings.DriverSpec` (its keys, ranges, ``parse``
and the module that builds its controllers) lives in its package's ``settings`` module,
which :func:`driver_spec` loads the first time that driver is named.  A site's agent thus
holds the settings of the drivers its config uses and no others (a Pi's memory); only a
config error that needs every driver's keys (a key copied from another driver's table)
loads them all.  Adding a driver means one package and one line in :data:`_SETTINGS`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from drivers.settings import DriverSpec

__all__ = ["DRIVERS", "all_controller_keys", "driver_spec", "registry"]

#: Driver name -> the module whose ``SPEC`` describes it.
_SETTINGS: Final[Mapping[str, str]] = MappingProxyType({
    "modbus": "drivers.modbus.settings",
    "lockboard": "drivers.lockboard.settings",
    "osdp": "drivers.osdp.settings",
    "zigbee2mqtt": "drivers.zigbee2mqtt.settings",
    "tasmota": "drivers.tasmota.settings",
})
#: The driver names, sorted (as messages list them).
DRIVERS: Final = tuple(sorted(_SETTINGS))


@functools.cache
def driver_spec(name: str) -> DriverSpec | None:
    """The driver called ``name`` (its settings module loaded now if not yet), or ``None``."""
    module = _SETTINGS.get(name)
    if module is None:
        return None
    spec = importlib.import_module(module).SPEC
    if not isinstance(spec, DriverSpec) or spec.name != name:
        raise TypeError(f"{module}.SPEC is not the DriverSpec of driver {name!r}")
    return spec


def registry() -> Mapping[str, DriverSpec]:
    """Every driver by name, in the table's order (loads every settings module)."""
    found = {name: driver_spec(name) for name in _SETTINGS}
    return MappingProxyType({name: spec for name, spec in found.items() if spec is not None})


@functools.cache
def all_controller_keys() -> frozenset[str]:
    """Every key some driver accepts: one of them in another driver's table is "not valid
    for driver X" rather than unknown (loads every settings module)."""
    return frozenset[str]().union(*(spec.keys for spec in registry().values()))
