"""Frames of the hex-protocol RS-485 lock-control boards ("CU16/CU48"-style, KERONG & co).

Pure code over bytes: no I/O, no clock, no state outside the reader objects.  The line is
9600 baud 8N1; each board on the bus has an address set on its DIP switch; every frame ends
with an XOR of all the bytes before it.  Lock numbers on the wire are 1-based (1–48); the
driver's 0-based ``channel`` is ``lock - 1``.

Requests (master → board), always 5 bytes::

    byte   0       1      2      3      4
         +-------+------+------+------+-----+
    open | 0x8A  | ADDR | LOCK | 0x11 | XOR |   LOCK = 1..48; the board pulses that latch
         +-------+------+------+------+-----+
    read | 0x80  | ADDR | LOCK | 0x33 | XOR |   LOCK = 1..48: one lock
         +-------+------+------+------+-----+
    all  | 0x80  | ADDR | 0x00 | 0x33 | XOR |   LOCK = 0: every lock on the board
         +-------+------+------+------+-----+

Replies (board → master)::

    open reply, 5 bytes
         +-------+------+------+-------+-----+
         | 0x8A  | ADDR | LOCK | STATE | XOR |   STATE 0x11 latch released, 0x00 still engaged
         +-------+------+------+-------+-----+

    read reply, 6 bytes
         +-------+------+------+--------+--------+-----+
         | 0x80  | ADDR | LOCK | LSTATE | DSTATE | XOR |
         +-------+------+------+--------+--------+-----+
         LSTATE 0x11 unlocked, 0x00 locked; DSTATE 0x11 door open, 0x00 closed, 0xFF no sensor

    read-all reply, 4 + 2·ceil(COUNT/8) + 2 bytes (8 to 18)
         +-------+------+------+-------+---------------+---------------+------+-----+
         | 0x80  | ADDR | 0x00 | COUNT | LMASK[m]      | DMASK[m]      | 0x33 | XOR |
         +-------+------+------+-------+---------------+---------------+------+-----+
         COUNT = 1..48 locks on the board, m = ceil(COUNT/8); bit i of the mask (LSB first in
         byte 0, then byte 1, …) is lock i+1.  LMASK bit set = unlocked; DMASK bit set = door
         open.  Pad bits above COUNT are sent as 0 and ignored on receive.

Any other value where a fixed value is required (start byte, command, state codes, the
0x33 trailer, a lock number or COUNT out of range) is a framing error: ``FrameError``,
which is a ``BadFrameError`` so the bus retries the request.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, Self, TypeVar

from drivers.errors import BadFrameError

LOGGER = logging.getLogger(__name__)

START_OPEN = 0x8A
START_READ = 0x80
CMD_OPEN = 0x11
CMD_READ = 0x33
READ_ALL_LOCK = 0x00
LATCH_RELEASED = 0x11
LATCH_ENGAGED = 0x00
MAX_LOCKS = 48
MAX_ADDRESS = 0xFF

REQUEST_LEN = 5
OPEN_REPLY_LEN = 5
READ_REPLY_LEN = 6
#: Enough bytes to know any frame's length (the read-all reply's COUNT is byte 3).
HEADER_LEN = 4


def mask_len(count: int) -> int:
    """Bytes of one read-all mask for ``count`` locks."""
    return (count + 7) // 8


def read_all_reply_len(count: int) -> int:
    """Length of a read-all reply from a board with ``count`` locks."""
    return HEADER_LEN + 2 * mask_len(count) + 2


#: The longest frame on the wire: a read-all reply from a 48-lock board (18 bytes).
MAX_FRAME_LEN = read_all_reply_len(MAX_LOCKS)


class FrameError(BadFrameError):
    """Bytes that are not a valid lock-board frame (bad checksum, field or length)."""


class DoorSense(enum.IntEnum):
    """The DSTATE byte of a read reply."""

    CLOSED = 0x00
    OPEN = 0x11
    NO_SENSOR = 0xFF


def xor_checksum(data: bytes) -> int:
    """XOR of every byte of ``data``: the last byte of each frame covers the ones before."""
    result = 0
    for byte in data:
        result ^= byte
    return result


def hexdump(data: bytes) -> str:
    """``8a 01 05 11 9f``: how frames appear in logs and error messages."""
    return data.hex(" ")


# -- field checks -----------------------------------------------------------------------
def _check_address(address: int) -> None:
    if not 0 <= address <= MAX_ADDRESS:
        raise ValueError(f"board address {address} is not 0..{MAX_ADDRESS}")


def _check_lock(lock: int) -> None:
    if not 1 <= lock <= MAX_LOCKS:
        raise ValueError(f"lock number {lock} is not 1..{MAX_LOCKS}")


def _need(data: bytes, length: int, what: str) -> None:
    if len(data) < length:
        raise FrameError(f"{what}: truncated, {len(data)} of {length} bytes: {hexdump(data)}")


def _expect(value: int, wanted: int, field: str, data: bytes) -> None:
    if value != wanted:
        raise FrameError(f"{field} is 0x{value:02x}, not 0x{wanted:02x}: {hexdump(data)}")


def _expect_lock(value: int, data: bytes) -> None:
    if not 1 <= value <= MAX_LOCKS:
        raise FrameError(f"lock number {value} is not 1..{MAX_LOCKS}: {hexdump(data)}")


def _expect_sum(frame: bytes) -> None:
    if xor_checksum(frame[:-1]) != frame[-1]:
        raise FrameError(
            f"bad checksum 0x{frame[-1]:02x} (computed 0x{xor_checksum(frame[:-1]):02x}): "
            f"{hexdump(frame)}"
        )


def _seal(body: bytes) -> bytes:
    return body + bytes([xor_checksum(body)])


def _latch(value: int, data: bytes) -> bool:
    """True for a released latch (0x11), False for engaged (0x00)."""
    if value == LATCH_RELEASED:
        return True
    if value == LATCH_ENGAGED:
        return False
    raise FrameError(f"lock state 0x{value:02x} is neither 0x11 nor 0x00: {hexdump(data)}")


def _state_byte(unlocked: bool) -> int:
    return LATCH_RELEASED if unlocked else LATCH_ENGAGED


# -- frame classes ------------------------------------------------------------------------
class Frame(ABC):
    """A lock-board frame: ``serialize()`` to bytes, ``deserialize(data)`` from them."""

    __slots__ = ()

    @abstractmethod
    def serialize(self) -> bytes:
        """The frame's bytes on the wire, checksum included."""

    @classmethod
    @abstractmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """Decode one frame from the start of ``data``; return it and the bytes after it.

        Raises ``FrameError`` when ``data`` does not start with a valid frame of this type.
        """


