"""The lockboard driver: one CU16/CU48-style lock-control board on a shared RS-485 bus.

Layers: :mod:`drivers.lockboard.frames` knows the bytes, :class:`drivers.link.SerialBus`
owns the port, the inter-frame gap and the retries, and this module turns requests and
replies into the driver interface of :mod:`drivers.base`.

What these boards can and cannot do, and how the driver answers for it:

* **Unlock is a board-timed pulse.**  The open command makes the board fire the latch's
  solenoid for a pulse fixed in its firmware (about ``BOARD_PULSE_S``), so a crashed
  gateway can never leave a coil energized.  A spring latch then stays released until
  the door is pushed shut; a unit strike relocks at the end of the board's hold time.
  The relock time is the board's: ``seconds`` cannot extend it, and the result says so.
* **There is no lock command.**  ``lock()`` only reads back: confirmed when the latch is
  engaged, otherwise the detail tells the technician to shut the door.
* **Truth rule.**  The open reply is never confirmation; after a short settle the lock is
  read back, and only that read-back can confirm an unlock.
* **No sequence numbers.**  A reply cannot name the request it answers, so a late reply
  could pass for the answer to a later, identical request.  The driver therefore flushes
  the input before every request, never accepts a reply of the wrong type, board or lock,
  and after a request went unanswered it listens until the line has been quiet for a
  whole timeout before talking to this board again.
"""

from __future__ import annotations

import logging
import termios
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

from drivers.base import (
    ActionResult,
    Clock,
    Controller,
    DoorState,
    Health,
    LockPoint,
    LockState,
    ProbeResult,
    Reading,
)
from drivers.errors import (
    BadFrameError,
    DriverError,
    LinkDownError,
    NoReplyError,
    UnsupportedError,
)
from drivers.health import HealthTracker
from drivers.link import SerialBus, read_reply
from drivers.lockboard.frames import (
    MAX_ADDRESS,
    MAX_LOCKS,
    DoorSense,
    OpenReply,
    OpenRequest,
    ReadAllReply,
    ReadAllRequest,
    ReadReply,
    ReadRequest,
    Reply,
    ReplyReader,
    Request,
    hexdump,
)
from drivers.lockboard.settings import LockboardSettings
from drivers.settings import BuildContext, ControllerSettings, Probe

LOGGER = logging.getLogger(__name__)

R = TypeVar("R", OpenReply, ReadReply, ReadAllReply)

#: The solenoid pulse the boards fire on an open command (fixed in their firmware).
BOARD_PULSE_S = 0.5
#: Time after the open reply before reading back, so the latch's feedback switch has
#: moved; the board answers the open command as it starts the pulse.
SETTLE_S = 0.05
#: Per-address timeout of ``scan``: a read-all reply is at most 18 bytes (19 ms at
#: 9600 baud), plus the board's turnaround and a USB adapter's latency (up to 16 ms).
SCAN_TIMEOUT_S = 0.1
JAMMED = "lock did not release (jammed?)"

_DOOR = {
    DoorSense.OPEN: DoorState.OPEN,
    DoorSense.CLOSED: DoorState.CLOSED,
    DoorSense.NO_SENSOR: DoorState.UNKNOWN,
}


