"""The ``modbus`` driver: Modbus RTU relay boards on an RS-485 bus (via pymodbus).

Layers, one module each::

    frames.py      pymodbus PDUs + the timed-pulse PDU + reply checks   (pure)
    client.py      ModbusBus: pymodbus's RTU client on a SerialBus      (link)
    controller.py  ModbusController, scan                               (controller API)

Its simulator (``RelayBoard``, ``ModbusSimulator``, ``ModbusSimBus``) is the dev kit's:
``devkit/sims/modbus.py``, which production code never imports.

The names below are imported when first used: the config loader reads this
package's ``settings`` on every CLI command, which must not load pymodbus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from drivers.lazy import lazy_getattr

if TYPE_CHECKING:
    from drivers.modbus.client import ModbusBus
    from drivers.modbus.controller import SCAN_TIMEOUT_S, ModbusController, scan
    from drivers.modbus.frames import PulseStyle

__all__ = ["SCAN_TIMEOUT_S", "ModbusBus", "ModbusController", "PulseStyle", "scan"]

#: Where each name lives, imported on first use (PEP 562).
_LAZY: Final = {
    "ModbusBus": "drivers.modbus.client",
    "ModbusController": "drivers.modbus.controller",
    "PulseStyle": "drivers.modbus.frames",
    "SCAN_TIMEOUT_S": "drivers.modbus.controller",
    "scan": "drivers.modbus.controller",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
