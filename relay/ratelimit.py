"""One rate limiter per operator, shared by every worker and replica (contract §7.4).

Stora allows 10 requests a second and 60 a minute (stora-api §5; per operator, as the
sandbox reads the [ND], every request counted, ``/oauth2/token`` included).  The relay
keeps, per operator, the log of the requests it sent in the database
(:class:`~relay.db.models.StoraSend`) and takes a slot in one short transaction: no span
of :data:`SECOND_S` holds more than ``max_per_second`` of them and none of
:data:`MINUTE_S` more than ``max_per_minute`` (sliding windows: a token bucket or GCRA
would let a burst and the steady rate after it share one window, which Stora may count
as two limits' worth).  When no slot is free the answer is how long until one is.

Times come from the **database's** clock, never the worker's: replicas whose clocks
differ still read one timeline.  SQLite is embedded, so its clock is the machine's
(``julianday('now')``, milliseconds; ``unixepoch('subsec')`` needs SQLite 3.42 and the
bundled one may be older); PostgreSQL's is ``clock_timestamp()`` (``now()`` would be the
transaction's start).  On SQLite every transaction is ``BEGIN IMMEDIATE`` (relay/db/
engine.py), so two workers cannot read the same free slot; on PostgreSQL the operator's
row is locked ``FOR UPDATE`` for the same effect.

Two margins, each a named value below: the windows are :data:`WINDOW_MARGIN_S` longer than
Stora's, because a slot is timed when it is taken and Stora times the request when it
arrives (the jitter between the two must not squeeze two windows' worth into one); and
:data:`RESERVE` slots of each window are kept for urgent calls (the token refresh), so a
stream of Timeline Events can never starve the refresh that keeps them flowing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import delete, func, literal_column, select, update
from sqlalchemy.orm import Session

from relay.db.engine import Database
from relay.db.models import Operator, StoraSend
from relay.errors import RelayError
from relay.metrics import (
    RATE_LIMIT_REFUSALS,
    RATE_LIMIT_WAIT_SECONDS,
    RATE_LIMIT_WAITS,
    bounded,
)

__all__ = [
    "MINUTE_S",
    "RESERVE",
    "SECOND_S",
    "WINDOW_MARGIN_S",
    "RateLimitedError",
    "RateLimiter",
    "Window",
    "database_now",
    "retry_after",
]

#: Stora's windows (stora-api §5: "10 requests/second and 60 requests/minute").
SECOND_S: Final = 1.0
MINUTE_S: Final = 60.0
#: Added to each window: the most that the time from taking a slot to Stora receiving
#: the request may vary (a commit, a thread switch, the network).  Measured with relay,
#: sandbox and five gateways in one process at 40/s: median 6 ms, 99th percentile 18 ms,
#: worst 88 ms.  A quarter second leaves room for the Internet's jitter and costs a
#: fifth of the per-second burst only (the per-minute limit binds in steady use).
WINDOW_MARGIN_S: Final = 0.25
#: Slots of each window (of a limit of 2 or more) that only urgent calls may take.
RESERVE: Final = 1
#: How long an urgent or background caller may wait for a slot by default.
DEFAULT_MAX_WAIT_S: Final = 5.0
#: Julian day of the Unix epoch, and seconds in a day (SQLite's clock is Julian days).
#: The purpose of the broker's Timeline Events (counted on the operator's row).
TIMELINE_PURPOSE: Final = "timeline_event"
#: The purposes of background calls that wait for a slot (metrics labels).
WAIT_PURPOSES: Final = frozenset({"connect", "reconcile", "refresh", "timeline_event"})
_JULIAN_EPOCH: Final = 2440587.5
_DAY_S: Final = 86400.0


class RateLimitedError(RelayError):
    """No slot is free for ``wait_s`` seconds; ``limit`` is the limit of the window that
    refused and ``reset_at`` when a slot frees (epoch seconds, the database's clock)."""

    retryable = True

    def __init__(self, operator_id: str, wait_s: float, limit: int, reset_at: float) -> None:
        super().__init__(f"operator {operator_id}: Stora's rate limit is used up for "
                         f"{wait_s:.2f} s")
        self.operator_id = operator_id
        self.wait_s = wait_s
        self.limit = limit
        self.reset_at = reset_at


@dataclass(frozen=True, slots=True)
class Window:
    """No span of ``span_s`` seconds may hold more than ``limit`` requests."""

    span_s: float
    limit: int


def database_now(session: Session) -> float:
    """The database's clock, epoch seconds (SQLite: the machine's; PostgreSQL: the
    server's ``clock_timestamp()``)."""
    if session.get_bind().dialect.name == "sqlite":
        expr = (func.julianday(literal_column("'now'")) - _JULIAN_EPOCH) * _DAY_S
    else:
        expr = func.extract("epoch", func.clock_timestamp())
    value = session.execute(select(expr)).scalar_one()
    return float(value)


def _wait(times: Sequence[float], now: float, windows: Sequence[Window],
          urgent: bool) -> tuple[float, Window | None]:
    """Seconds until a slot is free (0: now) and the window that refused.

    With ``k`` sends inside a window whose allowance is ``n``, a slot frees when the
    ``(k - n + 1)``-th oldest of them leaves it.
    """
    wait, refused = 0.0, None
    for window in windows:
        allowed = window.limit if urgent or window.limit < 2 else window.limit - RESERVE
        inside = [t for t in times if t > now - window.span_s]
        if len(inside) >= allowed:
            frees = inside[len(inside) - allowed] + window.span_s - now
            if frees > wait or refused is None:
                wait, refused = max(frees, 1e-3), window
    return wait, refused


class RateLimiter:
    """Slots of Stora's per-operator budget, for every caller of every replica.

    ``windows`` defaults to Stora's two, each :data:`WINDOW_MARGIN_S` longer; tests may
    pass shorter ones.  ``sleep`` is how :meth:`acquire` waits (injectable).
    """

    def __init__(self, db: Database, *, max_per_second: int, max_per_minute: int,
                 windows: Sequence[Window] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_per_second < 1 or max_per_minute < 1:
            raise ValueError("rate limits are at least 1 request per window")
        self._db = db
        self.windows = tuple(windows) if windows is not None else (
            Window(SECOND_S + WINDOW_MARGIN_S, max_per_second),
            Window(MINUTE_S + WINDOW_MARGIN_S, max_per_minute))
        self._longest = max(w.span_s for w in self.windows)
        self._sleep = sleep

    def try_acquire(self, operator_id: str, purpose: str, *, urgent: bool = False) -> float:
        """Take a slot now and return 0, or take none and return the seconds to wait."""
        with self._db.session() as s:
            return self._take(s, operator_id, purpose, urgent)[0]

    def take(self, operator_id: str, purpose: str, *, urgent: bool = False) -> None:
        """Take a slot now or raise :class:`RateLimitedError` (the broker's way: answer 429)."""
        with self._db.session() as s:
            wait, refused, now = self._take(s, operator_id, purpose, urgent)
        if refused is not None:
            RATE_LIMIT_REFUSALS.inc()
            raise RateLimitedError(operator_id, wait, refused.limit, now + wait)

    def acquire(self, operator_id: str, purpose: str, *, urgent: bool = False,
                max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        """Take a slot, waiting up to ``max_wait_s`` for one; else :class:`RateLimitedError`
        (for background work and the token refresh, which may wait a little)."""
        deadline = time.monotonic() + max_wait_s
        while True:
            with self._db.session() as s:
                wait, refused, now = self._take(s, operator_id, purpose, urgent)
            if refused is None:
                return
            if time.monotonic() + wait > deadline:
                raise RateLimitedError(operator_id, wait, refused.limit, now + wait)
            RATE_LIMIT_WAITS.labels(bounded(purpose, WAIT_PURPOSES)).inc()
            RATE_LIMIT_WAIT_SECONDS.inc(wait)
            self._sleep(wait)

    def record(self, operator_id: str, purpose: str, count: int = 1) -> None:
        """Count ``count`` requests already sent (e.g. before the operator was known, on
        connect) as sent now: later than they were, so the windows err on the safe side."""
        with self._db.session() as s:
            self._lock_operator(s, operator_id)
            now = database_now(s)
            s.add_all(StoraSend(operator_id=operator_id, sent_at=now, purpose=purpose)
                      for _ in range(count))

    def in_window(self, operator_id: str, span_s: float) -> int:
        """How many sends of the operator the last ``span_s`` seconds hold (metrics)."""
        with self._db.session() as s:
            now = database_now(s)
            count = s.scalar(select(func.count()).select_from(StoraSend).where(
                StoraSend.operator_id == operator_id, StoraSend.sent_at > now - span_s))
            return int(count or 0)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _lock_operator(s: Session, operator_id: str) -> None:
        # PostgreSQL: workers taking slots of one operator queue here; SQLite's
        # BEGIN IMMEDIATE has already serialised the whole transaction.
        found = s.execute(select(Operator.id).where(Operator.id == operator_id)
                          .with_for_update()).scalar_one_or_none()
        if found is None:
            raise KeyError(operator_id)

    def _take(self, s: Session, operator_id: str, purpose: str,
              urgent: bool) -> tuple[float, Window | None, float]:
        self._lock_operator(s, operator_id)
        now = database_now(s)
        s.execute(delete(StoraSend).where(StoraSend.operator_id == operator_id,
                                          StoraSend.sent_at <= now - self._longest))
        times = s.scalars(select(StoraSend.sent_at)
                          .where(StoraSend.operator_id == operator_id)
                          .order_by(StoraSend.sent_at)).all()
        wait, refused = _wait(times, now, self.windows, urgent)
        if refused is None:
            s.add(StoraSend(operator_id=operator_id, sent_at=now, purpose=purpose))
        if purpose == TIMELINE_PURPOSE:  # the operator's row is locked already: no cost
            column = Operator.timeline_sent if refused is None else Operator.timeline_throttled
            s.execute(update(Operator).where(Operator.id == operator_id)
                      .values({column: column + 1}))
        return (0.0 if refused is None else wait), refused, now


def retry_after(wait_s: float) -> int:
    """``Retry-After`` for a wait: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))