class LockboardController(Controller):
    """One lock board (``address`` on its DIP switch) with ``channels`` locks on ``bus``.

    Several boards may share one :class:`SerialBus`; the bus lock keeps their requests
    apart.  ``channel`` is 0-based (wire lock number = channel + 1); the door state of a
    point comes from the lock's own door sensor, so ``door_input`` and ``energize_to``
    are not used.  ``clock`` stamps readings and health; waits on the port run in real
    time, as the port itself does.  ``close()`` leaves the bus open: its owner closes it.
    """

    def __init__(
        self,
        name: str,
        bus: SerialBus,
        address: int,
        channels: int = 16,
        *,
        clock: Clock = time.monotonic,
        settle_s: float = SETTLE_S,
    ) -> None:
        if not 0 <= address <= MAX_ADDRESS:
            raise ValueError(f"{name}: board address {address} is not 0..{MAX_ADDRESS}")
        if not 1 <= channels <= MAX_LOCKS:
            raise ValueError(f"{name}: a lock board has 1..{MAX_LOCKS} locks, not {channels}")
        self.name = name
        self.address = address
        self.channels = channels
        self._bus = bus
        self._clock = clock
        self._settle_s = settle_s
        self._label = f"{name} (board {address})"
        self._health = HealthTracker(clock)
        self._unsettled = False  # a request went unanswered: its reply may still come
        self._has_sensor: dict[int, bool] = {}  # learned from read replies, per lock
        self.lock_count: int | None = None
        """How many locks the board reported in its last read-all reply."""

    # -- the driver interface ---------------------------------------------------------
    @property
    def self_relocking(self) -> bool:
        """Always true: the board ends every unlock with its own pulse."""
        return True

    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        """Open ``point`` and confirm by reading it back; the board relocks by itself."""
        lock = self._wire_lock(point)
        with self._bus.lock:
            opened, attempts = self._transact(OpenRequest(self.address, lock), OpenReply, lock)
            settle_until = time.monotonic() + self._settle_s
            reply, more = self._transact(
                ReadRequest(self.address, lock), ReadReply, lock, settle_until=settle_until
            )
            reading = self._reading(reply)
        notes = []
        confirmed = opened.unlocked and reading.lock is LockState.UNLOCKED
        if not confirmed:
            notes.append(JAMMED)
            if not opened.unlocked:
                notes.append("the board reported the latch still engaged")
        elif seconds > BOARD_PULSE_S:
            notes.append(
                f"board-timed: the latch stays released until the door is shut (a strike: "
                f"until the board's hold time ends); {seconds:g} s cannot extend it"
            )
        return ActionResult(
            confirmed=confirmed,
            reading=reading,
            detail="; ".join(notes),
            self_relocking=True,
            attempts=attempts + more,
        )

    def lock(self, point: LockPoint) -> ActionResult:
        """Confirm ``point`` is locked: the board has no lock command, so only read back."""
        lock = self._wire_lock(point)
        with self._bus.lock:
            reply, attempts = self._transact(ReadRequest(self.address, lock), ReadReply, lock)
            reading = self._reading(reply)
        detail = ""
        if reading.lock is not LockState.LOCKED:
            detail = (
                "latch still released: this board has no lock command; a latch engages when "
                "the door is pushed shut, a strike when the board's hold time ends"
            )
            if reading.door is DoorState.OPEN:
                detail += "; the door is open: shut it"
        return ActionResult(
            confirmed=reading.lock is LockState.LOCKED,
            reading=reading,
            detail=detail,
            self_relocking=True,
            attempts=attempts,
        )

    def read(self, point: LockPoint) -> Reading:
        """Read the latch and door of ``point`` with one read request."""
        lock = self._wire_lock(point)
        with self._bus.lock:
            reply, _ = self._transact(ReadRequest(self.address, lock), ReadReply, lock)
            return self._reading(reply)

    def read_many(self, points: Sequence[LockPoint]) -> list[Reading]:
        """Read ``points`` with one read-all request.

        The read-all door mask cannot say "no sensor", so a lock whose sensor has not been
        seen yet is read once on its own first (its door would otherwise be a guess).
        """
        locks = [self._wire_lock(p) for p in points]
        if not locks:
            return []
        with self._bus.lock:
            board = self._read_all()
            at = self._clock()
            missing = [lock for lock in locks if lock > board.count]
            if missing:
                raise UnsupportedError(
                    f"{self._label}: lock {missing[0]} is configured but the board reports "
                    f"only {board.count} locks"
                )
            readings: dict[int, Reading] = {}
            for lock in locks:
                if lock not in self._has_sensor and lock not in readings:
                    reply, _ = self._transact(ReadRequest(self.address, lock), ReadReply, lock)
                    readings[lock] = self._reading(reply)
        for lock in locks:
            if lock in readings:
                continue
            door = DoorState.OPEN if board.door_open[lock - 1] else DoorState.CLOSED
            state = LockState.UNLOCKED if board.unlocked[lock - 1] else LockState.LOCKED
            sensed = self._has_sensor.get(lock, False)
            readings[lock] = Reading(state, door if sensed else DoorState.UNKNOWN, at)
        return [readings[lock] for lock in locks]

    def health(self) -> Health:
        """This board's health from its own last exchange and the bus (no I/O)."""
        h = self._health
        if h.last_error is not None:
            online, detail = False, h.last_error
        elif h.last_ok_at is None:
            online, detail = False, "not yet contacted"
        elif not self._bus.is_open:
            online, detail = False, self._bus.health().detail
        else:
            online, detail = True, "ok"
            if self.lock_count is not None:
                detail = f"ok, {self.lock_count} locks"
        return h.health(online, detail)

    def probe(self) -> Health:
        """Send one read-all request and return the resulting health."""
        try:
            with self._bus.lock:
                self._read_all()
        except DriverError:
            return self.health()
        health = self.health()
        if self.lock_count is not None and self.lock_count < self.channels:
            detail = (
                f"{health.detail}; {self.channels} configured: channels "
                f"{self.lock_count}..{self.channels - 1} do not exist on this board"
            )
            return Health(
                online=health.online,
                detail=detail,
                last_error=health.last_error,
                last_ok_at=health.last_ok_at,
                consecutive_failures=health.consecutive_failures,
            )
        return health

    def close(self) -> None:
        """Nothing to release: the bus is shared and belongs to whoever built it."""

    # -- internals ----------------------------------------------------------------------
    def _wire_lock(self, point: LockPoint) -> int:
        if not 0 <= point.channel < self.channels:
            raise UnsupportedError(
                f"{self._label}: channel {point.channel} is not on this board "
                f"(channels 0..{self.channels - 1}; lock number = channel + 1)"
            )
        return point.channel + 1

    def _reading(self, reply: ReadReply) -> Reading:
        self._has_sensor[reply.lock] = reply.door is not DoorSense.NO_SENSOR
        lock = LockState.UNLOCKED if reply.unlocked else LockState.LOCKED
        return Reading(lock, _DOOR[reply.door], self._clock())

    def _read_all(self) -> ReadAllReply:
        board, _ = self._transact(ReadAllRequest(self.address), ReadAllReply, None)
        self.lock_count = board.count
        return board

    def _transact(
        self,
        request: Request,
        kind: type[R],
        lock: int | None,
        *,
        settle_until: float = 0.0,
    ) -> tuple[R, int]:
        """Send ``request`` through the bus; return the matching reply and the attempts."""
        timing = self._bus.timing

        def accept(reply: Reply) -> bool:
            return (
                isinstance(reply, kind)
                and reply.address == self.address
                and (lock is None or getattr(reply, "lock", None) == lock)
            )

        def exchange(port: Any) -> R:
            if self._unsettled:
                # Let a late reply to the unanswered request arrive and be thrown away
                # now, rather than be taken for the answer to this one.
                n = discard(port, quiet_s=timing.timeout_s, max_s=4 * timing.timeout_s)
                LOGGER.debug("%s: line quiet again; %d late byte(s) dropped", self._label, n)
                self._unsettled = False
            remaining = settle_until - time.monotonic()
            if remaining > 0:
                discard(port, for_s=remaining, max_s=remaining)
            reply = exchange_once(port, request, accept, timing.timeout_s, self._label)
            assert isinstance(reply, kind)  # accept() checked it
            return reply

        try:
            reply = self._bus.transact(exchange)
        except (NoReplyError, BadFrameError) as exc:
            self._unsettled = True
            self._health.failed(str(exc))
            raise
        except DriverError as exc:
            self._health.failed(str(exc))
            raise
        self._health.succeeded()
        return reply, self._bus.last_attempts