@dataclass(frozen=True, slots=True)
class _Addressed5(Frame):
    """The shared shape of the 5-byte frames: ``START ADDR LOCK CODE XOR``."""

    START: ClassVar[int]
    CODE: ClassVar[int]

    address: int
    lock: int

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_lock(self.lock)

    def serialize(self) -> bytes:
        """See the module docstring for the layout."""
        return _seal(bytes([self.START, self.address, self.lock, self.CODE]))

    @classmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """See :meth:`Frame.deserialize`."""
        _need(data, REQUEST_LEN, cls.__name__)
        frame = bytes(data[:REQUEST_LEN])
        _expect(frame[0], cls.START, "start byte", frame)
        _expect(frame[3], cls.CODE, "command", frame)
        _expect_lock(frame[2], frame)
        _expect_sum(frame)
        return cls(frame[1], frame[2]), bytes(data[REQUEST_LEN:])


@dataclass(frozen=True, slots=True)
class OpenRequest(_Addressed5):
    """``8A ADDR LOCK 11 XOR``: pulse the latch of ``lock`` (1-based) on board ``address``."""

    START: ClassVar[int] = START_OPEN
    CODE: ClassVar[int] = CMD_OPEN


@dataclass(frozen=True, slots=True)
class ReadRequest(_Addressed5):
    """``80 ADDR LOCK 33 XOR``: read the latch and door of ``lock`` (1-based)."""

    START: ClassVar[int] = START_READ
    CODE: ClassVar[int] = CMD_READ


