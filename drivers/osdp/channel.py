"""A libosdp channel over a pyserial port: the bytes under the OSDP control panel.

libosdp drives the wire itself: its ``refresh()`` calls ``read(max_bytes)``,
``write(data)`` and ``flush()`` on the channel object it was given.  Those calls come
from inside C code, so they must never raise (an exception there leaves libosdp with a
failed send and a confusing ``SystemError``); a port failure is recorded here instead,
the port is closed, and reopened after a jittered, growing backoff, like ``SerialBus``
does for the request/reply drivers.  Until then reads return nothing and writes send
nothing, which libosdp sees as a silent PD.

The port is opened with a zero read timeout: ``refresh()`` must not block (libosdp asks
to be refreshed at least every 50 ms).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from drivers.base import Clock
from drivers.link import REOPEN_INITIAL_S, REOPEN_MAX_S, SerialFactory, _reason, open_serial

LOGGER = logging.getLogger(__name__)


def _port_errors() -> tuple[type[BaseException], ...]:
    import termios

    import serial

    return (serial.SerialException, OSError, termios.error, ValueError)


class SerialChannel:
    """The ``read``/``write``/``flush`` channel libosdp expects, over a pyserial URL."""

    def __init__(
        self,
        url: str,
        baudrate: int,
        *,
        factory: SerialFactory = open_serial,
        clock: Clock = time.monotonic,
        rng: Callable[[], float] = random.random,
        reopen_initial_s: float = REOPEN_INITIAL_S,
        reopen_max_s: float = REOPEN_MAX_S,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self._factory = factory
        self._clock = clock
        self._rng = rng
        self._reopen_initial_s = reopen_initial_s
        self._reopen_max_s = reopen_max_s
        self._backoff = reopen_initial_s
        self._next_open_at = -math.inf
        self._port: Any = None
        self._lock = threading.Lock()
        #: Set when the port fails; cleared when it opens again.
        self.last_error: str | None = None
        #: Monotonic time of the last byte received (None: nothing yet).
        self.last_rx_at: float | None = None
        #: How many times the port was opened (a reopen tells the CP to retry at once).
        self.opens = 0
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def is_open(self) -> bool:
        """True while the port is open."""
        return self._port is not None

    def _open_port(self) -> Any:
        if self._port is not None:
            return self._port
        now = self._clock()
        if now < self._next_open_at:
            return None
        try:
            port = self._factory(self.url, self.baudrate, 0.0)
            port.reset_input_buffer()
        except _port_errors() as exc:
            self._failed(exc, "cannot open port")
            return None
        if self.opens:
            LOGGER.info("%s: port opened again", self.url)
        self._port = port
        self.opens += 1
        self.last_error = None
        self._backoff = self._reopen_initial_s
        return port

    def _failed(self, exc: BaseException, what: str) -> None:
        self._close_port()
        delay = self._backoff * (0.5 + 0.5 * self._rng())
        self._next_open_at = self._clock() + delay
        self._backoff = min(self._backoff * 2, self._reopen_max_s)
        reason = _reason(exc)
        if self.last_error is None:
            LOGGER.warning("%s: %s: %s; reopening in %.2f s", self.url, what, reason, delay)
        self.last_error = f"link down: {reason}"

    # -- the channel interface libosdp calls ---------------------------------------------
    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` received bytes, without waiting; ``b""`` when none."""
        with self._lock:
            port = self._open_port()
            if port is None:
                return b""
            try:
                data: bytes = port.read(max_bytes)
            except _port_errors() as exc:
                self._failed(exc, "read failed")
                return b""
        if data:
            self.last_rx_at = self._clock()
            self.bytes_in += len(data)
            LOGGER.debug("%s rx %s", self.url, data.hex(" "))
        return data

    def write(self, data: bytes) -> int:
        """Send ``data``; the number of bytes sent (0 while the port is down)."""
        with self._lock:
            port = self._open_port()
            if port is None:
                return 0
            try:
                sent = port.write(bytes(data))
            except _port_errors() as exc:
                self._failed(exc, "write failed")
                return 0
        LOGGER.debug("%s tx %s", self.url, bytes(data).hex(" "))
        n = len(data) if sent is None else int(sent)
        self.bytes_out += n
        return n

    def flush(self) -> None:
        """Drop unread input (libosdp calls this to resynchronize after an error)."""
        with self._lock:
            port = self._port
            if port is None:
                return
            try:
                port.reset_input_buffer()
            except _port_errors() as exc:
                self._failed(exc, "flush failed")

    # -- lifecycle -----------------------------------------------------------------------
    def reopen_if_due(self) -> bool:
        """Try to reopen a failed port when its backoff is over; True when open.

        libosdp stops touching the channel while it considers the PD offline, so the
        controller calls this instead of waiting for a ``read``.
        """
        with self._lock:
            return self._open_port() is not None

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except _port_errors():  # pragma: no cover - closing a dead port
                LOGGER.debug("%s: error closing port", self.url, exc_info=True)

    def close(self) -> None:
        """Close the port (a later ``read``/``write`` opens it again)."""
        with self._lock:
            self._close_port()