# -- one exchange on the wire ---------------------------------------------------------------
def exchange_once(
    port: Any,
    request: Request,
    accept: Callable[[Reply], bool],
    timeout_s: float,
    label: str,
) -> Reply:
    """Write ``request`` and wait for the first reply ``accept`` takes (one attempt).

    Replies of the wrong type, board or lock are never returned; if no acceptable reply
    arrives within ``timeout_s``, the attempt fails with ``BadFrameError`` when bytes came
    (corrupt, truncated or foreign replies) and ``NoReplyError`` when the line was silent.
    """
    _flush(port, label)
    raw = request.serialize()
    LOGGER.debug("%s: tx %s %s", label, hexdump(raw), request)
    port.write(raw)
    reader = ReplyReader()
    foreign: list[Reply] = []

    def decode(chunk: bytes) -> Reply | None:
        for reply in reader.feed(chunk):
            if accept(reply):
                return reply
            foreign.append(reply)
            LOGGER.debug("%s: ignored %s (not a reply to %s)", label, reply, request)
        return None

    try:
        # mypy joins the union of reply types to their base class when solving T
        reply = cast(Reply, read_reply(port, decode, timeout_s))
    except NoReplyError as exc:
        if foreign:
            raise BadFrameError(
                f"{label}: {foreign[-1]} does not answer {request}; no reply that does"
            ) from exc
        if reader.dropped or reader.buffered:
            why = reader.last_error or "incomplete frame"
            raise BadFrameError(
                f"{label}: {reader.dropped + reader.buffered} byte(s) but no valid reply "
                f"to {request}: {why}"
            ) from exc
        raise NoReplyError(
            f"{label}: no reply to {request} within {timeout_s * 1000:.0f} ms: check the "
            "board address (DIP switches), A/B polarity, baud rate"
        ) from exc
    return reply


