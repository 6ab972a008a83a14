"""Waiting policies and the rate limiter: how long to wait, and never too many requests.

:func:`backoff_delay` (full jitter) for network errors and 5xx,
:func:`credential_retry_delay` for a refused credential, :func:`parse_retry_delay` for a
429's headers, and :class:`RateLimiter`, Stora's sliding 1 s and 60 s windows kept across
restarts.  Every timing here is named with where it comes from.  No ``httpx``: the CLI
may import this cheaply.  See docs/design/idempotency.md ("Rate limits and 429").
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from typing import Final

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "CREDENTIAL_RETRY_BASE_S",
    "CREDENTIAL_RETRY_CAP_S",
    "FUTURE_TOLERANCE_S",
    "LIMITER_MARGIN_S",
    "MAX_429_PAUSE_S",
    "MAX_LOCAL_WAIT_S",
    "RATE_LIMIT_FALLBACK_CAP_S",
    "RATE_LIMIT_FALLBACK_S",
    "RATE_LIMIT_JITTER_MAX_S",
    "Monotonic",
    "RateLimiter",
    "Sleep",
    "WallClock",
    "backoff_delay",
    "credential_retry_delay",
    "parse_retry_delay",
]

LOGGER = logging.getLogger(__name__)

#: Network errors and 5xx: full-jitter exponential backoff from 1 s up to 5 minutes
#: (fault matrix #18: "exponential backoff with full jitter and a cap").
BACKOFF_BASE_S: Final = 1.0
BACKOFF_CAP_S: Final = 300.0
#: A refused credential needs a person; retry it slowly (fault matrix #27: no tight loop).
CREDENTIAL_RETRY_BASE_S: Final = 60.0
CREDENTIAL_RETRY_CAP_S: Final = 900.0
#: The longest a 429's ``RateLimit-Reset``/``Retry-After`` is honoured (fault matrix #17:
#: "capped"); a wrong server clock must not silence the gateway for hours.
MAX_429_PAUSE_S: Final = 900.0
#: A 429 without a usable header: back off from this, with a floor so it is never tight.
RATE_LIMIT_FALLBACK_S: Final = 1.0
RATE_LIMIT_FALLBACK_CAP_S: Final = 60.0
#: Added on top of a 429's reset so gateways sharing an operator's limit spread out.
RATE_LIMIT_JITTER_MAX_S: Final = 1.0
#: Added to both windows: a request counts this much longer than the server counts it,
#: so uneven network latency cannot put one request too many into a server window.
LIMITER_MARGIN_S: Final = 0.1
#: Persisted send times this far in the future are believed (clock noise); later ones mean
#: the wall clock went back between runs and are taken as "sent just now".
FUTURE_TOLERANCE_S: Final = 2.0
#: post_event waits for the limiter itself up to this long; a longer wait is returned to
#: the caller as a Retry, so shutdown and other work are never blocked behind it.
MAX_LOCAL_WAIT_S: Final = 2.0

WallClock = Callable[[], float]
Monotonic = Callable[[], float]
Sleep = Callable[[float], None]


# -- waiting policies ---------------------------------------------------------------------
def backoff_delay(
    attempt: int,
    *,
    base_s: float = BACKOFF_BASE_S,
    cap_s: float = BACKOFF_CAP_S,
    rng: random.Random | None = None,
) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, base · 2**attempt)]``.

    Full jitter (rather than a fixed doubling) because many gateways behind one operator's
    limit recover from the same outage at the same moment; spreading them out is what
    lets the API recover.  ``attempt`` counts earlier failures (0 for the first retry).
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), 60))
    return (rng or random).uniform(0.0, ceiling)


def credential_retry_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """How long to wait before trying a refused credential again: 60 s doubling to 15 min.

    Jittered to 75–100 % of the step, never less, because a refused credential is fixed
    by a person and a near-zero draw would only hammer the token endpoint.
    """
    step = min(CREDENTIAL_RETRY_CAP_S, CREDENTIAL_RETRY_BASE_S * 2.0 ** min(max(attempt, 0), 30))
    return step * (rng or random).uniform(0.75, 1.0)


def parse_retry_delay(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds a 429 asks us to wait, from ``RateLimit-Reset`` and ``Retry-After``.

    ``RateLimit-Reset`` is UTC epoch seconds in Stora's docs (stora-api §5); the IETF
    draft makes it a delta, so a value below 10⁹ is read as seconds from now.
    ``Retry-After`` is seconds or an HTTP date.  With both, the later wins.  ``None``
    when neither gives a positive wait (missing, malformed or in the past): the caller
    then backs off on its own.  ``now`` is the wall clock, epoch seconds.
    """
    waits: list[float] = []
    reset = _header(headers, "ratelimit-reset")
    if reset is not None:
        try:
            value = float(reset)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            waits.append(value - now if value >= 1e9 else value)
    after = _header(headers, "retry-after")
    if after is not None:
        try:
            waits.append(float(after))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(after)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None and when.tzinfo is not None:
                waits.append(when.timestamp() - now)
    usable = [w for w in waits if math.isfinite(w) and w > 0]
    return min(max(usable), MAX_429_PAUSE_S) if usable else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value.strip()
    return None


