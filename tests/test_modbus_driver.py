"""The ``modbus`` driver against simulated relay boards on real ptys.

Tests that can run on a real bus use the ``rig`` fixture, which takes ``--port`` (and
``--address``) when given; the rest need the simulator's fault switches and are marked
``simulator_only``.  On a real bus, use a board with nothing wired to its relays.
"""

from __future__ import annotations

import itertools
import os
import random
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from pymodbus.client import ModbusSerialClient

from devkit.pty import PtyBridge
from devkit.sims.modbus import ModbusSimBus, RelayBoard
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import (
    BadFrameError,
    DeviceRejectedError,
    LinkDownError,
    NoReplyError,
    RetryableError,
    UnsupportedError,
)
from drivers.link import LinkTiming, SerialBus, open_serial
from drivers.modbus import ModbusBus, ModbusController, PulseStyle, scan

TIMING = LinkTiming(timeout_s=0.1, retries=2, gap_s=0.004, reopen_initial_s=0.05, reopen_max_s=0.2)
ATTEMPTS = TIMING.retries + 1

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


@pytest.fixture
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


# -- transport faults --------------------------------------------------------------------


@sim_only
@pytest.mark.parametrize("op", ["read", "unlock", "lock"])
def test_no_reply_fails_after_exactly_retries_plus_one_attempts(rig: Rig, op: str) -> None:
    assert rig.sim is not None
    c = rig.controller()
    point = LockPoint(channel=0, door_input=0)
    rig.sim.faults.no_reply = True
    before = rig.seen()
    started = time.monotonic()
    actions = {"read": lambda: c.read(point), "unlock": lambda: c.unlock(point, 5)}
    action = actions.get(op, lambda: c.lock(point))
    with pytest.raises(NoReplyError):
        action()
    assert rig.seen() - before == ATTEMPTS
    assert time.monotonic() - started < ATTEMPTS * (TIMING.timeout_s + 0.1)
    health = c.health()
    assert not health.online
    assert health.consecutive_failures == 1
    assert "no reply" in (health.last_error or "")
    assert not c.probe().online
    rig.sim.faults.no_reply = False
    assert c.probe().online


