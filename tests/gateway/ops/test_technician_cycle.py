"""The test cycle and the hardware errors a technician reads (issue 12 item 5), over the
simulators on ptys and the real serial link."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from devkit.demo_site import write_demo_config
from devkit.sims.lockboard import LockboardSim, start_lockboard_sim
from devkit.sims.modbus import ModbusSimBus
from devkit.testing import returns_within
from drivers.errors import LinkDownError
from drivers.link import SerialBus
from drivers.port_holders import busy_hint, port_holders
from gateway.config import load_config
from gateway.ops.technician import run_test_cycle
from gateway.units.hardware import build_site

pytestmark = pytest.mark.simulator_only


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[ModbusSimBus, LockboardSim, Path]]:
    modbus = ModbusSimBus(tmp_path / "ttyA", slaves=(1,), coils=4, inputs=4)
    lockers = start_lockboard_sim(tmp_path / "ttyB", (0,), 8, hold_s=0.5)
    try:
        yield modbus, lockers, write_demo_config(tmp_path, modbus.path, lockers.port.path)
    finally:
        modbus.close()
        lockers.close()


def test_a_stop_during_a_board_pulse_ends_it_at_once(
    sims: tuple[ModbusSimBus, LockboardSim, Path],
) -> None:
    """Ctrl-C during a board-timed pulse: the relock is sent now, not when the board's
    timer runs out (the demo's bus1 has ``pulse = true``)."""
    modbus, _, config_path = sims
    config = load_config(config_path)
    lock = config.lock_by_id("A-101")
    assert lock is not None
    stop = threading.Event()
    site = build_site(config, only=["bus1"])
    try:
        def press_ctrl_c_once_open() -> None:
            deadline = time.monotonic() + 10
            while not modbus.board(1).coil(0) and time.monotonic() < deadline:
                time.sleep(0.005)
            stop.set()

        presser = threading.Thread(target=press_ctrl_c_once_open)
        presser.start()
        # Ends at the Ctrl-C, not after the 30 s pulse: back within half of it.
        row = returns_within(15, lambda: run_test_cycle(site, lock, 30, cancel=stop),
                             "an interrupted test cycle")
        presser.join()
    finally:
        site.close()
    assert row is not None
    assert row.interrupted is True
    assert row.passed is False
    assert "interrupted" in row.detail
    assert "relocked at once" in row.detail
    assert modbus.board(1).coil(0) is False


def test_a_failed_unlock_is_not_held(sims: tuple[ModbusSimBus, LockboardSim, Path]) -> None:
    modbus, _, config_path = sims
    config = load_config(config_path)
    lock = config.lock_by_id("A-102")
    assert lock is not None
    modbus.board(1).stick_relay(1)

    class NoHold:
        """Fails the test if the cycle tries to wait (hold or poll) at all."""

        def is_set(self) -> bool:
            return False

        def wait(self, timeout: float | None = None) -> bool:
            raise AssertionError(f"waited {timeout} s after an unlock that failed")

    site = build_site(config, only=["bus1"])
    try:
        row = run_test_cycle(site, lock, 30, cancel=NoHold())
    finally:
        site.close()
    assert row is not None
    assert row.passed is False
    assert row.detail.startswith("unlock not confirmed")
    assert row.detail.endswith("relocked at once")


def test_a_silent_lock_board_says_what_to_check(
    sims: tuple[ModbusSimBus, LockboardSim, Path],
) -> None:
    _, lockers, config_path = sims
    lockers.server.faults.ignore_requests = True
    config = load_config(config_path)
    lock = config.lock_by_id("B-201")
    assert lock is not None
    site = build_site(config, only=["lockers"])
    try:
        row = run_test_cycle(site, lock, 1)
    finally:
        site.close()
    assert row is not None
    assert row.passed is False
    assert "no reply" in row.detail
    assert "check the board address (DIP switches), A/B polarity, baud rate" in row.detail


def test_permission_denied_names_the_group_to_join(tmp_path: Path) -> None:
    device = tmp_path / "ttyX"
    with ModbusSimBus(device) as sim:
        def refuse(url: str, baudrate: int, timeout_s: float) -> object:
            # What pyserial raises when open(2) says EACCES.
            raise serial.SerialException(errno.EACCES, f"could not open port {url}: "
                                                       "[Errno 13] Permission denied")

        bus = SerialBus(str(sim.path), 9600, factory=refuse)
        with pytest.raises(LinkDownError) as info:
            bus.transact(lambda port: None)
        bus.close()
    assert "permission denied: user " in str(info.value)
    assert "add it to group " in str(info.value)
    assert "sudo usermod -aG " in str(info.value)


def test_a_port_held_by_the_agent_says_how_to_pause_it(tmp_path: Path) -> None:
    """The holder found from /proc (a tree laid out like it): the agent, named with its
    pid, and the one command that pauses it."""
    with ModbusSimBus(tmp_path / "ttyX") as sim:
        proc = tmp_path / "proc"
        (proc / "4242" / "fd").mkdir(parents=True)
        (proc / "4242" / "fd" / "5").symlink_to(os.path.realpath(sim.path))
        (proc / "4242" / "cmdline").write_bytes(
            b"/usr/bin/python3\0/usr/bin/stora-gateway\0run\0")
        (proc / "77" / "fd").mkdir(parents=True)  # another process, not holding it
        (proc / "77" / "fd" / "0").symlink_to("/dev/null")
        holders = port_holders(str(sim.path), proc=proc)
        hint = busy_hint(str(sim.path), proc=proc)
    assert [h.pid for h in holders] == [4242]
    assert holders[0].is_agent
    assert "port in use by the gateway agent, pid 4242 (/usr/bin/python3 " \
           "/usr/bin/stora-gateway run)" in hint
    assert "sudo systemctl stop stora-gateway" in hint


def test_a_stop_that_comes_just_before_the_unlock_drives_nothing(
    sims: tuple[ModbusSimBus, LockboardSim, Path],
) -> None:
    """Found in review: the agent notices a hang-up on another thread, so a stop could
    come after its own check for the lock's turn; the cycle looks again right before the
    unlock, and then not one frame reaches the bus."""
    modbus, _, config_path = sims
    config = load_config(config_path)
    lock = config.lock_by_id("A-101")
    assert lock is not None
    board = modbus.board(1)
    requests: list[str] = []
    real_handle = board.handle

    def recording(request: object) -> object:
        requests.append(type(request).__name__)
        return real_handle(request)

    board.handle = recording  # type: ignore[method-assign]
    stop = threading.Event()
    stop.set()  # Ctrl-C landed after the caller's check
    site = build_site(config, only=["bus1"])
    try:
        row = run_test_cycle(site, lock, 30, cancel=stop)
    finally:
        site.close()
    assert row is None
    assert requests == []
    assert board.coil(0) is False