# -- rate limiting --------------------------------------------------------------------------
class RateLimiter:
    """Never more than ``max_per_second`` requests in any 1 s nor ``max_per_minute`` in 60 s.

    Windows slide, as Stora's sandbox counts them: a send at ``t`` counts against every
    later moment before ``t + window`` (plus :data:`LIMITER_MARGIN_S`).  Times are kept on
    the ``monotonic`` clock, so a wall-clock step neither stalls nor bursts sending
    (fault matrix #39), and converted to wall-clock epoch seconds only to persist:
    :meth:`history` is what the caller stores, and a new limiter built with it after a
    restart keeps honouring the windows (fault matrix #42: a crash loop does not flood).
    ``on_record`` is called with the wall time of each send, for callers that persist
    sends one by one.  Thread-safe.
    """

    def __init__(
        self,
        max_per_second: int,
        max_per_minute: int,
        history: Iterable[float] = (),
        *,
        clock: WallClock = time.time,
        monotonic: Monotonic = time.monotonic,
        sleep: Sleep = time.sleep,
        margin_s: float = LIMITER_MARGIN_S,
        on_record: Callable[[float], None] | None = None,
    ) -> None:
        if max_per_second < 1 or max_per_minute < 1:
            raise ValueError("rate limits must allow at least one request per window")
        if not 0 <= margin_s < 1:
            raise ValueError("margin_s must be in [0, 1)")
        self.max_per_second = max_per_second
        self.max_per_minute = max_per_minute
        self._windows = ((1.0 + margin_s, max_per_second), (60.0 + margin_s, max_per_minute))
        self._horizon = 60.0 + margin_s
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_record = on_record
        self._lock = threading.Lock()
        self._paused_until = -math.inf
        self._sends: list[float] = self._load(history)

    def _load(self, history: Iterable[float]) -> list[float]:
        """Persisted wall times -> monotonic times, clamping those from the future."""
        wall, mono = self._clock(), self._monotonic()
        sends: list[float] = []
        clamped = 0
        for stamp in history:
            if not math.isfinite(stamp):
                continue
            t = stamp
            if t > wall + FUTURE_TOLERANCE_S:
                # The wall clock went back since this was written.  Dropping the entry
                # could let a burst through; "sent just now" costs one window at most.
                clamped += 1
                t = wall
            if t > wall - self._horizon:
                sends.append(mono - (wall - t))
        if clamped:
            LOGGER.warning(
                "%d persisted request time(s) lie in the future (wall clock stepped back?); "
                "counted as sent now",
                clamped,
            )
        return sorted(sends)

    def _delay_locked(self, now: float) -> float:
        cut = bisect_right(self._sends, now - self._horizon)
        if cut:
            del self._sends[:cut]
        wait = max(0.0, self._paused_until - now)
        for span, limit in self._windows:
            first = bisect_right(self._sends, now - span)
            inside = len(self._sends) - first
            if inside >= limit:
                # A slot frees when the (inside - limit + 1)-th oldest leaves the window.
                wait = max(wait, self._sends[first + inside - limit] + span - now)
        return wait

    def delay(self) -> float:
        """Seconds to wait before the next request may go (0.0: now)."""
        with self._lock:
            return self._delay_locked(self._monotonic())

    def try_acquire(self) -> float:
        """Take a slot now and return 0.0, or take nothing and return the wait."""
        with self._lock:
            now = self._monotonic()
            wait = self._delay_locked(now)
            if wait > 0:
                return wait
            self._sends.append(now)
            self._sends.sort()  # monotonic, but a caller's fake clock may interleave
            wall = self._clock()
        if self._on_record is not None:
            self._on_record(wall)
        return 0.0

    def acquire(self, max_wait_s: float = math.inf) -> float:
        """Wait (with the injected ``sleep``) for a slot and take it; 0.0 when taken.

        Gives up without sleeping when the wait would exceed ``max_wait_s`` and returns
        that wait, so the caller can come back later instead of blocking.
        """
        waited = 0.0
        while True:
            wait = self.try_acquire()
            if wait <= 0:
                return 0.0
            if waited + wait > max_wait_s:
                return wait
            self._sleep(wait)
            waited += wait

    def pause_for(self, seconds: float) -> None:
        """No request for ``seconds`` (a 429's instruction); a longer pause stands."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        with self._lock:
            until = self._monotonic() + min(seconds, MAX_429_PAUSE_S)
            self._paused_until = max(self._paused_until, until)

    def pause_until(self, epoch: float) -> None:
        """No request before wall-clock ``epoch`` (``RateLimit-Reset``), capped."""
        self.pause_for(epoch - self._clock())

    def history(self) -> list[float]:
        """Wall-clock epoch times of the sends that still count: what to persist."""
        with self._lock:
            now = self._monotonic()
            self._delay_locked(now)  # prunes
            wall = self._clock()
            return [wall - (now - t) for t in self._sends]