@dataclass(frozen=True, slots=True)
class ReadAllRequest(Frame):
    """``80 ADDR 00 33 XOR``: read every lock of board ``address``."""

    address: int

    def __post_init__(self) -> None:
        _check_address(self.address)

    def serialize(self) -> bytes:
        """See the module docstring for the layout."""
        return _seal(bytes([START_READ, self.address, READ_ALL_LOCK, CMD_READ]))

    @classmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """See :meth:`Frame.deserialize`."""
        _need(data, REQUEST_LEN, cls.__name__)
        frame = bytes(data[:REQUEST_LEN])
        _expect(frame[0], START_READ, "start byte", frame)
        _expect(frame[2], READ_ALL_LOCK, "lock number", frame)
        _expect(frame[3], CMD_READ, "command", frame)
        _expect_sum(frame)
        return cls(frame[1]), bytes(data[REQUEST_LEN:])


@dataclass(frozen=True, slots=True)
class OpenReply(Frame):
    """``8A ADDR LOCK STATE XOR``: whether the board saw the latch release."""

    address: int
    lock: int
    unlocked: bool

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_lock(self.lock)

    def serialize(self) -> bytes:
        """See the module docstring for the layout."""
        return _seal(bytes([START_OPEN, self.address, self.lock, _state_byte(self.unlocked)]))

    @classmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """See :meth:`Frame.deserialize`."""
        _need(data, OPEN_REPLY_LEN, cls.__name__)
        frame = bytes(data[:OPEN_REPLY_LEN])
        _expect(frame[0], START_OPEN, "start byte", frame)
        _expect_lock(frame[2], frame)
        unlocked = _latch(frame[3], frame)
        _expect_sum(frame)
        return cls(frame[1], frame[2], unlocked), bytes(data[OPEN_REPLY_LEN:])


@dataclass(frozen=True, slots=True)
class ReadReply(Frame):
    """``80 ADDR LOCK LSTATE DSTATE XOR``: one lock's latch and door."""

    address: int
    lock: int
    unlocked: bool
    door: DoorSense

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_lock(self.lock)

    def serialize(self) -> bytes:
        """See the module docstring for the layout."""
        body = [START_READ, self.address, self.lock, _state_byte(self.unlocked), self.door]
        return _seal(bytes(body))

    @classmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """See :meth:`Frame.deserialize`."""
        _need(data, READ_REPLY_LEN, cls.__name__)
        frame = bytes(data[:READ_REPLY_LEN])
        _expect(frame[0], START_READ, "start byte", frame)
        _expect_lock(frame[2], frame)
        unlocked = _latch(frame[3], frame)
        try:
            door = DoorSense(frame[4])
        except ValueError:
            raise FrameError(
                f"door state 0x{frame[4]:02x} is not 0x00, 0x11 or 0xff: {hexdump(frame)}"
            ) from None
        _expect_sum(frame)
        return cls(frame[1], frame[2], unlocked, door), bytes(data[READ_REPLY_LEN:])


