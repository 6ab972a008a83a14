"""Names a driver package offers but imports only when first used (PEP 562).

The config loader reads every driver's ``settings`` module on each CLI command, which
must not load pymodbus, paho or pyserial; so a driver's ``__init__`` names its
controller, client and frames here, and they load when a caller first asks for one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each name to the module
    that defines it."""

    def getattr_(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return getattr_
