"""The link's counters and last events (:class:`LinkStats`), for ``status`` and tests."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Final

__all__ = ["LinkStats"]

#: How many recent reconnect delays stats() reports.
_DELAYS_KEPT: Final = 32


class LinkStats:
    """Thread-safe counters of one link; :meth:`snapshot` copies them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delays: deque[float] = deque(maxlen=_DELAYS_KEPT)
        self._values: dict[str, Any] = {
            "connects": 0,
            "connect_attempts": 0,
            "connect_failures": 0,
            "disconnects": 0,
            "reconnect_delays": None,  # kept in _delays; here for the snapshot's order
            "last_connect_at": None,
            "last_disconnect_at": None,
            "last_disconnect_reason": None,
            "last_connect_error": None,
            "session_present": None,
            "subscribe_failures": 0,
            "liveness_failures": 0,
            "liveness_last_detect_s": None,
            "liveness_rtt_s": None,
            "inbound_dropped": 0,
            "inbound_invalid": 0,
            "handled": 0,
            "handler_errors": 0,
            "published": 0,
            "publish_refused": 0,
            "publish_oversize": 0,
            "inbound_oversize": 0,
        }

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``key``."""
        with self._lock:
            self._values[key] += n

    def set(self, **values: Any) -> None:
        """Record the last events ``values``."""
        with self._lock:
            self._values.update(values)

    def get(self, key: str) -> Any:
        """The value of ``key`` now."""
        with self._lock:
            return self._values[key]

    def swap(self, key: str, value: Any) -> Any:
        """Set ``key`` to ``value``; the value it had."""
        with self._lock:
            old, self._values[key] = self._values[key], value
        return old

    def add_delay(self, delay: float) -> None:
        """Remember one reconnect delay (the most recent ones are kept)."""
        with self._lock:
            self._delays.append(delay)

    def snapshot(self) -> dict[str, Any]:
        """A copy of every value, with ``reconnect_delays`` oldest first."""
        with self._lock:
            snapshot = dict(self._values)
            snapshot["reconnect_delays"] = list(self._delays)
        return snapshot
