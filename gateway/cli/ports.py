"""``stora-gateway ports``: the serial ports present, to find the RS-485 adapter.

It reads no config.  This module loads only when ``ports`` runs (the command table,
``gateway/cli/shell.py``), and pyserial with it, never with ``--help``.
"""

from __future__ import annotations

from serial.tools import list_ports

from gateway.cli.render import print_json, table
from gateway.cli.shell import EXIT_OK, Context

__all__ = ["cmd_ports"]


def cmd_ports(ctx: Context) -> int:
    """``ports``: serial ports present."""
    ports = [
        {"device": p.device, "description": p.description, "serial_number": p.serial_number}
        for p in sorted(list_ports.comports(), key=lambda p: p.device)
    ]
    if ctx.json:
        print_json(ports, ctx.out)
    elif not ports:
        ctx.out.write("no serial ports found (is the USB RS-485 adapter plugged in?)\n")
    else:
        ctx.out.write(table(["device", "description", "serial number"],
                            [[p["device"], p["description"], p["serial_number"]] for p in ports])
                      + "\n")
    return EXIT_OK
