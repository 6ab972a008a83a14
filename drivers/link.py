"""One RS-485 bus: a serial port shared by every board wired to it.

The bus owns the three rules of a half-duplex master:

* one transaction at a time (a lock held from request to reply, shared by all boards on
  the bus, since two masters talking at once garble both frames);
* a silent interval between frames (Modbus over Serial Line V1.02 §2.5.1.1: 3.5
  character times, fixed at 1.75 ms above 19200 baud; the lock boards need the same);
* bounded retries of a request whose reply was missing or corrupt, and a reopen with
  capped, jittered exponential backoff when the port itself fails (a USB adapter pulled
  out and plugged back).  The port is never written off: after the backoff it is tried
  again, forever.

This is the only place in ``drivers`` where retry policy lives.  Frame encoding lives in
each driver's ``frames`` module; this module only moves bytes.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from drivers.base import Clock, Health, Sleep
from drivers.errors import BadFrameError, LinkDownError, NoReplyError
from drivers.port_holders import busy_hint, permission_hint
from drivers.ports import port_problem

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

#: Standard UART character: start bit, 8 data bits, (no parity), stop bit, plus the
#: parity-or-second-stop bit that Modbus requires: 11 bits per character.
BITS_PER_CHAR = 11
#: Above 19200 baud the Modbus spec fixes the inter-frame gap at 1.75 ms.
FAST_BAUD_GAP_S = 0.00175
#: The backoff for reopening a vanished port starts here and doubles up to the cap.
REOPEN_INITIAL_S = 0.5
REOPEN_MAX_S = 30.0


def char_time_s(baudrate: int) -> float:
    """Seconds one character takes on the wire at ``baudrate``."""
    return BITS_PER_CHAR / baudrate


def frame_gap_s(baudrate: int) -> float:
    """The silent interval required between frames (3.5 characters, or 1.75 ms)."""
    if baudrate > 19200:
        return FAST_BAUD_GAP_S
    return 3.5 * char_time_s(baudrate)


def wire_time_s(nbytes: int, baudrate: int) -> float:
    """Seconds ``nbytes`` take on the wire, for timeouts and benchmarks."""
    return nbytes * char_time_s(baudrate)


class SerialPort(Protocol):
    """The part of ``serial.SerialBase`` the drivers use."""

    timeout: float | None

    def write(self, data: bytes, /) -> int | None:
        """Write bytes."""

    def read(self, size: int = 1, /) -> bytes:
        """Read up to ``size`` bytes, waiting at most ``timeout``."""

    @property
    def in_waiting(self) -> int:
        """Bytes ready to read."""

    def reset_input_buffer(self) -> None:
        """Discard unread input."""

    def close(self) -> None:
        """Close the port."""


SerialFactory = Callable[[str, int, float], Any]
"""``factory(url, baudrate, timeout_s)`` returns an open port (a ``serial.SerialBase``)."""


def open_serial(url: str, baudrate: int, timeout_s: float) -> Any:
    """Open ``url`` with pyserial: a device path, ``socket://host:port`` or
    ``rfc2217://host:port`` (:func:`drivers.ports.port_problem`; anything else raises
    ValueError before pyserial sees it, so no config, however it was built, reaches
    pyserial's file-writing ``spy://`` or class-loading ``alt://`` handlers).  Tests
    that want ``loop://`` pass a factory of their own."""
    import serial  # lazy: keeps CLI start-up fast on a Pi

    problem = port_problem(url)
    if problem is not None:  # checked again at open: a path may have changed since
        raise ValueError(f"port {problem}")

    exclusive = "://" not in url  # flock only makes sense on a device node
    return serial.serial_for_url(
        url,
        baudrate=baudrate,
        timeout=timeout_s,
        write_timeout=max(timeout_s, 1.0),
        exclusive=exclusive if exclusive else None,
    )


