"""The ``modbus`` driver against simulated relay boards on real ptys: actions and read-back.

Tests that can run on a real bus use the ``rig`` fixture, which takes ``--port`` (and
``--address``) when given; the rest need the simulator's fault switches and are marked
``simulator_only``.  On a real bus, use a board with nothing wired to its relays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from devkit.sims.modbus import ModbusSimBus
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import (
    DeviceRejectedError,
    UnsupportedError,
)
from drivers.modbus import ModbusController, PulseStyle
from tests.support import modbus_driver as support
from tests.support.modbus_driver import Rig, make_rig, poll_until, sim_only


@pytest.fixture
def rig(request: pytest.FixtureRequest, real_port: str | None, tmp_path: Path) -> Iterator[Rig]:
    yield from support.rig(request, real_port, tmp_path)


# -- actions and read-back ---------------------------------------------------------------


@pytest.mark.parametrize("energize_to", ["unlock", "lock"])
def test_unlock_and_lock_are_confirmed_for_both_polarities(
    rig: Rig, energize_to: Literal["unlock", "lock"]
) -> None:
    c = rig.controller()
    point = LockPoint(channel=1, energize_to=energize_to)
    locked = c.lock(point)
    assert locked.confirmed
    assert locked.reading.lock is LockState.LOCKED
    unlocked = c.unlock(point, 5)
    assert unlocked.confirmed
    assert unlocked.reading.lock is LockState.UNLOCKED
    assert not unlocked.self_relocking
    assert "agent must relock" in unlocked.detail
    if rig.sim:
        # The coil's polarity is the lock's: energized = unlocked for a strike only.
        assert rig.board.coil(1) is (energize_to == "unlock")
    relocked = c.lock(point)
    assert relocked.confirmed
    assert c.read(point).lock is LockState.LOCKED
    if rig.sim:
        assert rig.board.coil(1) is (energize_to == "lock")
        assert rig.board.lock_state(1, energize_to) is LockState.LOCKED


def test_pulse_mode_relocks_by_itself(rig: Rig) -> None:
    c = rig.controller(pulse=True)
    point = LockPoint(channel=2)
    c.lock(point)
    started = time.monotonic()
    result = c.unlock(point, 0.3)
    assert result.confirmed
    assert result.self_relocking
    assert c.self_relocking
    assert "board relocks" in result.detail
    writes = rig.seen() if rig.sim else 0
    poll_until(lambda: c.read(point).lock is LockState.LOCKED)
    assert time.monotonic() - started >= 0.25
    if rig.sim:
        # Only reads went out meanwhile: the board ended the pulse, not the driver.
        assert not rig.board.coil(2)
        assert rig.seen() > writes


@sim_only
@pytest.mark.parametrize("style", list(PulseStyle))
def test_pulse_length_is_counted_by_the_board(tmp_path: Path, style: PulseStyle) -> None:
    now = [0.0]
    with ModbusSimBus(tmp_path / "ttyMB", clock=lambda: now[0]) as sim:
        r = make_rig(str(sim.path), 1, sim)
        c = r.controller(pulse=True, pulse_style=style)
        point = LockPoint(channel=0)
        assert c.unlock(point, 8).confirmed
        now[0] += 7.9
        assert c.read(point).lock is LockState.UNLOCKED
        now[0] += 0.1
        assert c.read(point).lock is LockState.LOCKED
        r.serial_bus.close()


@sim_only
def test_pulse_on_a_fail_safe_lock_de_energizes_and_leaves_relocking_to_the_agent(
    rig: Rig,
) -> None:
    c = rig.controller(pulse=True)
    point = LockPoint(channel=3, energize_to="lock")
    assert c.lock(point).confirmed
    assert rig.board.coil(3)  # a maglock holds while powered
    result = c.unlock(point, 0.2)
    assert result.confirmed
    assert not result.self_relocking
    assert "fail-safe" in result.detail
    time.sleep(0.3)
    assert c.read(point).lock is LockState.UNLOCKED  # no board timer: still open


@sim_only
def test_door_input(rig: Rig) -> None:
    c = rig.controller()
    point = LockPoint(channel=0, door_input=3)
    assert c.read(point).door is DoorState.CLOSED
    rig.board.open_door(3)
    assert c.read(point).door is DoorState.OPEN
    assert c.read(LockPoint(channel=0)).door is DoorState.UNKNOWN
    rig.board.close_door(3)
    assert c.unlock(point, 5).reading.door is DoorState.CLOSED


@sim_only
@pytest.mark.parametrize("energize_to", ["unlock", "lock"])
def test_status_input_is_the_lock_state(rig: Rig, energize_to: Literal["unlock", "lock"]) -> None:
    rig.board.wire_lock_feedback(4, 6, energize_to)
    c = rig.controller()
    point = LockPoint(channel=4, status_input=6, energize_to=energize_to)
    assert c.lock(point).confirmed
    assert c.unlock(point, 5).confirmed
    assert not rig.board.input(6)
    assert c.lock(point).confirmed
    assert rig.board.input(6)


@sim_only
def test_two_boards_share_one_bus(rig: Rig) -> None:
    one, two = rig.controller(1), rig.controller(2)
    point = LockPoint(channel=0)
    seen_two = rig.seen(2)
    assert one.unlock(point, 5).confirmed
    assert rig.sim is not None
    assert rig.sim.board(1).coil(0)
    assert not rig.sim.board(2).coil(0)
    assert rig.seen(2) == seen_two  # nothing went to board 2
    assert two.read(point).lock is LockState.LOCKED
    assert two.unlock(point, 5).confirmed
    assert one.lock(point).confirmed
    assert rig.sim.board(2).coil(0)
    assert not rig.sim.board(1).coil(0)

    # Two threads on one bus: one transaction at a time, every result right.
    errors: list[BaseException] = []

    def hammer(c: ModbusController, unlock: bool) -> None:
        try:
            for _ in range(10):
                r = c.unlock(point, 5) if unlock else c.lock(point)
                assert r.confirmed
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c, u)) for c, u in ((one, True), (two, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@sim_only
def test_read_many_is_one_coil_read_and_one_input_read(rig: Rig) -> None:
    rig.board.wire_lock_feedback(5, 7)
    c = rig.controller()
    c.unlock(LockPoint(channel=3), 5)
    rig.board.open_door(2)
    points = [
        LockPoint(channel=0, door_input=1),
        LockPoint(channel=3, door_input=2),
        LockPoint(channel=5, status_input=7, energize_to="unlock"),
        LockPoint(channel=6, energize_to="lock"),
    ]
    before = rig.seen()
    readings = c.read_many(points)
    assert rig.seen() - before == 2
    assert [r.lock for r in readings] == [
        LockState.LOCKED,
        LockState.UNLOCKED,
        LockState.LOCKED,
        LockState.UNLOCKED,
    ]
    assert [r.door for r in readings] == [
        DoorState.CLOSED,
        DoorState.OPEN,
        DoorState.UNKNOWN,
        DoorState.UNKNOWN,
    ]
    before = rig.seen()
    c.read_many([LockPoint(channel=0), LockPoint(channel=7)])
    assert rig.seen() - before == 1  # no inputs wanted: no input read
    assert c.read_many([]) == []


def test_exception_response_is_a_technician_error(rig: Rig) -> None:
    # Configured for 256 coils; the board has far fewer, so it refuses coil 200.
    c = rig.controller(channels=256)
    with pytest.raises(DeviceRejectedError, match="ILLEGAL_ADDRESS"):
        c.unlock(LockPoint(channel=200), 5)
    with pytest.raises(DeviceRejectedError):
        c.read(LockPoint(channel=200))
    health = c.health()
    assert health.online
    assert "ILLEGAL_ADDRESS" in (health.last_error or "")


@sim_only
def test_points_outside_the_board_are_refused_before_any_traffic(rig: Rig) -> None:
    c = rig.controller(channels=8, inputs=4)
    before = rig.seen()
    for point in (
        LockPoint(channel=8),
        LockPoint(channel=-1),
        LockPoint(0, door_input=4),
        LockPoint(0, status_input=9),
    ):
        with pytest.raises(UnsupportedError):
            c.read(point)
    with pytest.raises(ValueError, match="positive"):
        c.unlock(LockPoint(channel=0), 0)
    assert rig.seen() == before
    with pytest.raises(ValueError, match="1-247"):
        rig.controller(address=0)