def discard(port: Any, *, for_s: float = 0.0, quiet_s: float = 0.0, max_s: float) -> int:
    """Read and drop input for at least ``for_s`` and until ``quiet_s`` pass in silence.

    Gives up after ``max_s`` so a babbling line cannot stall the bus; returns the number
    of bytes dropped.
    """
    start = last_rx = time.monotonic()
    dropped = 0
    while True:
        now = time.monotonic()
        wait = min(max(start + for_s, last_rx + quiet_s), start + max_s) - now
        if wait <= 0:
            return dropped
        port.timeout = wait
        chunk = port.read(max(1, port.in_waiting))
        if chunk:
            LOGGER.debug("dropped late %s", hexdump(chunk))
            dropped += len(chunk)
            last_rx = time.monotonic()


def _flush(port: Any, label: str) -> None:
    """Drop stale input before a request; pyserial's POSIX flush raises ``termios.error``."""
    try:
        port.reset_input_buffer()
    except termios.error as exc:  # not an OSError, so the bus would not translate it
        raise LinkDownError(f"{label}: cannot flush the port: {exc}") from exc


# -- scan ---------------------------------------------------------------------------------
def scan(
    bus: SerialBus, addresses: Iterable[int], *, timeout_s: float = SCAN_TIMEOUT_S
) -> list[ProbeResult]:
    """Send a read-all request to each address on ``bus``; list the boards that answer.

    A silent address is asked once (the bus's retries are for boards known to exist); an
    address that answers with garbage is retried by the bus and listed with a warning,
    since two boards set to the same address garble each other's replies.
    """
    found: list[ProbeResult] = []
    for address in addresses:
        request = ReadAllRequest(address)
        label = f"scan {bus.url} (board {address})"

        def accept(reply: Reply, address: int = address) -> bool:
            return isinstance(reply, ReadAllReply) and reply.address == address

        def exchange(
            port: Any, request: ReadAllRequest = request, label: str = label
        ) -> Reply | None:
            try:
                return exchange_once(port, request, accept, timeout_s, label)
            except NoReplyError:
                return None  # nobody there: an answer, not a fault of the bus

        try:
            reply = bus.transact(exchange)
        except BadFrameError as exc:
            found.append(
                ProbeResult(
                    address,
                    f"answers, but garbled ({exc}); two boards on this address?",
                    {"error": str(exc)},
                )
            )
            continue
        if isinstance(reply, ReadAllReply):
            found.append(
                ProbeResult(
                    address,
                    f"lock board, {reply.count} locks",
                    {"locks": str(reply.count), "unlocked": str(sum(reply.unlocked))},
                )
            )
    return found


# -- the registry's hooks (drivers.registry) ----------------------------------------------
def build(settings: ControllerSettings, ctx: BuildContext) -> Controller:
    """A board on its bus."""
    assert isinstance(settings, LockboardSettings)
    assert ctx.bus is not None
    return LockboardController(ctx.name, ctx.bus, settings.address, channels=settings.channels)


def probe(bus: SerialBus, shared: Mapping[tuple[str, str], object] | None,
          timeout_s: float | None) -> Probe:
    """One address of a bus scan: one transaction each."""
    del shared
    wait = SCAN_TIMEOUT_S if timeout_s is None else timeout_s

    def ask(address: int) -> ProbeResult | None:
        answered = scan(bus, [address], timeout_s=wait)
        return answered[0] if answered else None

    return ask