@dataclass(frozen=True, slots=True)
class LinkTiming:
    """Every timing of one bus, named (tests shrink these instead of sleeping)."""

    timeout_s: float = 0.2
    retries: int = 2
    gap_s: float = frame_gap_s(9600)
    reopen_initial_s: float = REOPEN_INITIAL_S
    reopen_max_s: float = REOPEN_MAX_S

    @classmethod
    def for_baudrate(cls, baudrate: int, timeout_s: float = 0.2, retries: int = 2) -> LinkTiming:
        """Timing with the spec's inter-frame gap for ``baudrate``."""
        return cls(timeout_s=timeout_s, retries=retries, gap_s=frame_gap_s(baudrate))


def _reason(exc: BaseException, url: str | None = None) -> str:
    """A short reason for a port failure, without pyserial's repetitions, with what to
    do about it: the group to join, the process holding the port (``url`` is the port,
    for those two)."""
    errno_ = getattr(exc, "errno", None)
    if errno_ == errno.ENOENT:
        return "device not present (adapter unplugged, or wrong port path)"
    local = url is not None and "://" not in url
    if errno_ in (errno.EACCES, errno.EPERM):
        if local:
            assert url is not None
            return permission_hint(url)
        return "permission denied (is the agent's user in the dialout group?)"
    # EBUSY: the kernel's "in use" (TIOCEXCL); EAGAIN: pyserial's exclusive flock failed.
    if errno_ in (errno.EBUSY, errno.EAGAIN):
        if local:
            assert url is not None
            return busy_hint(url)
        return "port busy (another program has it open)"
    strerror = getattr(exc, "strerror", None)
    return str(strerror) if strerror else str(exc)


def _serial_errors() -> tuple[type[BaseException], ...]:
    """What pyserial raises when a port fails.

    ``termios.error`` is not an ``OSError``: pyserial lets it escape from
    ``reset_input_buffer`` on a port whose device vanished (EIO on an unplugged adapter).
    """
    import termios

    import serial

    return (serial.SerialException, OSError, termios.error)


