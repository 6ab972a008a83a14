"""The ``modbus`` driver's conformance harness: a simulated relay board on a pty."""

from __future__ import annotations

from pathlib import Path

from devkit.mosquitto import Broker
from devkit.sims.modbus import ModbusSimBus

SLAVE = 3


class ModbusHarness:
    """A 4-relay board (slave 3) with door contacts; the agent owns the relock timer."""

    driver = "modbus"
    self_relocking = False
    unlock_only = False

    def __init__(self, directory: Path) -> None:
        self.bus = ModbusSimBus(directory / "ttyConformanceMB", slaves=(SLAVE,), coils=4,
                                inputs=4)
        self.board = self.bus.board(SLAVE)

    def controller_toml(self, name: str) -> str:
        return (f'[[controllers]]\nname = "{name}"\ndriver = "modbus"\n'
                f'port = "{self.bus.path}"\naddress = {SLAVE}\npulse = false\n'
                "channels = 4\ninputs = 4\ntimeout_ms = 100\nretries = 1\n")

    def lock_keys(self, index: int) -> str:
        return f"channel = {index}\ndoor_input = {index}\n"

    def unlocked(self, index: int) -> bool:
        return self.board.coil(index)

    def set_silent(self, silent: bool) -> None:
        self.bus.faults.ignore_requests = silent

    def set_offline(self, offline: bool) -> None:
        if offline:
            self.bus.port.vanish()
        else:
            self.bus.port.restore()

    def drift(self, index: int, unlocked: bool) -> None:
        self.board.set_coil(index, unlocked)

    def close(self) -> None:
        self.bus.close()


def make(directory: Path, broker: Broker) -> ModbusHarness:
    """The harness (the broker is not needed by a serial driver)."""
    del broker
    return ModbusHarness(directory)
