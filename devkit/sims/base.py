"""The part every controller simulator shares: serving replies on a pty, with faults.

A simulator is a *responder* (protocol code: bytes in, replies out, built from the
production frame classes) served by ``SimulatorServer`` on a ``PtyPort``.  Transport
faults are applied here, the same way for every protocol; device faults (a jammed lock,
a door held open) belong to each simulator's device model.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from devkit.pty import PtyPort

LOGGER = logging.getLogger(__name__)


class Responder(Protocol):
    """Protocol code of a simulated device."""

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the replies to send, in order."""


@dataclass(slots=True)
class TransportFaults:
    """Switchable transport faults; change the fields while the server runs.

    ``no_reply``: requests are read and acted on, replies are never sent.
    ``ignore_requests``: requests are dropped unread (the device is dead).
    ``reply_delay_s``: every reply is sent this late; the server sleeps in its thread, so
    queued requests wait behind it, like a slow device (not one late reply).
    ``corrupt``: one bit of every reply is flipped (the checksum no longer matches).
    ``garbage``: this many random bytes are sent before every reply.
    """

    no_reply: bool = False
    ignore_requests: bool = False
    reply_delay_s: float = 0.0
    corrupt: bool = False
    garbage: int = 0


class SimulatorServer:
    """Serves a ``Responder`` on a ``PtyPort`` in a background thread."""

    def __init__(
        self,
        port: PtyPort,
        responder: Responder,
        faults: TransportFaults | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.port = port
        self.responder = responder
        self.faults = faults or TransportFaults()
        self.chunks = 0
        self.replies = 0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def start(self) -> SimulatorServer:
        """Start serving."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.port.present:
                self._stop.wait(0.02)
                continue
            data = self.port.read(0.02)
            if not data or self.faults.ignore_requests:
                continue
            try:
                replies = self.responder.feed(data)
            except Exception:  # a simulator bug must not hang the test silently
                LOGGER.exception("simulator responder failed")
                continue
            self.chunks += 1
            for reply in replies:
                self._send(reply)

    def _send(self, reply: bytes) -> None:
        faults = self.faults
        if faults.no_reply:
            return
        if faults.reply_delay_s > 0:
            time.sleep(faults.reply_delay_s)
        out = bytearray(reply)
        if faults.corrupt and out:
            i = self._rng.randrange(len(out))
            out[i] ^= 1 << self._rng.randrange(8)
        if faults.garbage:
            out[0:0] = bytes(self._rng.randrange(256) for _ in range(faults.garbage))
        self.port.write(bytes(out))
        self.replies += 1

    def stop(self) -> None:
        """Stop serving (the port stays as it is)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