class SerialBus:
    """A serial port shared by the boards on one RS-485 bus.

    ``transact(exchange)`` runs ``exchange(port)`` (write a request, read its reply) with
    the bus held, the inter-frame gap kept, and bounded retries on ``NoReplyError`` and
    ``BadFrameError``.  A port error closes the port and schedules a reopen; until then
    calls fail fast with ``LinkDownError`` (no busy loop against a missing device).
    """

    def __init__(
        self,
        url: str,
        baudrate: int,
        *,
        timing: LinkTiming | None = None,
        factory: SerialFactory = open_serial,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.timing = timing or LinkTiming.for_baudrate(baudrate)
        self._factory = factory
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self.lock = threading.RLock()
        self._port: Any = None
        self._next_open_at = -math.inf
        self._backoff = self.timing.reopen_initial_s
        self._last_frame_at = -math.inf
        self.last_error: str | None = None
        self.last_ok_at: float | None = None
        self.consecutive_failures = 0
        self.reopens = 0
        self.last_attempts = 0

    # -- port lifecycle -------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """True while the port is open."""
        return self._port is not None

    def _ensure_open(self) -> Any:
        if self._port is not None:
            return self._port
        now = self._clock()
        if now < self._next_open_at:
            raise LinkDownError(
                f"{self.url}: {self.last_error}; next reopen in {self._next_open_at - now:.1f} s"
            )
        # ValueError: pyserial's answer to a malformed URL or setting.
        open_errors: tuple[type[BaseException], ...] = (*_serial_errors(), ValueError)
        try:
            port = self._factory(self.url, self.baudrate, self.timing.timeout_s)
            port.reset_input_buffer()
        except open_errors as exc:
            self._port_failed(exc)
            raise LinkDownError(
                f"{self.url}: cannot open port: {_reason(exc, self.url)}") from exc
        if self.reopens or self.last_error:
            LOGGER.info("%s: port opened", self.url)
        self._port = port
        self.reopens += 1
        return port

    def _port_failed(self, exc: BaseException) -> None:
        """Close the port and schedule a reopen after a jittered, growing backoff."""
        self.close()
        delay = self._backoff * (0.5 + 0.5 * self._rng())
        self._next_open_at = self._clock() + delay
        self._backoff = min(self._backoff * 2, self.timing.reopen_max_s)
        self.consecutive_failures += 1
        self.last_error = f"link down: {_reason(exc)}"
        LOGGER.warning("%s: %s; reopening in %.2f s", self.url, _reason(exc), delay)

    def close(self) -> None:
        """Close the port (it is reopened by the next transaction)."""
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except _serial_errors():  # pragma: no cover - closing a dead port
                LOGGER.debug("%s: error closing port", self.url, exc_info=True)

    # -- transactions ---------------------------------------------------------------
    def _wait_gap(self) -> None:
        wait = self._last_frame_at + self.timing.gap_s - self._clock()
        if wait > 0:
            self._sleep(wait)

    def transact(self, exchange: Callable[[Any], T]) -> T:
        """Run one request/reply ``exchange`` on the bus with gap, retries and reopen."""
        with self.lock:
            attempts = 0
            while True:
                attempts += 1
                self.last_attempts = attempts
                port = self._ensure_open()
                self._wait_gap()
                try:
                    result = exchange(port)
                except (NoReplyError, BadFrameError) as exc:
                    self._last_frame_at = self._clock()
                    self.consecutive_failures += 1
                    self.last_error = str(exc)
                    LOGGER.debug("%s: attempt %d failed: %s", self.url, attempts, exc)
                    if attempts > self.timing.retries:
                        raise
                    self._discard_input(port)
                    continue
                except LinkDownError as exc:
                    self._port_failed(exc)
                    raise
                except _serial_errors() as exc:
                    self._port_failed(exc)
                    raise LinkDownError(f"{self.url}: {_reason(exc)}") from exc
                self._last_frame_at = self._clock()
                self._succeeded()
                return result

    def _discard_input(self, port: Any) -> None:
        """Drop a late reply of a failed attempt so it is not taken for the next one."""
        try:
            port.reset_input_buffer()
        except _serial_errors() as exc:
            self._port_failed(exc)
            raise LinkDownError(f"{self.url}: {exc}") from exc

    def _succeeded(self) -> None:
        if self.consecutive_failures:
            LOGGER.info("%s: link healthy again", self.url)
        self.consecutive_failures = 0
        self._backoff = self.timing.reopen_initial_s
        self.last_ok_at = self._clock()
        self.last_error = None

    def health(self) -> Health:
        """Health of the bus as last observed."""
        online = self._port is not None and self.consecutive_failures == 0
        online = online and self.last_ok_at is not None
        if online:
            detail = "ok"
        elif self.last_error:
            detail = self.last_error
        else:
            detail = "not yet contacted"
        return Health(
            online=online,
            detail=detail,
            last_error=self.last_error,
            last_ok_at=self.last_ok_at,
            consecutive_failures=self.consecutive_failures,
        )


def read_reply(
    port: Any,
    decode: Callable[[bytes], T | None],
    timeout_s: float,
    clock: Clock = time.monotonic,
) -> T:
    """Read from ``port`` until ``decode(chunk)`` returns a reply or ``timeout_s`` passes.

    ``decode`` is fed each chunk as it arrives (it owns its buffer); it raises
    ``BadFrameError`` for a reply it can tell is wrong.  Raises ``NoReplyError`` on timeout.
    """
    deadline = clock() + timeout_s
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise NoReplyError(f"no reply within {timeout_s * 1000:.0f} ms")
        port.timeout = remaining
        chunk = port.read(max(1, port.in_waiting))
        if chunk:
            LOGGER.debug("rx %s", chunk.hex(" "))
            reply = decode(chunk)
            if reply is not None:
                return reply
