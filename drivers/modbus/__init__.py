"""The ``modbus`` driver: Modbus RTU relay boards on an RS-485 bus (via pymodbus).

Layers, one module each::

    frames.py      pymodbus PDUs + the timed-pulse PDU + reply checks   (pure)
    client.py      ModbusBus: pymodbus's RTU client on a SerialBus      (link)
    controller.py  ModbusController, scan                               (controller API)

Its simulator (``RelayBoard``, ``ModbusSimulator``, ``ModbusSimBus``) is the dev kit's:
``devkit/sims/modbus.py``, which production code never imports.
"""

from drivers.modbus.client import ModbusBus
from drivers.modbus.controller import SCAN_TIMEOUT_S, ModbusController, scan
from drivers.modbus.frames import PulseStyle

__all__ = ["SCAN_TIMEOUT_S", "ModbusBus", "ModbusController", "PulseStyle", "scan"]
