"""A simulator of lock boards on one RS-485 bus, speaking the real protocol on a pty.

Built from the production frame classes: requests are decoded with
:class:`~drivers.lockboard.frames.RequestReader` and replies encoded with the reply
dataclasses, so the simulator and the driver cannot drift apart silently.  Transport
faults (silence, late, corrupt or noisy replies) come from
:class:`~devkit.sims.base.TransportFaults`; this module models the device: latches, doors
and their faults.

Device model, per lock: an open request releases the latch (unless ``jammed``); the latch
engages again ``hold_s`` later, or as soon as the door is shut after having been opened.
``door_held_open`` makes the door read open whatever happens; ``no_door_sensor`` makes it
read "no sensor" (DSTATE 0xFF; the read-all door bit stays 0).  Boards answer only their
own address and stay silent otherwise, as on a real bus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from devkit.pty import PtyPort
from devkit.sims.base import SimulatorServer, TransportFaults
from drivers.base import Clock
from drivers.lockboard.frames import (
    MAX_LOCKS,
    DoorSense,
    OpenReply,
    OpenRequest,
    ReadAllReply,
    ReadAllRequest,
    ReadReply,
    ReadRequest,
    Request,
    RequestReader,
)

LOGGER = logging.getLogger(__name__)

#: How long a simulated latch stays released after an open (a strike's hold time).
DEFAULT_HOLD_S = 3.0


@dataclass(slots=True)
class SimLock:
    """One simulated latch and its door; the fault flags may be switched at any time."""

    jammed: bool = False
    door_held_open: bool = False
    no_door_sensor: bool = False
    released_at: float | None = None
    door_open: bool = False
    opened_since_release: bool = False

    def unlocked(self, now: float, hold_s: float) -> bool:
        """True while the latch is released."""
        if self.released_at is not None and now - self.released_at >= hold_s:
            self.released_at = None
        return self.released_at is not None

    def door(self) -> DoorSense:
        """What the door sensor says."""
        if self.no_door_sensor:
            return DoorSense.NO_SENSOR
        return DoorSense.OPEN if self.door_open or self.door_held_open else DoorSense.CLOSED


@dataclass(slots=True)
class SimBoard:
    """One simulated board: ``locks[0]`` is lock number 1.

    ``reply_address``, when set, is put in replies instead of the board's own address
    (a reply the driver must never accept for this board).
    """

    address: int
    locks: list[SimLock]
    reply_address: int | None = None


@dataclass
class LockboardSimulator:
    """A :class:`~devkit.sims.base.Responder` for lock boards at ``addresses``.

    Lock numbers in the helpers are the board's own, 1-based.  ``clock`` drives the hold
    time, so a test can pass a fake clock and advance it instead of sleeping.
    ``requests`` records every request addressed to a simulated board, in order.
    """

    addresses: Iterable[int] = (0,)
    count: int = 16
    hold_s: float = DEFAULT_HOLD_S
    clock: Clock = time.monotonic
    boards: dict[int, SimBoard] = field(init=False)
    requests: list[Request] = field(init=False, default_factory=list)
    _reader: RequestReader = field(init=False, default_factory=RequestReader)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_LOCKS:
            raise ValueError(f"a lock board has 1..{MAX_LOCKS} locks, not {self.count}")
        self.boards = {
            a: SimBoard(a, [SimLock() for _ in range(self.count)]) for a in self.addresses
        }

    # -- the Responder protocol ---------------------------------------------------------
    def feed(self, data: bytes) -> list[bytes]:
        """Take bytes from the bus; return the replies of the addressed boards."""
        with self._lock:
            replies = []
            for request in self._reader.feed(data):
                board = self.boards.get(request.address)
                if board is None:
                    continue  # another board's request: a real board stays silent
                self.requests.append(request)
                reply = self._answer(board, request)
                if reply is not None:
                    replies.append(reply)
            return replies

    def _answer(self, board: SimBoard, request: Request) -> bytes | None:
        now = self.clock()
        addr = board.address if board.reply_address is None else board.reply_address
        if isinstance(request, ReadAllRequest):
            reply = ReadAllReply(
                addr,
                tuple(lk.unlocked(now, self.hold_s) for lk in board.locks),
                tuple(lk.door() is DoorSense.OPEN for lk in board.locks),
            )
            return reply.serialize()
        if request.lock > len(board.locks):
            return None  # no such lock on this board: real boards ignore the request
        lk = board.locks[request.lock - 1]
        if isinstance(request, OpenRequest):
            if lk.jammed:  # the coil fires but the latch does not move
                return OpenReply(addr, request.lock, unlocked=False).serialize()
            lk.released_at = now
            lk.opened_since_release = False
            return OpenReply(addr, request.lock, unlocked=True).serialize()
        assert isinstance(request, ReadRequest)
        return ReadReply(addr, request.lock, lk.unlocked(now, self.hold_s), lk.door()).serialize()

    # -- helpers for tests and the demo -------------------------------------------------
    def lock_at(self, address: int, lock: int) -> SimLock:
        """The simulated lock number ``lock`` (1-based) of board ``address``."""
        return self.boards[address].locks[lock - 1]

    def is_unlocked(self, address: int, lock: int) -> bool:
        """True while the latch of ``lock`` is released."""
        with self._lock:
            return self.lock_at(address, lock).unlocked(self.clock(), self.hold_s)

    def open_door(self, address: int, lock: int) -> None:
        """Open the door of ``lock`` (forcing it, if the latch is engaged)."""
        with self._lock:
            lk = self.lock_at(address, lock)
            lk.door_open = True
            if lk.unlocked(self.clock(), self.hold_s):
                lk.opened_since_release = True

    def close_door(self, address: int, lock: int) -> None:
        """Shut the door of ``lock``; a latch released and opened since engages now."""
        with self._lock:
            lk = self.lock_at(address, lock)
            lk.door_open = False
            if lk.unlocked(self.clock(), self.hold_s) and lk.opened_since_release:
                lk.released_at = None
            lk.opened_since_release = False

    def set_faults(
        self,
        address: int,
        lock: int,
        *,
        jammed: bool | None = None,
        door_held_open: bool | None = None,
        no_door_sensor: bool | None = None,
    ) -> None:
        """Switch the device faults of one lock (``None`` leaves a fault as it is)."""
        with self._lock:
            lk = self.lock_at(address, lock)
            if jammed is not None:
                lk.jammed = jammed
            if door_held_open is not None:
                lk.door_held_open = door_held_open
            if no_door_sensor is not None:
                lk.no_door_sensor = no_door_sensor


class LockboardSim(NamedTuple):
    """A running simulator: the pty, the server thread and the device model.

    Unpacks as ``port, server, sim``; as a context manager it stops and removes them.
    """

    port: PtyPort
    server: SimulatorServer
    sim: LockboardSimulator

    @property
    def path(self) -> str:
        """The device path a driver opens."""
        return str(self.port.path)

    @property
    def faults(self) -> TransportFaults:
        """The server's transport fault switches."""
        return self.server.faults

    def close(self) -> None:
        """Stop the server and remove the pty."""
        self.server.stop()
        self.port.close()

    def __enter__(self) -> LockboardSim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_lockboard_sim(
    path: str | Path,
    addresses: Iterable[int] = (0,),
    count: int = 16,
    *,
    hold_s: float = DEFAULT_HOLD_S,
    clock: Clock = time.monotonic,
    faults: TransportFaults | None = None,
    seed: int = 0,
) -> LockboardSim:
    """Publish a pty at ``path`` and serve simulated boards on it until closed."""
    sim = LockboardSimulator(tuple(addresses), count, hold_s, clock)
    port = PtyPort(path)
    server = SimulatorServer(port, sim, faults, seed=seed).start()
    LOGGER.debug("lockboard simulator on %s: boards %s", path, sorted(sim.boards))
    return LockboardSim(port, server, sim)
