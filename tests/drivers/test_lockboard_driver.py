"""The lockboard driver against simulated boards on a real pty (or a real bus with --port).

Timings are shrunk (``TIMING``) rather than slept through; the simulator's hold time runs
on a fake clock that the tests advance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.pty import PtyPort
from devkit.sims.base import SimulatorServer
from devkit.sims.lockboard import LockboardSim, start_lockboard_sim
from devkit.testing import FakeClock, wait_for
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import BadFrameError, LinkDownError, NoReplyError, UnsupportedError
from drivers.link import LinkTiming, SerialBus
from drivers.lockboard import BOARD_PULSE_S, LockboardController, scan
from drivers.lockboard.controller import JAMMED
from drivers.lockboard.frames import (
    DoorSense,
    OpenReply,
    ReadReply,
    ReadRequest,
    RequestReader,
)

TIMING = LinkTiming(timeout_s=0.1, retries=2, gap_s=0.004, reopen_initial_s=0.05, reopen_max_s=0.2)
HOLD_S = 3.0
SETTLE_S = 0.01
P1, P2, P3 = LockPoint(0), LockPoint(1), LockPoint(2)

sim_only = pytest.mark.simulator_only


@pytest.fixture
def run(tmp_path: Path, clock: FakeClock) -> Iterator[LockboardSim]:
    """Boards 0 and 3 (16 locks each) on one simulated bus."""
    with start_lockboard_sim(tmp_path / "ttyLOCK", (0, 3), 16, hold_s=HOLD_S, clock=clock) as r:
        yield r


@pytest.fixture
def bus(run: LockboardSim) -> Iterator[SerialBus]:
    b = SerialBus(run.path, 9600, timing=TIMING)
    yield b
    b.close()


@pytest.fixture
def board(bus: SerialBus) -> LockboardController:
    return LockboardController("bus1", bus, 0, settle_s=SETTLE_S)


@pytest.fixture
def any_board(
    request: pytest.FixtureRequest, real_port: str | None, tmp_path: Path
) -> Iterator[LockboardController]:
    """A board on the real bus given with --port (address --address), else simulated."""
    if real_port:
        address = request.config.getoption("--address")
        bus = SerialBus(real_port, 9600, timing=LinkTiming.for_baudrate(9600))
        yield LockboardController("hw", bus, 1 if address is None else int(address))
        bus.close()
        return
    with start_lockboard_sim(tmp_path / "ttyLOCK", (0,), 16) as sim:
        bus = SerialBus(sim.path, 9600, timing=TIMING)
        yield LockboardController("sim", bus, 0, settle_s=SETTLE_S)
        bus.close()


def wire_requests(run: LockboardSim) -> int:
    return len(run.sim.requests)


# -- works on a real bus too ------------------------------------------------------------
def test_read_and_read_many_agree(any_board: LockboardController) -> None:
    points = [P1, P2, P3]
    single = [any_board.read(p) for p in points]
    many = any_board.read_many(points)
    assert [r.lock for r in many] == [r.lock for r in single]
    assert [r.door for r in many] == [r.door for r in single]
    assert all(r.lock in (LockState.LOCKED, LockState.UNLOCKED) for r in many)


def test_probe_reports_the_board(any_board: LockboardController) -> None:
    assert any_board.health().detail == "not yet contacted"
    health = any_board.probe()
    assert health.online, health
    assert any_board.lock_count is not None
    assert f"{any_board.lock_count} locks" in health.detail


def test_scan_finds_the_board(any_board: LockboardController) -> None:
    bus = any_board._bus
    found = scan(bus, [any_board.address, (any_board.address + 1) % 256], timeout_s=0.05)
    assert [p.address for p in found] == [any_board.address]
    assert found[0].description == f"lock board, {found[0].extra['locks']} locks"


# -- unlock, relock, lock ---------------------------------------------------------------
@sim_only
def test_unlock_is_confirmed_and_the_board_relocks_by_itself(
    board: LockboardController, run: LockboardSim, clock: FakeClock
) -> None:
    result = board.unlock(P2, seconds=8)
    assert result.confirmed
    assert result.self_relocking
    assert board.self_relocking
    assert result.reading.lock is LockState.UNLOCKED
    assert "cannot extend" in result.detail  # 8 s asked, the board decides
    assert run.sim.is_unlocked(0, 2)
    assert not run.sim.is_unlocked(0, 1)  # only the lock asked for

    clock.advance(HOLD_S - 0.1)
    assert board.read(P2).lock is LockState.UNLOCKED
    clock.advance(0.2)
    assert board.read(P2).lock is LockState.LOCKED
    locked = board.lock(P2)
    assert locked.confirmed
    assert locked.detail == ""


@sim_only
def test_short_unlock_needs_no_explanation(board: LockboardController) -> None:
    result = board.unlock(P1, seconds=BOARD_PULSE_S)
    assert result.confirmed
    assert result.detail == ""


@sim_only
def test_shutting_the_door_relocks(board: LockboardController, run: LockboardSim) -> None:
    assert board.unlock(P1, 8).confirmed
    run.sim.open_door(0, 1)
    assert board.read(P1).door is DoorState.OPEN
    not_yet = board.lock(P1)
    assert not not_yet.confirmed
    assert "no lock command" in not_yet.detail
    assert "shut it" in not_yet.detail
    run.sim.close_door(0, 1)
    locked = board.lock(P1)
    assert locked.confirmed
    assert locked.reading.door is DoorState.CLOSED


# -- read_many ----------------------------------------------------------------------------
@sim_only
def test_read_many_uses_one_read_all_request(board: LockboardController, run: LockboardSim) -> None:
    points = [LockPoint(c) for c in range(16)]
    board.read_many(points)  # learns which locks have a door sensor
    board.unlock(P2, 1)
    run.sim.open_door(0, 3)
    before = wire_requests(run)
    readings = board.read_many(points)
    assert wire_requests(run) == before + 1
    assert [r.lock for r in readings] == [
        LockState.UNLOCKED if c == 1 else LockState.LOCKED for c in range(16)
    ]
    assert [r.door for r in readings] == [
        DoorState.OPEN if c == 2 else DoorState.CLOSED for c in range(16)
    ]


@sim_only
def test_door_faults(board: LockboardController, run: LockboardSim) -> None:
    run.sim.set_faults(0, 1, door_held_open=True)
    run.sim.set_faults(0, 2, no_door_sensor=True)
    assert board.read(P1).door is DoorState.OPEN
    assert board.read(P2).door is DoorState.UNKNOWN
    # read-all cannot tell "no sensor" from "closed": the driver must not guess
    fresh = LockboardController("fresh", board._bus, 0, settle_s=SETTLE_S)
    doors = [r.door for r in fresh.read_many([P1, P2, P3])]
    assert doors == [DoorState.OPEN, DoorState.UNKNOWN, DoorState.CLOSED]
    assert [r.door for r in fresh.read_many([P1, P2, P3])] == doors


@sim_only
def test_jammed_lock_is_not_confirmed(board: LockboardController, run: LockboardSim) -> None:
    run.sim.set_faults(0, 1, jammed=True)
    result = board.unlock(P1, 5)
    assert not result.confirmed
    assert JAMMED in result.detail
    assert result.reading.lock is LockState.LOCKED
    assert board.health().online  # the board answered: a jam is not a link fault


@sim_only
def test_released_then_engaged_before_read_back_is_not_confirmed(
    board: LockboardController, run: LockboardSim
) -> None:
    run.sim.hold_s = 0.0  # the open reply says released; the read-back says locked
    result = board.unlock(P1, 5)
    assert not result.confirmed
    assert JAMMED in result.detail


# -- several boards -----------------------------------------------------------------------
@sim_only
def test_two_boards_on_one_bus(bus: SerialBus, run: LockboardSim) -> None:
    b0 = LockboardController("b0", bus, 0, settle_s=SETTLE_S)
    b3 = LockboardController("b3", bus, 3, settle_s=SETTLE_S)
    assert b3.unlock(LockPoint(4), 3).confirmed
    assert run.sim.is_unlocked(3, 5)
    assert not run.sim.is_unlocked(0, 5)
    assert b0.read(LockPoint(4)).lock is LockState.LOCKED
    assert b3.read(LockPoint(4)).lock is LockState.UNLOCKED
    assert [p.address for p in scan(bus, range(6), timeout_s=0.03)] == [0, 3]


@sim_only
def test_scan_reports_a_garbled_address(bus: SerialBus, run: LockboardSim) -> None:
    run.faults.corrupt = True
    found = scan(bus, [0, 1], timeout_s=0.03)
    assert [p.address for p in found] == [0]
    assert "garbled" in found[0].description


# -- transport faults ---------------------------------------------------------------------
@sim_only
def test_no_reply_fails_after_exactly_the_allowed_attempts(
    board: LockboardController, bus: SerialBus, run: LockboardSim
) -> None:
    run.faults.no_reply = True
    with pytest.raises(NoReplyError, match="no reply"):
        board.unlock(P1, 5)
    assert bus.last_attempts == TIMING.retries + 1
    assert wire_requests(run) == TIMING.retries + 1  # all opens, no read-back sent
    health = board.health()
    assert not health.online
    assert health.consecutive_failures == 1

    run.faults.no_reply = False
    assert board.read(P1).lock is LockState.UNLOCKED  # the board did act on the opens
    assert board.health().online


@sim_only
def test_dead_board(board: LockboardController, run: LockboardSim) -> None:
    run.faults.ignore_requests = True
    with pytest.raises(NoReplyError):
        board.read(P1)
    assert board.probe().online is False


@sim_only
def test_late_reply_is_not_taken_for_the_next_answer(
    board: LockboardController, run: LockboardSim
) -> None:
    calls = (TIMING.retries + 1) * (TIMING.timeout_s + TIMING.gap_s)
    run.faults.reply_delay_s = calls + 0.05  # later than the whole call
    with pytest.raises(NoReplyError):
        board.read(P1)
    # The three late replies say "door closed"; they arrive during the next call.
    run.faults.reply_delay_s = 0.0
    run.sim.open_door(0, 1)
    assert board.read(P1).door is DoorState.OPEN


@sim_only
def test_stale_input_is_flushed_before_a_request(
    board: LockboardController, bus: SerialBus, run: LockboardSim
) -> None:
    calls = (TIMING.retries + 1) * (TIMING.timeout_s + TIMING.gap_s)
    run.faults.reply_delay_s = calls + 0.05
    with pytest.raises(NoReplyError):
        board.read(P1)
    run.faults.reply_delay_s = 0.0
    run.sim.open_door(0, 1)
    # The stale replies wait in the port.
    wait_for(lambda: run.server.replies >= TIMING.retries + 1, 2.0, "the stale replies",
             interval=0.01)
    # A second driver for the same board (say, the CLI) knows nothing of the failure.
    other = LockboardController("cli", bus, 0, settle_s=SETTLE_S)
    assert other.read(P1).door is DoorState.OPEN


@sim_only
def test_late_reply_of_one_board_is_not_taken_by_another(bus: SerialBus, run: LockboardSim) -> None:
    b0 = LockboardController("b0", bus, 0, settle_s=SETTLE_S)
    b3 = LockboardController("b3", bus, 3, settle_s=SETTLE_S)
    assert b3.unlock(P1, 1).confirmed
    calls = (TIMING.retries + 1) * (TIMING.timeout_s + TIMING.gap_s)
    run.faults.reply_delay_s = calls + 0.05
    with pytest.raises(NoReplyError):
        b0.read(P1)
    run.faults.reply_delay_s = 0.0
    # b0's stale "locked" replies for lock 1 land in b3's call and are refused.
    assert b3.read(P1).lock is LockState.UNLOCKED


@sim_only
def test_late_unlock_is_never_confirmed(board: LockboardController, run: LockboardSim) -> None:
    run.faults.reply_delay_s = TIMING.timeout_s * 4
    with pytest.raises(NoReplyError):
        board.unlock(P1, 5)
    run.faults.reply_delay_s = 0.0  # the queued late replies go out at once


@sim_only
def test_corrupt_replies_are_bad_frames(board: LockboardController, run: LockboardSim) -> None:
    run.faults.corrupt = True
    with pytest.raises(BadFrameError):
        board.unlock(P1, 5)
    with pytest.raises(BadFrameError):
        board.read_many([P1, P2])
    assert not board.health().online
    run.faults.corrupt = False
    assert board.read(P1).lock is LockState.UNLOCKED  # now read back for real


@sim_only
def test_garbage_before_replies_is_skipped(board: LockboardController, run: LockboardSim) -> None:
    run.faults.garbage = 11
    for channel in range(6):
        point = LockPoint(channel)
        assert board.unlock(point, 1).confirmed
        assert board.read(point).lock is LockState.UNLOCKED
    readings = board.read_many([LockPoint(c) for c in range(8)])
    assert [r.lock for r in readings] == [LockState.UNLOCKED] * 6 + [LockState.LOCKED] * 2


@sim_only
def test_reply_from_the_wrong_address_is_never_accepted(
    board: LockboardController, run: LockboardSim
) -> None:
    run.sim.boards[0].reply_address = 1  # board 0 answers as board 1
    with pytest.raises(BadFrameError, match="does not answer"):
        board.read(P1)
    with pytest.raises(BadFrameError):
        board.unlock(P1, 5)
    assert not board.health().online


class WrongAnswers:
    """A board that answers every read with the wrong lock, then the wrong type."""

    def __init__(self) -> None:
        self.reader = RequestReader()
        self.n = 0

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        for req in self.reader.feed(data):
            assert isinstance(req, ReadRequest)
            self.n += 1
            if self.n % 2:
                out.append(
                    ReadReply(req.address, req.lock % 48 + 1, False, DoorSense.CLOSED).serialize()
                )
            else:
                out.append(OpenReply(req.address, req.lock, unlocked=True).serialize())
        return out


@sim_only
def test_reply_for_the_wrong_lock_or_request_is_never_accepted(tmp_path: Path) -> None:
    with PtyPort(tmp_path / "ttyWRONG") as port, SimulatorServer(port, WrongAnswers()):
        bus = SerialBus(str(port.path), 9600, timing=TIMING)
        board = LockboardController("wrong", bus, 0)
        with pytest.raises(BadFrameError, match="does not answer"):
            board.read(P1)
        assert bus.last_attempts == TIMING.retries + 1
        bus.close()


@sim_only
def test_vanished_port_comes_back_by_itself(board: LockboardController, run: LockboardSim) -> None:
    assert board.read(P1).lock is LockState.LOCKED
    run.port.vanish()
    with pytest.raises(LinkDownError):
        board.read(P1)
    with pytest.raises(LinkDownError):
        board.read(P1)  # fails fast while the port is missing
    assert not board.health().online
    run.port.restore()
    deadline = time.monotonic() + 2.0
    while True:
        try:
            reading = board.read(P1)
            break
        except LinkDownError:
            assert time.monotonic() < deadline, "the driver did not reopen the port"
            time.sleep(0.01)
    assert reading.lock is LockState.LOCKED
    assert board.health().online


# -- configuration mistakes -----------------------------------------------------------------
@sim_only
def test_channel_outside_the_board_is_refused(board: LockboardController) -> None:
    with pytest.raises(UnsupportedError, match="channel 16"):
        board.unlock(LockPoint(16), 5)
    with pytest.raises(UnsupportedError, match="channel -1"):
        board.read(LockPoint(-1))


@sim_only
def test_more_channels_than_the_board_has(bus: SerialBus) -> None:
    big = LockboardController("big", bus, 0, channels=24)
    assert "do not exist" in big.probe().detail
    with pytest.raises(UnsupportedError, match="only 16 locks"):
        big.read_many([LockPoint(20)])


def test_constructor_refuses_impossible_boards(tmp_path: Path) -> None:
    bus = SerialBus(str(tmp_path / "none"), 9600, timing=TIMING)
    with pytest.raises(ValueError, match="address"):
        LockboardController("x", bus, 256)
    with pytest.raises(ValueError, match=r"1\.\.48"):
        LockboardController("x", bus, 0, channels=49)
