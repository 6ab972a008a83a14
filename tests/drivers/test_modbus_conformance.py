"""The ``modbus`` driver against pymodbus's own serial server (a slave we did not write).

pymodbus's ``ModbusSerialServer`` runs in a background event loop on one end of a
``PtyBridge``; the driver opens the other end.  Its datastore is a ``SimDevice`` (the
pymodbus 3.10+ replacement of ``ModbusDeviceContext``): coils and discrete inputs in
separate bit-addressed blocks.  The door contacts are driven through the device's
``action`` hook, the documented way to change what the server answers.

pymodbus's server has no timed pulse, so the driver runs with ``pulse=False`` here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from devkit.pty import PtyBridge
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import DeviceRejectedError
from drivers.link import LinkTiming, SerialBus
from drivers.modbus import ModbusBus, ModbusController, scan

pytestmark = pytest.mark.simulator_only

TIMING = LinkTiming(timeout_s=0.2, retries=2, gap_s=0.004, reopen_initial_s=0.05, reopen_max_s=0.2)
SLAVE = 1
BITS = 16  # pymodbus stores bit blocks in whole 16-bit registers


class PymodbusSlave:
    """pymodbus's RTU server on ``path`` in a thread with its own event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doors: dict[int, bool] = {}  # input -> contact closed
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pymodbus-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("pymodbus server did not start")
        if self._error is not None:
            raise self._error

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: Any,
    ) -> None:
        """Before each request: put the door contacts into the discrete-input block."""
        del start_address, address, count, set_values
        if function_code == 2:
            for number, closed in self.doors.items():
                reg, bit = divmod(number, BITS)  # bit 0 of register 0 is input 0
                if closed:
                    registers[reg] |= 1 << bit
                else:
                    registers[reg] &= ~(1 << bit)

    def _device(self) -> SimDevice:
        blocks = (
            [SimData(0, values=[False] * BITS, datatype=DataType.BITS)],  # coils 0-15
            [SimData(0, values=[False] * BITS, datatype=DataType.BITS)],  # inputs 0-15
            [SimData(0, count=8, datatype=DataType.REGISTERS)],
            [SimData(0, count=8, datatype=DataType.REGISTERS)],
        )
        return SimDevice(id=SLAVE, simdata=blocks, action=self._action)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _serve(self) -> None:
        try:
            self.server = ModbusSerialServer(
                self._device(), framer=FramerType.RTU, port=str(self.path), baudrate=9600
            )
            await self.server.serve_forever(background=True)
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self.server.serving
        # Let handlers that were mid-request finish before the loop closes.
        await asyncio.sleep(0.05)

    def stop(self) -> None:
        """Shut the server down and wait for its loop to close."""
        if self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def slave(tmp_path: Path) -> Iterator[tuple[PymodbusSlave, ModbusController]]:
    with PtyBridge(tmp_path / "ttyDriver", tmp_path / "ttyServer") as bridge:
        server = PymodbusSlave(bridge.b.path)
        serial_bus = SerialBus(str(bridge.a.path), 9600, timing=TIMING)
        controller = ModbusController("conf", ModbusBus(serial_bus), SLAVE, channels=32, inputs=16)
        try:
            yield server, controller
        finally:
            serial_bus.close()
            server.stop()


@pytest.mark.parametrize("energize_to", ["unlock", "lock"])
def test_unlock_and_lock_confirmed_by_coil_read_back(
    slave: tuple[PymodbusSlave, ModbusController], energize_to: Any
) -> None:
    _, c = slave
    point = LockPoint(channel=3, energize_to=energize_to)
    assert c.lock(point).confirmed
    result = c.unlock(point, 5)
    assert result.confirmed
    assert result.reading.lock is LockState.UNLOCKED
    assert not result.self_relocking
    result = c.lock(point)
    assert result.confirmed
    assert result.reading.lock is LockState.LOCKED
    # Reading coil 3 directly: the polarity on the wire is the lock's.
    assert c.bus.read_coils(SLAVE, 3, 1) == [energize_to == "lock"]


def test_door_input_from_the_servers_datastore(
    slave: tuple[PymodbusSlave, ModbusController],
) -> None:
    server, c = slave
    point = LockPoint(channel=0, door_input=9)
    server.doors[9] = True
    assert c.read(point).door is DoorState.CLOSED
    server.doors[9] = False
    assert c.read(point).door is DoorState.OPEN


def test_read_many(slave: tuple[PymodbusSlave, ModbusController]) -> None:
    server, c = slave
    server.doors.update({0: True, 1: False, 2: True})
    assert c.unlock(LockPoint(channel=1), 5).confirmed
    points = [
        LockPoint(channel=0, door_input=0),
        LockPoint(channel=1, door_input=1),
        LockPoint(channel=2, door_input=2, energize_to="lock"),
    ]
    readings = c.read_many(points)
    assert [r.lock for r in readings] == [LockState.LOCKED, LockState.UNLOCKED, LockState.UNLOCKED]
    assert [r.door for r in readings] == [DoorState.CLOSED, DoorState.OPEN, DoorState.CLOSED]


def test_out_of_range_coil_is_device_rejected(
    slave: tuple[PymodbusSlave, ModbusController],
) -> None:
    _, c = slave
    with pytest.raises(DeviceRejectedError, match="ILLEGAL_ADDRESS"):
        c.unlock(LockPoint(channel=31), 5)
    with pytest.raises(DeviceRejectedError):
        c.read(LockPoint(channel=31))
    assert c.probe().online


def test_scan_finds_the_server(slave: tuple[PymodbusSlave, ModbusController]) -> None:
    _, c = slave
    found = scan(c.bus, [SLAVE])
    assert [p.address for p in found] == [SLAVE]
