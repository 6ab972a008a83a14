"""The one reconnect policy of every MQTT connection: capped exponential backoff with
full jitter.

The delay before reconnect ``n`` (0-based) is ``uniform(0, min(cap, initial * 2**n))``
("Exponential Backoff And Jitter", AWS Architecture Blog, 2015), so a site-wide broker
restart does not bring every client back in the same second.  ``n`` counts consecutive
failed or short-lived connections; a connection that stayed up long enough starts the
series again (the caller says when, :meth:`Backoff.reset`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = ["MAX_EXPONENT", "Backoff", "full_jitter_delay"]

#: Beyond 2**60 the cap has long won; bounding the exponent avoids float overflow.
MAX_EXPONENT: Final = 60


def full_jitter_delay(attempt: int, initial: float, cap: float,
                      rng: Callable[[], float]) -> float:
    """The delay before reconnect ``attempt`` (0-based): ``rng() * min(cap, initial * 2**n)``.

    ``rng`` returns a float in ``[0, 1)``; it is injected so tests can pin it.
    """
    ceiling = min(cap, initial * 2.0 ** min(max(attempt, 0), MAX_EXPONENT))
    return rng() * ceiling


class Backoff:
    """The series of reconnect delays of one connection: each :meth:`next_delay` doubles
    the ceiling of the one before (``initial``, 2 × ``initial``, … up to ``cap``) until
    :meth:`reset`."""

    def __init__(self, initial: float, cap: float, rng: Callable[[], float]) -> None:
        self.initial = initial
        self.cap = cap
        self._rng = rng
        self._exponent = 0

    def next_delay(self) -> float:
        """The next delay, in seconds; the ceiling of the one after it doubles."""
        delay = full_jitter_delay(self._exponent, self.initial, self.cap, self._rng)
        self._exponent = min(self._exponent + 1, MAX_EXPONENT)
        return delay

    def reset(self) -> None:
        """Start the series again at ``initial`` (a connection stayed up)."""
        self._exponent = 0
