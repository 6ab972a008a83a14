"""The rig the ``modbus`` driver tests share (tests/drivers/test_modbus_driver_*.py): a
controller on a simulated relay board over a real pty, or on ``--port`` when given."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devkit.sims.modbus import ModbusSimBus, RelayBoard
from drivers.errors import RetryableError
from drivers.link import LinkTiming, SerialBus, open_serial
from drivers.modbus import ModbusBus, ModbusController

TIMING = LinkTiming(timeout_s=0.1, retries=2, gap_s=0.004, reopen_initial_s=0.05, reopen_max_s=0.2)

sim_only = pytest.mark.simulator_only


@dataclass
class Rig:
    """One bus under test: a simulator (or a real port), a SerialBus and a ModbusBus."""

    url: str
    address: int
    sim: ModbusSimBus | None
    serial_bus: SerialBus
    bus: ModbusBus
    opens: list[float] = field(default_factory=list)

    @property
    def board(self) -> RelayBoard:
        assert self.sim is not None, "needs the simulator"
        return self.sim.board(self.address)

    def seen(self, slave: int | None = None) -> int:
        """Requests the simulator saw for ``slave``."""
        assert self.sim is not None
        return self.sim.simulator.requests[self.address if slave is None else slave]

    def controller(self, address: int | None = None, **kw: Any) -> ModbusController:
        return ModbusController(
            "bus1", self.bus, self.address if address is None else address, **kw
        )


def make_rig(
    url: str,
    address: int,
    sim: ModbusSimBus | None,
    timing: LinkTiming = TIMING,
    baudrate: int = 9600,
) -> Rig:
    opens: list[float] = []

    def factory(u: str, baudrate: int, timeout_s: float) -> Any:
        opens.append(time.monotonic())
        return open_serial(u, baudrate, timeout_s)

    serial_bus = SerialBus(url, baudrate, timing=timing, factory=factory)
    return Rig(url, address, sim, serial_bus, ModbusBus(serial_bus), opens)


def rig(request: pytest.FixtureRequest, real_port: str | None, tmp_path: Path) -> Iterator[Rig]:
    if real_port:
        address = request.config.getoption("--address") or 1
        r = make_rig(real_port, int(address), None)
        yield r
        r.serial_bus.close()
        return
    with ModbusSimBus(tmp_path / "ttyMB", slaves=(1, 2)) as sim:
        r = make_rig(str(sim.path), 1, sim)
        yield r
        r.serial_bus.close()


def poll_until(fn: Any, timeout_s: float = 2.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = fn()
        except RetryableError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