@sim_only
def test_a_wall_clock_step_does_not_stretch_the_reply_wait(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert rig.sim is not None
    # The driver overrides this pymodbus method; if pymodbus renames it, say so here.
    assert hasattr(ModbusSerialClient, "_wait_for_data")
    backwards = itertools.count(2e9, -1.0)  # every look at the wall clock: 1 s earlier
    monkeypatch.setattr(time, "time", lambda: next(backwards))
    rig.sim.faults.no_reply = True
    started = time.monotonic()
    with pytest.raises(NoReplyError):
        rig.controller().read(LockPoint(channel=0))
    assert time.monotonic() - started < ATTEMPTS * (TIMING.timeout_s + 0.1)


@sim_only
def test_a_late_reply_is_an_error_and_never_answers_a_later_request(rig: Rig) -> None:
    assert rig.sim is not None
    c = rig.controller()
    point = LockPoint(channel=0, door_input=0)
    rig.sim.faults.reply_delay_s = 0.35  # > timeout: every attempt gives up first
    with pytest.raises(NoReplyError):
        c.read(point)
    # The world changes; the three stale "coil off" replies are still on their way.
    rig.board.open_door(0)
    rig.sim.faults.reply_delay_s = 0.0
    result = c.unlock(point, 5)
    assert result.confirmed
    assert result.reading.lock is LockState.UNLOCKED is rig.board.lock_state(0)
    assert result.reading.door is DoorState.OPEN
    for _ in range(5):
        reading = c.read(point)
        assert (reading.lock, reading.door) == (LockState.UNLOCKED, DoorState.OPEN)


@sim_only
@pytest.mark.parametrize("fault", ["corrupt", "garbage"])
def test_corrupted_replies_are_never_confirmed(rig: Rig, fault: str) -> None:
    assert rig.sim is not None
    c = rig.controller()
    point = LockPoint(channel=1)
    if fault == "corrupt":
        rig.sim.faults.corrupt = True
    else:
        rig.sim.faults.garbage = 5
    for i in range(6):
        before = rig.seen()
        try:
            result = c.unlock(point, 5) if i % 2 == 0 else c.lock(point)
        except BadFrameError:
            # The failing transaction used all its attempts.  With garbage, an earlier
            # transaction of the same action (the write, before the read-back) may have
            # found its frame behind the noise and succeeded, adding its own requests.
            sent = rig.seen() - before
            if fault == "corrupt":
                assert sent == ATTEMPTS
            else:
                assert ATTEMPTS <= sent <= 3 * ATTEMPTS
            continue
        # pymodbus may find a frame behind leading garbage; if so, it must be the truth.
        assert fault == "garbage", "a reply with a bad CRC was accepted"
        truth = rig.board.lock_state(1)
        assert result.reading.lock is truth
        assert result.confirmed == (
            truth is (LockState.UNLOCKED if i % 2 == 0 else LockState.LOCKED)
        )


@sim_only
def test_a_reply_from_the_wrong_slave_id_is_never_accepted(rig: Rig) -> None:
    c = rig.controller()
    point = LockPoint(channel=0)
    rig.board.reply_as = 2  # board 1's address switch says 2 in its replies
    for action in (lambda: c.read(point), lambda: c.unlock(point, 5), lambda: c.lock(point)):
        before = rig.seen()
        with pytest.raises(BadFrameError, match="garbled or from another slave"):
            action()
        assert rig.seen() - before == ATTEMPTS
    rig.board.reply_as = None
    assert c.read(point).lock is rig.board.lock_state(0)


# -- device faults -----------------------------------------------------------------------


@sim_only
def test_jammed_lock_with_status_input_is_not_confirmed(rig: Rig) -> None:
    rig.board.wire_lock_feedback(2, 5)
    rig.board.jam(2)
    c = rig.controller()
    point = LockPoint(channel=2, status_input=5)
    result = c.unlock(point, 5)
    assert not result.confirmed
    assert result.reading.lock is LockState.LOCKED
    assert "read-back shows locked" in result.detail
    assert rig.board.coil(2)  # the relay moved; the lock did not


@sim_only
def test_stuck_relay_is_not_confirmed(rig: Rig) -> None:
    c = rig.controller(pulse=True)
    point = LockPoint(channel=6)
    rig.board.stick_relay(6)
    for result in (c.unlock(point, 5), c.lock(point)):
        assert result.reading.lock is LockState.LOCKED  # the read-back shows it stayed
    assert not c.unlock(point, 5).confirmed
    rig.board.stick_relay(6, False)
    rig.board.set_coil(6, True)
    rig.board.stick_relay(6)
    assert not c.lock(point).confirmed
    assert c.read(point).lock is LockState.UNLOCKED


@sim_only
def test_door_held_open(rig: Rig) -> None:
    c = rig.controller()
    point = LockPoint(channel=0, door_input=2)
    rig.board.hold_door_open(2)
    rig.board.close_door(2)
    assert c.lock(point).reading.door is DoorState.OPEN
    assert c.read(point).door is DoorState.OPEN


# -- the port itself ---------------------------------------------------------------------


@sim_only
def test_vanished_port_is_link_down_then_comes_back_without_busy_looping(rig: Rig) -> None:
    assert rig.sim is not None
    c = rig.controller()
    point = LockPoint(channel=0)
    assert c.read(point).lock is LockState.LOCKED
    rig.sim.port.vanish()
    with pytest.raises(LinkDownError):
        c.read(point)
    assert not c.health().online

    opens_before = len(rig.opens)
    polls = 0
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        with pytest.raises(LinkDownError):
            c.read(point)
        polls += 1
    tries = len(rig.opens) - opens_before
    # Backoff from 50 ms (jittered down to 25 ms), doubling to 200 ms: at most ~7 opens
    # in 0.5 s, however hard the caller polls.
    assert polls > 100
    assert 1 <= tries <= 8

    rig.sim.port.restore()
    reading = poll_until(lambda: c.read(point), timeout_s=2.0)
    assert reading.lock is LockState.LOCKED
    assert c.health().online


@sim_only
def test_scan_lists_what_answers(rig: Rig) -> None:
    assert rig.sim is not None
    # A board without coil 0 answers the scan with an exception: still something there.
    rig.sim.simulator.boards[5] = RelayBoard(5, coils=0)
    rig.sim.board(2).set_coil(0, True)
    started = time.monotonic()
    found = scan(rig.bus, range(1, 8), timeout_s=0.05)
    elapsed = time.monotonic() - started
    assert [p.address for p in found] == [1, 2, 5]
    assert found[0].extra == {"coil0": "off"}
    assert found[1].extra == {"coil0": "on"}
    assert "exception" in found[2].description
    assert rig.seen(4) == 1  # silence is not retried
    assert elapsed < 7 * 0.05 + 1.0


@sim_only
def test_scan_reports_garbled_replies(rig: Rig) -> None:
    assert rig.sim is not None
    rig.sim.faults.corrupt = True
    found = scan(rig.bus, [1, 3], timeout_s=0.05)
    assert [p.address for p in found] == [1]
    assert "baud" in found[0].description


def test_probe_and_health(rig: Rig) -> None:
    c = rig.controller()
    health = c.health()
    assert not health.online
    assert health.detail == "not yet contacted"
    health = c.probe()
    assert health.online
    assert health.detail == "ok"
    assert health.last_ok_at is not None


# -- line noise --------------------------------------------------------------------------


class PatchCable:
    """Copies bytes between two pty paths (a cable from the noisy bridge to the simulator)."""

    def __init__(self, path_x: Path, path_y: Path) -> None:
        self._fds = [os.open(p, os.O_RDWR | os.O_NOCTTY) for p in (path_x, path_y)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        x, y = self._fds
        while not self._stop.is_set():
            ready, _, _ = select.select(self._fds, [], [], 0.02)
            for fd in ready:
                os.write(y if fd == x else x, os.read(fd, 4096))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in self._fds:
            os.close(fd)


@sim_only
def test_line_noise_never_confirms_a_false_state_or_moves_an_unasked_lock(
    tmp_path: Path,
) -> None:
    """200 random actions through a line that flips bits both ways: every state the
    driver reports is the simulator's true state, every confirmed action really
    happened, and no lock moves that was not asked to (whatever failed meanwhile)."""
    rng = random.Random(1234)
    noise = random.Random(99)
    flips = 0

    def mangle(data: bytes) -> bytes:
        nonlocal flips
        out = bytearray(data)
        for i in range(len(out)):
            if noise.random() < 0.02:  # per byte: ~15% of 8-byte frames are damaged
                out[i] ^= 1 << noise.randrange(8)
                flips += 1
        return bytes(out)

    polarity: dict[int, Literal["unlock", "lock"]] = {
        0: "unlock",
        1: "unlock",
        2: "lock",
        3: "lock",
    }
    points = {ch: LockPoint(channel=ch, door_input=ch, energize_to=e) for ch, e in polarity.items()}
    # A short timeout keeps 200 noisy actions quick; baud only sets pymodbus's polling.
    timing = LinkTiming(
        timeout_s=0.03, retries=2, gap_s=0.002, reopen_initial_s=0.05, reopen_max_s=0.2
    )
    with (
        ModbusSimBus(tmp_path / "ttySim") as sim,
        PtyBridge(tmp_path / "ttyDriver", tmp_path / "ttyLine", mangle) as bridge,
    ):
        cable = PatchCable(bridge.b.path, sim.path)
        r = make_rig(str(bridge.a.path), 1, sim, timing, baudrate=115200)
        c = r.controller()
        board = sim.board(1)
        bad: list[tuple[int, str, int, str]] = []
        ok = transactions = 0
        try:
            for i in range(200):
                ch = rng.choice(list(points))
                op = rng.choice(["unlock", "lock", "read"])
                if rng.random() < 0.2:
                    door = rng.choice(list(points))
                    (board.open_door if rng.random() < 0.5 else board.close_door)(door)
                before = {n: board.coil(n) for n in points}
                result = reading = None
                try:
                    if op == "unlock":
                        result = c.unlock(points[ch], 5)
                    elif op == "lock":
                        result = c.lock(points[ch])
                    else:
                        reading = c.read(points[ch])
                except RetryableError:
                    pass
                else:
                    ok += 1
                    transactions += 2 if op == "read" else 3
                    reading = result.reading if result else reading
                after = {n: board.coil(n) for n in points}
                truth = board.lock_state(ch, polarity[ch])
                door_truth = DoorState.CLOSED if board.input(ch) else DoorState.OPEN
                for n in points:
                    if (n != ch or op == "read") and after[n] != before[n]:
                        bad.append((i, op, ch, f"coil {n} moved unasked"))
                if reading is not None and (reading.lock, reading.door) != (truth, door_truth):
                    bad.append((i, op, ch, f"reported {reading} but truth {truth}/{door_truth}"))
                if result is not None and result.confirmed:
                    asked = LockState.UNLOCKED if op == "unlock" else LockState.LOCKED
                    if truth is not asked:
                        bad.append((i, op, ch, f"confirmed {asked} but truth {truth}"))
        finally:
            r.serial_bus.close()
            cable.close()
    assert bad == []
    # The noise was real (frames were damaged and retried) and mostly survivable.
    assert flips > 50
    assert sim.simulator.requests[1] > transactions
    assert ok > 120, f"only {ok} of 200 actions got through the noise"
