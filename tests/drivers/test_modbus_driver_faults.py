"""The ``modbus`` driver against simulated relay boards on real ptys: transport faults, device
faults, the port itself and line noise.

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
from pathlib import Path
from typing import Literal

import pytest
from pymodbus.client import ModbusSerialClient

from devkit.pty import PtyBridge
from devkit.sims.modbus import ModbusSimBus, RelayBoard
from devkit.testing import returns_within
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import (
    BadFrameError,
    LinkDownError,
    NoReplyError,
    RetryableError,
)
from drivers.link import LinkTiming
from drivers.modbus import scan
from tests.support import modbus_driver as support
from tests.support.modbus_driver import TIMING, Rig, make_rig, poll_until, sim_only

ATTEMPTS = TIMING.retries + 1


@pytest.fixture
def rig(request: pytest.FixtureRequest, real_port: str | None, tmp_path: Path) -> Iterator[Rig]:
    yield from support.rig(request, real_port, tmp_path)


# -- transport faults --------------------------------------------------------------------


@sim_only
@pytest.mark.parametrize("op", ["read", "unlock", "lock"])
def test_no_reply_fails_after_exactly_retries_plus_one_attempts(rig: Rig, op: str) -> None:
    assert rig.sim is not None
    c = rig.controller()
    point = LockPoint(channel=0, door_input=0)
    rig.sim.faults.no_reply = True
    before = rig.seen()
    actions = {"read": lambda: c.read(point), "unlock": lambda: c.unlock(point, 5)}
    action = actions.get(op, lambda: c.lock(point))
    with pytest.raises(NoReplyError):
        # Each attempt waits timeout_s (0.1 s), not pymodbus's own seconds: a ceiling ten
        # times that (the speed itself is a benchmark's business).
        returns_within(ATTEMPTS * TIMING.timeout_s * 10, action, f"a failing {op}")
    assert rig.seen() - before == ATTEMPTS
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
    controller = rig.controller()
    with pytest.raises(NoReplyError):
        # A wait timed on this wall clock would never end.
        returns_within(ATTEMPTS * TIMING.timeout_s * 10,
                       lambda: controller.read(LockPoint(channel=0)), "a read")


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
    # Each silent address costs its 0.05 s once: a ceiling ten times the seven of them.
    found = returns_within(7 * 0.05 * 10, lambda: scan(rig.bus, range(1, 8), timeout_s=0.05),
                           "a scan of seven addresses")
    assert [p.address for p in found] == [1, 2, 5]
    assert found[0].extra == {"coil0": "off"}
    assert found[1].extra == {"coil0": "on"}
    assert "exception" in found[2].description
    assert rig.seen(4) == 1  # silence is not retried


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