def _pack_bits(bits: tuple[bool, ...]) -> bytes:
    out = bytearray(mask_len(len(bits)))
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(mask: bytes, count: int) -> tuple[bool, ...]:
    return tuple(bool(mask[i // 8] >> (i % 8) & 1) for i in range(count))


@dataclass(frozen=True, slots=True)
class ReadAllReply(Frame):
    """``80 ADDR 00 COUNT LMASK DMASK 33 XOR``: every lock of a board.

    ``unlocked[i]`` and ``door_open[i]`` describe lock ``i + 1``; their length is COUNT.
    The door mask cannot say "no sensor": a lock without one reads as a closed door.
    """

    address: int
    unlocked: tuple[bool, ...]
    door_open: tuple[bool, ...]

    def __post_init__(self) -> None:
        _check_address(self.address)
        if not 1 <= len(self.unlocked) <= MAX_LOCKS:
            raise ValueError(f"a board has 1..{MAX_LOCKS} locks, not {len(self.unlocked)}")
        if len(self.door_open) != len(self.unlocked):
            raise ValueError("unlocked and door_open must have one entry per lock")

    @property
    def count(self) -> int:
        """How many locks the board has (COUNT)."""
        return len(self.unlocked)

    def serialize(self) -> bytes:
        """See the module docstring for the layout."""
        head = bytes([START_READ, self.address, READ_ALL_LOCK, self.count])
        body = head + _pack_bits(self.unlocked) + _pack_bits(self.door_open) + bytes([CMD_READ])
        return _seal(body)

    @classmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """See :meth:`Frame.deserialize`."""
        _need(data, HEADER_LEN, cls.__name__)
        _expect(data[0], START_READ, "start byte", bytes(data[:HEADER_LEN]))
        _expect(data[2], READ_ALL_LOCK, "lock number", bytes(data[:HEADER_LEN]))
        count = data[3]
        if not 1 <= count <= MAX_LOCKS:
            raise FrameError(f"lock count {count} is not 1..{MAX_LOCKS}: {hexdump(data[:4])}")
        length = read_all_reply_len(count)
        _need(data, length, cls.__name__)
        frame = bytes(data[:length])
        _expect(frame[-2], CMD_READ, "trailer", frame)
        _expect_sum(frame)
        m = mask_len(count)
        lmask = frame[HEADER_LEN : HEADER_LEN + m]
        dmask = frame[HEADER_LEN + m : HEADER_LEN + 2 * m]
        reply = cls(frame[1], _unpack_bits(lmask, count), _unpack_bits(dmask, count))
        return reply, bytes(data[length:])


Request = OpenRequest | ReadRequest | ReadAllRequest
Reply = OpenReply | ReadReply | ReadAllReply


# -- dispatch by header -------------------------------------------------------------------
def request_length(header: bytes) -> int | None:
    """Length of the request starting ``header``, ``None`` if more bytes are needed.

    Raises ``FrameError`` when ``header`` cannot start a request.
    """
    if not header:
        return None
    if header[0] not in (START_OPEN, START_READ):
        raise FrameError(f"0x{header[0]:02x} is not a request start byte")
    return REQUEST_LEN


def decode_request(data: bytes) -> tuple[Request, bytes]:
    """Decode the request at the start of ``data``; return it and the rest."""
    _need(data, REQUEST_LEN, "request")
    if data[0] == START_OPEN:
        return OpenRequest.deserialize(data)
    if data[0] == START_READ and data[2] == READ_ALL_LOCK:
        return ReadAllRequest.deserialize(data)
    if data[0] == START_READ:
        return ReadRequest.deserialize(data)
    raise FrameError(f"0x{data[0]:02x} is not a request start byte: {hexdump(data[:5])}")


def reply_length(header: bytes) -> int | None:
    """Length of the reply starting ``header``, ``None`` if more bytes are needed.

    The fixed fields within the first four bytes are checked here, so noise that cannot
    start a reply is dropped at once instead of waiting for a frame's worth of bytes.
    Raises ``FrameError`` when ``header`` cannot start a reply.
    """
    if not header:
        return None
    start = header[0]
    if start not in (START_OPEN, START_READ):
        raise FrameError(f"0x{start:02x} is not a reply start byte")
    if len(header) < HEADER_LEN:
        return None
    lock, code = header[2], header[3]
    if start == START_OPEN:
        _expect_lock(lock, header)
        _latch(code, header)
        return OPEN_REPLY_LEN
    if lock == READ_ALL_LOCK:
        if not 1 <= code <= MAX_LOCKS:
            raise FrameError(f"lock count {code} is not 1..{MAX_LOCKS}: {hexdump(header)}")
        return read_all_reply_len(code)
    _expect_lock(lock, header)
    _latch(code, header)
    return READ_REPLY_LEN


def decode_reply(data: bytes) -> tuple[Reply, bytes]:
    """Decode the reply at the start of ``data``; return it and the rest."""
    _need(data, HEADER_LEN, "reply")
    if data[0] == START_OPEN:
        return OpenReply.deserialize(data)
    if data[0] == START_READ and data[2] == READ_ALL_LOCK:
        return ReadAllReply.deserialize(data)
    if data[0] == START_READ:
        return ReadReply.deserialize(data)
    raise FrameError(f"0x{data[0]:02x} is not a reply start byte: {hexdump(data[:4])}")


# -- receive buffers ----------------------------------------------------------------------
F = TypeVar("F", bound=Frame)
_STARTS = (START_OPEN, START_READ)


class FrameReader(Generic[F]):
    """The receive buffer of one direction: chunks in, whole frames out.

    ``feed`` takes bytes in chunks of any size and returns the frames they complete.  It
    resynchronizes on its own: bytes before a start byte are dropped; a header that
    cannot start a frame, or a frame that fails to decode (bad checksum, bad field), costs
    one byte and the scan restarts at the next start byte, so a valid frame hiding behind
    a stray start byte is still found.  At most ``MAX_FRAME_LEN - 1`` bytes of one
    incomplete frame are kept between calls.

    A stray start byte right before a frame can promise a longer frame than the bytes
    that follow (``80`` before ``8a 00 01 …`` reads as a read-all header); when a complete
    valid frame sits inside those bytes, the promise is taken for noise and the frame is
    returned without waiting.  A valid frame could only hide by accident inside a real,
    still incomplete read-all reply if its mask bytes happened to spell one out, checksum
    included; the driver's check of type, board and lock would refuse even that.

    ``feed`` never raises: what it threw away is counted in ``dropped`` and the reason
    kept in ``last_error``, for the caller to report when no frame came.
    """

    def __init__(
        self,
        length: Callable[[bytes], int | None],
        decode: Callable[[bytes], tuple[F, bytes]],
    ) -> None:
        self._length = length
        self._decode = decode
        self._buf = b""
        self.dropped = 0
        self.frames = 0
        self.last_error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buf)

    def clear(self) -> None:
        """Forget any partial frame (after a timeout or a port flush)."""
        self.dropped += len(self._buf)
        self._buf = b""

    def feed(self, data: bytes) -> list[F]:
        """Add ``data``; return every frame completed by it, in order."""
        buf = self._buf + bytes(data)
        pos = 0
        frames: list[F] = []
        while True:
            start = _next_start(buf, pos)
            if start < 0:
                self._drop(buf, pos, len(buf))
                pos = len(buf)
                break
            self._drop(buf, pos, start)
            pos = start
            try:
                length = self._length(buf[pos : pos + HEADER_LEN])
                if length is None or len(buf) - pos < length:
                    behind = self._frame_behind(buf, pos)
                    if behind < 0:
                        break  # a frame still arriving: wait for the rest
                    # A whole frame inside the bytes a header promised: that header was a
                    # stray start byte, and waiting on it would hold the frame hostage.
                    self._drop(buf, pos, behind)
                    pos = behind
                    continue
                frame, _ = self._decode(buf[pos : pos + length])
            except FrameError as exc:
                # Whatever started at ``pos`` was noise: skip its first byte only, so a
                # real frame that begins inside it is found by the next scan.
                self.last_error = exc
                self._drop(buf, pos, pos + 1)
                pos += 1
                continue
            if LOGGER.isEnabledFor(logging.DEBUG):
                LOGGER.debug("frame %s: %s", hexdump(buf[pos : pos + length]), frame)
            frames.append(frame)
            self.frames += 1
            pos += length
        self._buf = buf[pos:]
        return frames

    def _frame_behind(self, buf: bytes, pos: int) -> int:
        """Where a complete, valid frame starts after ``pos`` in ``buf``; -1 if none does."""
        start = _next_start(buf, pos + 1)
        while start >= 0:
            try:
                length = self._length(buf[start : start + HEADER_LEN])
                if length is not None and len(buf) - start >= length:
                    self._decode(buf[start : start + length])
                    return start
            except FrameError:
                pass
            start = _next_start(buf, start + 1)
        return -1

    def _drop(self, buf: bytes, begin: int, end: int) -> None:
        if end > begin:
            self.dropped += end - begin
            if LOGGER.isEnabledFor(logging.DEBUG):
                LOGGER.debug("dropped %d byte(s): %s", end - begin, hexdump(buf[begin:end]))


def _next_start(buf: bytes, pos: int) -> int:
    found = [i for i in (buf.find(s, pos) for s in _STARTS) if i >= 0]
    return min(found) if found else -1


class ReplyReader(FrameReader[Reply]):
    """The driver's receive buffer: board replies."""

    def __init__(self) -> None:
        super().__init__(reply_length, decode_reply)


class RequestReader(FrameReader[Request]):
    """The simulator's receive buffer: master requests."""

    def __init__(self) -> None:
        super().__init__(request_length, decode_request)
