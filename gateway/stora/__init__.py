"""The HTTP side of Timeline Events: tokens, rate limits and ``POST /timeline/events``.

Every action the gateway takes must reach Stora as one Timeline Event, exactly once as
Stora sees it (contract §6), over a network that fails and an API that answers 401, 429
and 500.  The outbox (``gateway/store/``) keeps the events durably and drives retries;
this module decides, for one attempt, what was sent, what came back and what the next
attempt must be.  It never sleeps longer than :data:`MAX_LOCAL_WAIT_S` and keeps no
per-event state.  What must survive a restart the caller persists: the
:class:`IdempotencyKey` that every outcome carries (store it before the next attempt),
and the send times of :meth:`RateLimiter.history` (or its ``on_record`` callback).

Pieces::

    TokenSource             token() / invalidate(token): where the Bearer token comes from
    ├── ClientCredentialsTokens  POST stora.token_url (stora-api §2.2), refreshed ahead
    └── FileTokens               stora.token_file, re-read when it changes ("static"/"broker")
    RateLimiter             sliding 1 s and 60 s windows across restarts, plus 429 pauses
    StoraClient.post_event  one delivery attempt -> Delivered | Retry | Dead | AuthFailed
    backoff_delay, credential_retry_delay   the two waiting policies

Idempotency key policy
----------------------
Stora stores the *first* response to each ``Idempotency-Key`` (2xx or error, 400 and 500
included) for 24 hours and replays it verbatim (stora-api §5).  Two ways to fail follow:
reuse a key whose first answer was an error and every retry replays that error for a
day; change the key after the server may have created the event and it is created twice.
So a key is a promise about one outcome, and the rule is:

    **Keep the key until Stora has said, under that key, that nothing was created;
    only then move to the next one.**

The key is ``f"{external_id}.{generation}"`` (:class:`IdempotencyKey`); ``generation``
starts at 0 and only grows, and every outcome carries the key the next attempt must use.
Generations are deterministic, so a crash that loses a rotation only costs one replayed
error: the old key replays its error and the client rotates to the same next key again.

What each answer proves, and what follows:

==========================================  ==========  =================================
answer                                      next key    why
==========================================  ==========  =================================
2xx (fresh or a replay of an earlier 2xx)   (done)      created once; a replay is success
no answer: connect refused, pool timeout    same        nothing reached the server
no answer after sending: read/write         same,       the server may have committed;
timeout, connection dropped, over the       marked      only the same key can reveal it
deadline; a 5xx *without* Stora's §6        unanswered  (a replayed 2xx), and a proxy's
envelope (a proxy's 502/503/504)                        5xx says nothing about the app
429                                         same        answered in front of the store,
                                                        never stored (stora-api §5)
408                                         same        the request was not read whole
a 5xx *with* Stora's §6 error envelope,     rotate      the app answered and its first
or any §6 error of ``type: api_error``                  answer under this key is that
(``400 api_error`` included)                            failure, so nothing was created
                                                        under it; the same key would only
                                                        replay it for 24 h
409 while the key is marked unanswered      same        "a request with this key is in
and younger than ``IN_PROGRESS_GRACE_S``                progress": our lost attempt is
                                                        still running
400, 403, 404, 406, 409, 422, other 4xx     (dead)      the request itself is refused;
                                                        keep code/message/details
3xx                                         (dead,      a moved or wrong base_url (a
                                            redirect)   front proxy's answer); never
                                                        followed, the token stays here
401                                         see below
==========================================  ==========  =================================

A :class:`Dead` for 403 (a missing scope), 404 ``invalid_endpoint`` (a wrong
``base_url``) or a 3xx (a moved one) is about the configuration, not the event: every
event will get it, so the caller should alarm and stop rather than dead-letter the whole
queue (``outbox.is_config_problem``).

**401.**  Whether Stora authenticates before or after its idempotency layer is not
documented.  If after (as the sandbox does by default, ``store_unauthorized``), the 401
is stored: retrying the same key replays it forever, and the 401 proves nothing was
created (any earlier commit under the key would have been replayed instead).  If before,
401s are never stored: the same key after a refresh gets the real answer, while a new key
could duplicate an event whose earlier answer was lost.  So, after a 401 the token is
invalidated and renewed (one refresh for any number of concurrent 401s), then:

* the key was never unanswered (every attempt under it got a non-2xx answer, so nothing
  was created under it whatever the server's layering): retry once with the **next**
  key;
* the key is marked unanswered: retry once with the **same** key (reveals a lost commit
  if 401s are not stored); if that is a 401 too, retry once with the **next** key (a
  stored 401 proves nothing was created; an unstored one means the fresh token is
  refused, so the new key is refused as well and creates nothing);
* a 401 to the next key is a refused credential: :class:`AuthFailed` with that key.  The
  caller stops posting, raises an alarm and retries after :func:`credential_retry_delay`.

Residual risks, stated honestly:

* **A 5xx that did commit.**  If Stora's app created the event and then answered 500,
  rotating creates it again.  Nothing a client sees can tell; Stora documents 500 as a
  failure and stores it, so this would be a Stora bug.
* **The 24-hour window.**  A stored 2xx is replayed for 24 hours from when it was stored.
  An unanswered key retried later than that may create the event again.  The key records
  when it first went unanswered (``unanswered_since``, wall clock) and
  :meth:`StoraClient.post_event` refuses to send it after :data:`REPLAY_SAFE_S`
  (24 h less a margin), returning :class:`Dead` with code ``replay_window_expired`` so a
  person decides (the event may or may not be at Stora).  The caller must therefore
  retry unanswered keys well within a day; the drain's backoff cap keeps retries
  minutes apart.  A wall clock stepped back by more than the margin defeats the check.
* **401 with auth in front of idempotency, a lost commit and a refused fresh token at
  once.**  Then the key is rotated while the event may exist; if the credential is later
  restored, the next key creates it again.  It takes all three together.
* **A key reused with a different body** gets the stored answer of the first body
  (replayed verbatim); :meth:`StoraClient.post_event` refuses a body whose
  ``external.id`` differs from the key's, and the caller must send the body of the
  first attempt under each key (``gateway/outbox/timeline.py``).

Rate limits and 429
-------------------
Stora allows 10 requests a second and 60 a minute (stora-api §5); the sandbox counts the
token endpoint too and slides its windows, so :class:`RateLimiter` does the same, for
every request this module makes, and adds :data:`LIMITER_MARGIN_S` to each window so
uneven network latency (up to that much) cannot bunch two requests into one server
window; a larger jitter at worst earns a 429, which is then obeyed.  A 429 pauses the
limiter until ``RateLimit-Reset`` (epoch seconds) or ``Retry-After`` (seconds or an HTTP
date), whichever is later, capped at :data:`MAX_429_PAUSE_S`, plus jitter; a 429 with
neither header, or one in the past, backs off exponentially instead: never a tight loop.

Tokens
------
``client_credentials`` tokens live 2 hours (stora-api §2.2) and are refreshed when less
than ``max(60 s, 10 %)`` of their life remains, under a lock so concurrent callers wait for
the one refresh in flight.  A failed refresh keeps using the current token while it is
valid and holds further attempts off (:func:`backoff_delay`), so the token endpoint never
sees a tight loop either.  The client secret is read from its file at each refresh (a
rotated secret needs no restart) and never logged or put in an exception.  ``static`` and
``broker`` tokens come from ``token_file``, re-read when the file changes or after a 401.

A token request is bounded like an event post (gateway/stora/http.py): its answer is
read up to :data:`MAX_TOKEN_RESPONSE_BYTES` and the whole exchange ends within
:data:`TOKEN_DEADLINE_S`, because the token lock is held across it and every event waits
behind it.  :meth:`TokenSource.health` says whether a refresh is in flight and since
when one has been failing, for ``status`` and the drainer's ``timeline_token`` alarm.

What comes back
---------------
Nothing from Stora goes unbounded into what the agent stores, logs or publishes: every
string of an error (``code``, ``message``, ``details``, ``request_id``; a token
endpoint's ``error`` and ``error_description``; a redirect's ``Location``) is cut to
:data:`~gateway.stora.http.MAX_TEXT_CHARS` and made one line when it is parsed, at most
:data:`MAX_DETAILS` details are kept, and an event id is kept only in the shape ids
have.  A body nested too deep to parse is "no Stora error body", not a crash.

A **3xx** is never followed (it would carry the token elsewhere): it is a
:class:`Dead` with code ``redirect``, which the outbox treats as the configuration (a
moved or wrong ``base_url``), not the event; at the token endpoint it is a
:class:`CredentialRejected` naming ``token_url``.

The server's clock
------------------
``on_server_date`` (optional) is called with the ``Date`` of every response that came
over ``https://`` (or ``http://`` from a loopback host, for tests), token answers
included, as a second source of time for the clock (issue 11 item 7);
:meth:`StoraClient.probe_server_time` asks for one when nothing is being posted.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

import httpx

from gateway.config import StoraConfig
from gateway.errors import GatewayError, one_line
from gateway.stora.http import (
    USER_AGENT,
    Answer,
    DeadlineExceeded,
    ServerDate,
    cap_text,
    exchange,
    safe_id,
)
from gateway.stora.http import make_http_client as _make_http_client

__all__ = [
    "BACKOFF_CAP_S",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENCY_TTL_S",
    "MAX_DETAILS",
    "MAX_TOKEN_RESPONSE_BYTES",
    "REPLAY_SAFE_S",
    "USER_AGENT",
    "AuthFailed",
    "ClientCredentialsTokens",
    "CredentialRejected",
    "Dead",
    "Delivered",
    "ErrorDetail",
    "FileTokens",
    "IdempotencyKey",
    "PostOutcome",
    "RateLimiter",
    "Retry",
    "StoraClient",
    "StoraError",
    "TokenHealth",
    "TokenSource",
    "TokenUnavailable",
    "backoff_delay",
    "credential_retry_delay",
    "make_http_client",
    "parse_retry_delay",
]

LOGGER = logging.getLogger(__name__)

# -- timings, each with where it comes from ------------------------------------------------
#: stora-api §5: a stored response is replayed for 24 hours, then the key is new.
IDEMPOTENCY_TTL_S: Final = 86_400.0
#: Sending an unanswered key later than this could create its event twice (module doc);
#: one hour short of the TTL covers clock drift and a retry that is itself slow.
REPLAY_SAFE_S: Final = IDEMPOTENCY_TTL_S - 3_600.0
#: A 409 on a key whose earlier attempt went unanswered is read as "still in progress"
#: for this long; later it is the stored answer and the event is dead-lettered.
IN_PROGRESS_GRACE_S: Final = 600.0
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
#: stora-api §2.2: tokens live 2 hours; refresh when less than max(60 s, 10 %) remains.
REFRESH_AHEAD_MIN_S: Final = 60.0
REFRESH_AHEAD_FRACTION: Final = 0.1
DEFAULT_TOKEN_LIFETIME_S: Final = 7_200.0
#: A token this close to its expiry is not used while a refresh is failing.
EXPIRY_SKEW_S: Final = 5.0
#: Explicit httpx phase timeouts (fault matrix #19); no default is relied upon.
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=5.0, read=15.0, write=10.0, pool=5.0)
#: The whole exchange, body included, ends by then: a server that drips a byte just
#: often enough to beat the read timeout is cut off here.
DEFAULT_DEADLINE_S: Final = 30.0
#: A Timeline Event reply is a few KiB; more is not read.
MAX_RESPONSE_BYTES: Final = 1 << 20
#: A token answer is five short fields (stora-api §2.2), a few hundred bytes; 64 KiB
#: leaves room for any extension and bounds memory (a 300 MiB answer once took the
#: agent from 28 to 693 MiB).
MAX_TOKEN_RESPONSE_BYTES: Final = 64 * 1024
#: The whole token exchange, connect to last byte.  The token lock is held across it and
#: the event that needs the token waits behind it, so it is shorter than an event's
#: deadline: a healthy endpoint answers in well under a second, and a stuck refresh is
#: over (and, after ``outbox.TOKEN_ALARM_AFTER_S``, an alarm) within a minute.
TOKEN_DEADLINE_S: Final = 15.0
#: ``GET base_url`` for the server's Date: a Date that took longer than this to arrive
#: says little about now, and the clock's thread should not wait longer.
PROBE_DEADLINE_S: Final = 10.0
#: The probe's answer is not needed; it is read (this much at most) only so that the
#: connection can be kept alive for the next request.
MAX_PROBE_BYTES: Final = 64 * 1024
#: At most this many ``details`` of an error are kept (each capped like every string):
#: enough to say what was wrong, small enough for a dead-letter row and ``outbox --dead``.
MAX_DETAILS: Final = 5

WallClock = Callable[[], float]
Monotonic = Callable[[], float]
Sleep = Callable[[float], None]


# -- errors --------------------------------------------------------------------------------
class StoraError(GatewayError):
    """Base of the errors of the Stora client (``gateway.errors`` tree)."""


class CredentialRejected(StoraError):  # noqa: N818 - the name says what to do
    """Stora refused the credential: a person must fix it; retry only slowly.

    Raised for a token endpoint 400/401 (``invalid_client``, ``invalid_grant``, …), an
    unreadable secret or token file, or a 401 to a token just renewed.  ``retry_after_s``
    is the earliest the source will try again.  The message never holds a secret.
    """

    retryable = False

    def __init__(self, message: str, retry_after_s: float = CREDENTIAL_RETRY_BASE_S) -> None:
        super().__init__(one_line(message))
        self.retry_after_s = retry_after_s


class TokenUnavailable(StoraError):  # noqa: N818 - the name says what to do
    """No token now for a passing reason (network, 5xx, 429): retry after ``retry_after_s``."""

    retryable = True

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(one_line(message))
        self.retry_after_s = retry_after_s


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


# -- tokens ---------------------------------------------------------------------------------
class TokenSource(Protocol):
    """Where the Bearer token comes from.

    ``token()`` returns a token to use now, or raises :class:`CredentialRejected` (a
    person must act) or :class:`TokenUnavailable` (try later).  ``invalidate(token)``
    says Stora answered 401 to ``token``; it only has an effect while ``token`` is still
    the current one, so N concurrent 401s cause one renewal.
    """

    @property
    def kind(self) -> str:
        """``client_credentials``, ``static`` or ``broker``, for messages."""
        ...

    def token(self) -> str:
        """A token to send now."""
        ...

    def invalidate(self, token: str) -> None:
        """Stora refused ``token``: renew it at the next :meth:`token`."""
        ...

    def health(self) -> TokenHealth:
        """Whether a refresh is in flight or failing (never blocks on one in flight)."""
        ...


@dataclass(frozen=True, slots=True)
class TokenHealth:
    """How the token source is doing, for ``status`` and the drainer's alarm.

    ``refreshing_for_s``: a token request is in flight, for that long.
    ``failing_for_s``: refreshes have failed since that long ago (from the start of the
    first failed one), with ``last_error`` saying why; ``None`` once one succeeds.
    """

    refreshing_for_s: float | None = None
    failing_for_s: float | None = None
    last_error: str | None = None

    @property
    def state(self) -> str:
        """``failing``, ``refreshing`` or ``ok``."""
        if self.failing_for_s is not None:
            return "failing"
        return "refreshing" if self.refreshing_for_s is not None else "ok"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data for ``status``."""
        return {
            "state": self.state,
            "refreshing_for_s": _round(self.refreshing_for_s),
            "failing_for_s": _round(self.failing_for_s),
            "last_error": self.last_error,
        }


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


@dataclass(slots=True)
class _Issued:
    value: str = field(repr=False)
    expires_at: float  # monotonic
    refresh_at: float  # monotonic


class ClientCredentialsTokens:
    """OAuth Client Credentials (stora-api §2.2): JSON body to ``token_url``.

    One refresh at a time: :meth:`token` holds a lock across the request, so concurrent
    callers wait and then share its result; the request ends within ``deadline_s``
    and reads at most :data:`MAX_TOKEN_RESPONSE_BYTES`.  Requests go through ``limiter``
    because Stora's limits (and the sandbox's) count the token endpoint too.
    ``server_date`` sees every answer's ``Date`` (:class:`StoraClient` sets its own when
    none is given).
    """

    kind: ClassVar[str] = "client_credentials"

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        secret_file: Path | str,
        scope: str,
        http: httpx.Client,
        limiter: RateLimiter | None = None,
        monotonic: Monotonic = time.monotonic,
        clock: WallClock = time.time,
        rng: random.Random | None = None,
        deadline_s: float = TOKEN_DEADLINE_S,
        server_date: ServerDate | None = None,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self.secret_file = Path(secret_file)
        self.scope = scope
        self._http = http
        self._limiter = limiter
        self._monotonic = monotonic
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._current: _Issued | None = None
        self._stale = False
        self._hold_until = -math.inf
        self._held: StoraError | None = None
        self._failures = 0
        self._rejections = 0
        self.deadline_s = deadline_s
        self.server_date = server_date
        # Read by health() from other threads while token() holds _lock for a refresh.
        self._health_lock = threading.Lock()
        self._refreshing_since: float | None = None
        self._failing_since: float | None = None
        self._last_failure: str | None = None
        #: Token requests made, for tests and the status command.
        self.requests = 0

    def __repr__(self) -> str:
        return (
            f"ClientCredentialsTokens(token_url={self.token_url!r}, "
            f"client_id={self.client_id!r})"
        )

    def _usable(self, now: float) -> str | None:
        cur = self._current
        if cur is not None and not self._stale and now < cur.expires_at - EXPIRY_SKEW_S:
            return cur.value
        return None

    def token(self) -> str:
        """The current token, refreshed first when due (ahead of expiry, or after a 401)."""
        with self._lock:
            now = self._monotonic()
            cur = self._current
            if cur is not None and not self._stale and now < cur.refresh_at:
                return cur.value
            if now < self._hold_until:
                usable = self._usable(now)
                if usable is not None:
                    return usable
                assert self._held is not None
                raise _with_delay(self._held, self._hold_until - now)
            if self._limiter is not None:
                wait = self._limiter.acquire(MAX_LOCAL_WAIT_S)
                if wait > 0:  # not a failure: nothing was asked, nothing is held
                    usable = self._usable(now)
                    if usable is not None:
                        return usable
                    raise TokenUnavailable("rate limit: token request deferred", wait)
            try:
                issued = self._fetch(now)
            except CredentialRejected as exc:
                self._rejections += 1
                exc.retry_after_s = credential_retry_delay(self._rejections - 1, rng=self._rng)
                self._hold(now, exc)
                self._current, self._stale = None, False
                self._note_failure(now, exc)
                raise
            except TokenUnavailable as exc:
                self._failures += 1
                floor = max(exc.retry_after_s, RATE_LIMIT_FALLBACK_S)
                exc.retry_after_s = max(floor, backoff_delay(self._failures - 1, rng=self._rng))
                self._hold(now, exc)
                self._note_failure(now, exc)
                usable = self._usable(now)
                if usable is not None:
                    LOGGER.warning("token refresh failed (%s); the current token is used", exc)
                    return usable
                raise
            self._current, self._stale = issued, False
            self._failures = self._rejections = 0
            self._hold_until, self._held = -math.inf, None
            with self._health_lock:
                self._failing_since = self._last_failure = None
            return issued.value

    def _note_failure(self, started: float, exc: StoraError) -> None:
        """A refresh that began at ``started`` (monotonic) failed with ``exc``."""
        with self._health_lock:
            if self._failing_since is None:
                self._failing_since = started
            self._last_failure = str(exc)

    def health(self) -> TokenHealth:
        """Whether a refresh is in flight, and since when refreshes have been failing."""
        now = self._monotonic()
        with self._health_lock:
            since, failing = self._refreshing_since, self._failing_since
            return TokenHealth(
                refreshing_for_s=None if since is None else max(0.0, now - since),
                failing_for_s=None if failing is None else max(0.0, now - failing),
                last_error=self._last_failure,
            )

    def _hold(self, now: float, exc: StoraError) -> None:
        delay = getattr(exc, "retry_after_s", BACKOFF_BASE_S)
        self._hold_until, self._held = now + delay, exc

    def invalidate(self, token: str) -> None:
        """Stora answered 401 to ``token``: the next :meth:`token` refreshes, once."""
        with self._lock:
            if self._current is not None and self._current.value == token:
                self._stale = True
                # A 401 is new information: an earlier refresh failure need not hold.
                self._hold_until, self._held = -math.inf, None

    def _fetch(self, now: float) -> _Issued:
        """One token request (a limiter slot is taken); every failure is a StoraError."""
        secret = _read_secret(self.secret_file, "client_secret_file")
        self.requests += 1
        body = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": secret,
            "scope": self.scope,
        }
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        with self._health_lock:
            self._refreshing_since = self._monotonic()
        try:
            answer = exchange(
                self._http, "POST", self.token_url, content=data, headers=headers,
                deadline_s=self.deadline_s, limit=MAX_TOKEN_RESPONSE_BYTES,
                on_response=self.server_date.observe if self.server_date else None,
            )
        except DeadlineExceeded:
            raise TokenUnavailable(
                f"token endpoint gave no complete answer within {self.deadline_s:g} s",
                BACKOFF_BASE_S,
            ) from None
        except httpx.HTTPError as exc:
            # Only the class name: the exception holds the request, secret included.
            raise TokenUnavailable(
                f"token endpoint unreachable: {type(exc).__name__}", BACKOFF_BASE_S
            ) from None
        finally:
            with self._health_lock:
                self._refreshing_since = None
        return self._judge(answer, now)

    def _judge(self, answer: Answer, now: float) -> _Issued:
        """The token in ``answer``, or the StoraError that says why there is none."""
        status = answer.status
        if answer.unread is not None:
            raise TokenUnavailable(
                f"token endpoint answered {status} with {answer.unread}", BACKOFF_BASE_S
            )
        doc = _json_or_none(answer.body)
        if status == 200:
            return self._parse(doc, now)
        if 300 <= status < 400:
            where = cap_text(answer.headers.get("location", "nowhere"))
            raise CredentialRejected(
                f"token endpoint redirects ({status} to {where}); redirects are not "
                "followed: check [stora] token_url"
            )
        code = f"HTTP {status}"
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            code = cap_text(doc["error"])  # RFC 6749 §5.2
            described = doc.get("error_description")
            if isinstance(described, str) and described:
                code += f" ({cap_text(described)})"
        if status == 429:
            wait = parse_retry_delay(answer.headers, self._clock())
            if wait is not None and self._limiter is not None:
                self._limiter.pause_for(wait)
            raise TokenUnavailable("token endpoint rate limited (429)", wait or BACKOFF_BASE_S)
        if status in (400, 401, 403):
            raise CredentialRejected(f"token endpoint refused the client credentials: {code}")
        raise TokenUnavailable(f"token endpoint failed: {code}", BACKOFF_BASE_S)

    def _parse(self, doc: object, now: float) -> _Issued:
        if not isinstance(doc, dict):
            raise TokenUnavailable("token endpoint answered 200 without JSON", BACKOFF_BASE_S)
        value = doc.get("access_token")
        kind = doc.get("token_type", "Bearer")
        life = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME_S)
        if (
            not isinstance(value, str)
            or not _TOKEN_RE.fullmatch(value)
            or not isinstance(kind, str)
            or kind.lower() != "bearer"
            or isinstance(life, bool)
            or not isinstance(life, int | float)
            or not math.isfinite(life)
            or life <= 0
        ):
            raise TokenUnavailable("token endpoint answered an unusable token", BACKOFF_BASE_S)
        # Ahead by max(60 s, 10 %), but never more than half the life: a server handing
        # out 30-second tokens must not make every request a refresh.
        ahead = min(max(REFRESH_AHEAD_MIN_S, REFRESH_AHEAD_FRACTION * life), life / 2)
        expires_at = now + float(life)  # from before the request: errs early
        return _Issued(value, expires_at, expires_at - ahead)


#: RFC 6750 §2.1 ``b64token``, at most 4 KiB: a token goes into every request's headers,
#: so one that could split a header, or swell every request, is refused.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]{1,4096}=*")


class FileTokens:
    """A Bearer token kept in a file: ``static`` (an operator token) or ``broker``.

    For ``broker`` the base URL is the relay's and the file holds the gateway's device
    token for it (contract §1).  The file is re-read whenever its size, time or inode
    changes, and after a 401, so a rotated token needs no restart.  The first line that
    is neither blank nor a ``#`` comment is the token.
    """

    def __init__(self, path: Path | str, kind: str = "static") -> None:
        if kind not in ("static", "broker"):
            raise ValueError(f"kind must be 'static' or 'broker', not {kind!r}")
        self.kind = kind
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._value: str | None = None
        self._force = True

    def __repr__(self) -> str:
        return f"FileTokens({str(self.path)!r}, kind={self.kind!r})"

    def token(self) -> str:
        """The token in the file, re-read if the file changed."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as exc:
                raise CredentialRejected(
                    f"cannot read token_file {self.path}: {exc.strerror or exc}"
                ) from None
            signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            if self._force or signature != self._signature or self._value is None:
                self._value = _first_token(_read_secret(self.path, "token_file"), self.path)
                self._signature, self._force = signature, False
            return self._value

    def invalidate(self, token: str) -> None:
        """Stora answered 401 to ``token``: re-read the file at the next :meth:`token`."""
        with self._lock:
            if token == self._value:
                self._force = True

    def health(self) -> TokenHealth:
        """Always "ok": a file is read, not refreshed (a bad one is a refused credential)."""
        return TokenHealth()


def _read_secret(path: Path, key: str) -> str:
    """The stripped content of a secret file; the message names the file, never the content."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise CredentialRejected(f"cannot read {key} {path}: {reason}") from None
    if not text:
        raise CredentialRejected(f"{key} {path} is empty")
    return text


def _first_token(text: str, path: Path) -> str:
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            return line
    raise CredentialRejected(f"token_file {path} holds no token")


def _with_delay(exc: StoraError, delay: float) -> StoraError:
    """A fresh copy of a held error with the remaining delay (raised again later)."""
    if isinstance(exc, CredentialRejected):
        return CredentialRejected(str(exc), delay)
    return TokenUnavailable(str(exc), delay)


# -- idempotency keys and outcomes ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """The key of one event's current delivery attempt, and what must be kept about it.

    ``value`` is ``f"{external_id}.{generation}"``.  ``unanswered_since`` is the wall
    time of the first attempt under this generation that got no answer (the server may
    have created the event): the key must then be kept, and retried within
    :data:`REPLAY_SAFE_S`.  The caller persists all three fields from every outcome.
    """

    external_id: str
    generation: int = 0
    unanswered_since: float | None = None

    def __post_init__(self) -> None:
        ext = self.external_id
        if not ext or any(c.isspace() or not c.isprintable() for c in ext):
            raise ValueError("an external id must be non-empty printable text without spaces")
        if self.generation < 0:
            raise ValueError("a key generation cannot be negative")

    @property
    def value(self) -> str:
        """The ``Idempotency-Key`` header value."""
        return f"{self.external_id}.{self.generation}"

    def rotated(self) -> IdempotencyKey:
        """The next generation: only once Stora has said nothing was created under this one."""
        return IdempotencyKey(self.external_id, self.generation + 1, None)

    def unanswered(self, at: float) -> IdempotencyKey:
        """This key, marked as having had an attempt without an answer (earliest kept)."""
        if self.unanswered_since is not None:
            return self
        return replace(self, unanswered_since=at)

    def replay_deadline(self) -> float | None:
        """The wall time after which this key must not be sent again, or ``None``."""
        if self.unanswered_since is None:
            return None
        return self.unanswered_since + REPLAY_SAFE_S


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """One ``details`` entry of a stora-api §6 error."""

    message: str
    pointer: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """Stora has the event (a fresh 2xx, or the replay of an earlier one)."""

    key: IdempotencyKey
    status: int
    event_id: str | None
    kind: ClassVar[str] = "delivered"


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay_s`` with ``key`` (rotated when ``rotate_key``).

    ``sent`` is False when nothing went out (waiting for the limiter or a token);
    ``status`` is the HTTP status when there was an answer; ``reason`` is a short code
    for logs and the outbox: ``rate_limited``, ``local_rate_limit``, ``no_answer``,
    ``not_sent``, ``server_error``, ``gateway_error``, ``in_progress``,
    ``token_unavailable``; ``detail`` (one capped line, or ``None``) says more, e.g.
    why no token could be had.
    """

    key: IdempotencyKey
    delay_s: float
    rotate_key: bool
    reason: str
    status: int | None = None
    sent: bool = True
    detail: str | None = None
    kind: ClassVar[str] = "retry"


@dataclass(frozen=True, slots=True)
class Dead:
    """Stora refused this event for good: dead-letter it with what Stora said."""

    key: IdempotencyKey
    status: int | None
    code: str
    message: str
    details: tuple[ErrorDetail, ...] = ()
    request_id: str | None = None
    kind: ClassVar[str] = "dead"

    def as_record(self) -> dict[str, Any]:
        """JSON-ready data for the dead-letter row and ``stora-gateway outbox --dead``."""
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "details": [{"message": d.message, "pointer": d.pointer} for d in self.details],
            "request_id": self.request_id,
            "idempotency_key": self.key.value,
        }


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """The credential is refused: stop posting, alarm, try again after ``retry_after_s``."""

    key: IdempotencyKey
    reason: str
    retry_after_s: float
    kind: ClassVar[str] = "auth"


PostOutcome = Delivered | Retry | Dead | AuthFailed


@dataclass(frozen=True, slots=True)
class _NoAnswer:
    """Nothing usable came back; ``maybe_processed`` when the request may have arrived."""

    maybe_processed: bool
    why: str


@dataclass(frozen=True, slots=True)
class _StoraErrorBody:
    code: str
    type: str
    message: str
    request_id: str | None
    details: tuple[ErrorDetail, ...]


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except (ValueError, RecursionError):  # 10 000 nested brackets are no error envelope
        return None


def _error_envelope(data: bytes) -> _StoraErrorBody | None:
    """The stora-api §6 error in ``data``, or ``None`` when it is not one (a proxy's page)."""
    doc = _json_or_none(data)
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        return None
    raw = err.get("details")
    given = [d for d in raw if isinstance(d, dict)] if isinstance(raw, list) else []
    details = [
        ErrorDetail(cap_text(d.get("message", "")), cap_text(d.get("pointer", "")))
        for d in given[:MAX_DETAILS]
    ]
    if len(given) > MAX_DETAILS:
        details.append(ErrorDetail(f"…(+{len(given) - MAX_DETAILS} more details)", ""))
    rid = err.get("request_id")
    return _StoraErrorBody(
        code=cap_text(err["code"]),
        type=cap_text(err.get("type", "")),
        message=cap_text(err.get("message", "")),
        request_id=cap_text(rid) if isinstance(rid, str) else None,
        details=tuple(details),
    )


# Transport failures where the request cannot have reached the application.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


# -- the client -------------------------------------------------------------------------------
class StoraClient:
    """``POST {base_url}/timeline/events`` with the key policy of the module docstring.

    One ``httpx.Client`` (kept-alive connections, explicit timeouts, the
    ``stora-gateway/<version>`` User-Agent) shared with the token source.  Thread-safe.
    ``clock`` is the wall clock (``unanswered_since``, 429 resets); waiting for the limiter
    uses the limiter's own clocks.  ``on_server_date`` gets the ``Date`` of every trusted
    response, token answers included (module docstring, "The server's clock").
    """

    def __init__(
        self,
        base_url: str,
        tokens: TokenSource,
        limiter: RateLimiter,
        *,
        http: httpx.Client | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        deadline_s: float = DEFAULT_DEADLINE_S,
        clock: WallClock = time.time,
        rng: random.Random | None = None,
        max_wait_s: float = MAX_LOCAL_WAIT_S,
        on_server_date: Callable[[float], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.events_url = self.base_url + "/timeline/events"
        self.tokens = tokens
        self.limiter = limiter
        self._owns_http = http is None
        self._http = http if http is not None else make_http_client(timeout)
        self._deadline_s = deadline_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._max_wait_s = max_wait_s
        self._server_date = ServerDate(on_server_date)
        if isinstance(tokens, ClientCredentialsTokens) and tokens.server_date is None:
            tokens.server_date = self._server_date  # token answers carry a Date too

    @classmethod
    def from_config(
        cls,
        cfg: StoraConfig,
        *,
        history: Iterable[float] = (),
        on_record: Callable[[float], None] | None = None,
        http: httpx.Client | None = None,
        on_server_date: Callable[[float], None] | None = None,
    ) -> StoraClient:
        """The client ``[stora]`` describes; ``history`` is the persisted send times."""
        limiter = RateLimiter(
            cfg.max_per_second, cfg.max_per_minute, history, on_record=on_record
        )
        client = http if http is not None else make_http_client()
        tokens: TokenSource
        if cfg.auth == "client_credentials":
            if cfg.client_secret_file is None:
                raise ValueError("client_credentials needs client_secret_file")
            tokens = ClientCredentialsTokens(
                token_url=cfg.token_url,
                client_id=cfg.client_id,
                secret_file=cfg.client_secret_file,
                scope=cfg.scope,
                http=client,
                limiter=limiter,
            )
        else:
            if cfg.token_file is None:
                raise ValueError(f"{cfg.auth} needs token_file")
            tokens = FileTokens(cfg.token_file, cfg.auth)
        made = cls(cfg.base_url, tokens, limiter, http=client, on_server_date=on_server_date)
        made._owns_http = http is None
        return made

    def close(self) -> None:
        """Close the connection pool (when this client made it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> StoraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one delivery attempt --------------------------------------------------------
    def post_event(
        self, body: Mapping[str, Any], key: IdempotencyKey, *, attempt: int = 0
    ) -> PostOutcome:
        """Try to deliver one event; the outcome says what to persist and do next.

        ``body`` must be the body first sent under ``key`` (build it once, keep it);
        ``attempt`` counts earlier failed attempts of this event, for the backoff.
        Persist ``outcome.key`` whatever the outcome.  Never raises for network or API
        trouble; ``ValueError`` for a body whose ``external.id`` is not the key's.
        """
        external = body.get("external")
        if isinstance(external, Mapping) and external.get("id") != key.external_id:
            raise ValueError("the body's external.id differs from the Idempotency-Key's")
        deadline = key.replay_deadline()
        if deadline is not None and self._clock() > deadline:
            LOGGER.error(
                "event %s: its key went unanswered too long ago to be replayed safely",
                key.external_id,
            )
            return Dead(
                key,
                None,
                "replay_window_expired",
                "an attempt under this Idempotency-Key went unanswered more than "
                f"{REPLAY_SAFE_S / 3600:.0f} h ago; whether Stora has the event is unknown",
            )
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        outcome = self._deliver(data, key, attempt)
        if isinstance(outcome, Retry):
            # One place decides the flag: the key handed back is the truth.
            rotate = outcome.key.generation != key.generation
            if rotate != outcome.rotate_key:
                outcome = replace(outcome, rotate_key=rotate)
        return outcome

    def _deliver(self, data: bytes, key: IdempotencyKey, attempt: int) -> PostOutcome:
        token = self._token(key)
        if not isinstance(token, str):
            return token
        answer = self._exchange(data, key, token)
        if not isinstance(answer, Answer):
            return self._unanswered(answer, key, attempt)
        if answer.status != 401:
            return self._classify(answer, key, attempt)
        return self._after_401(data, key, token, attempt)

    def _token(self, key: IdempotencyKey) -> str | Retry | AuthFailed:
        try:
            return self.tokens.token()
        except CredentialRejected as exc:
            LOGGER.error("Stora credential refused: %s", exc)  # noqa: TRY400 - no traceback
            return AuthFailed(key, str(exc), exc.retry_after_s)
        except TokenUnavailable as exc:
            LOGGER.warning("no Stora token yet: %s", exc)
            return Retry(key, exc.retry_after_s, False, "token_unavailable", sent=False,
                         detail=str(exc))

    def _after_401(
        self, data: bytes, key: IdempotencyKey, token: str, attempt: int
    ) -> PostOutcome:
        """The 401 rule of the module docstring: renew once, then same or next key."""
        self.tokens.invalidate(token)
        # Nothing was ever created under a key whose every attempt was answered, so it
        # may be retired now; an unanswered one is tried once more as it is first.
        keys = [key.rotated()] if key.unanswered_since is None else [key, key.rotated()]
        fresh = self._token(keys[0])
        if not isinstance(fresh, str):
            return fresh
        for k in keys:
            answer = self._exchange(data, k, fresh)
            if not isinstance(answer, Answer):
                return self._unanswered(answer, k, attempt)
            if answer.status != 401:
                return self._classify(answer, k, attempt)
        final = keys[-1]
        self.tokens.invalidate(fresh)
        reason = f"Stora answered 401 to a renewed {self.tokens.kind} token"
        LOGGER.error("%s; posting stops until the credential is fixed", reason)
        return AuthFailed(final, reason, credential_retry_delay(0, rng=self._rng))

    def _exchange(
        self, data: bytes, key: IdempotencyKey, token: str
    ) -> Answer | _NoAnswer | Retry:
        """One request through the limiter; transport errors become ``_NoAnswer``."""
        wait = self.limiter.acquire(self._max_wait_s)
        if wait > 0:
            return Retry(key, wait, False, "local_rate_limit", sent=False)
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Idempotency-Key": key.value,
        }
        try:
            return exchange(
                self._http, "POST", self.events_url, content=data, headers=headers,
                deadline_s=self._deadline_s, limit=MAX_RESPONSE_BYTES,
                on_response=self._server_date.observe,
            )
        except _NOT_SENT as exc:
            return _NoAnswer(False, type(exc).__name__)
        except DeadlineExceeded:
            return _NoAnswer(True, f"no complete answer within {self._deadline_s:g} s")
        except httpx.HTTPError as exc:
            return _NoAnswer(True, type(exc).__name__)

    def probe_server_time(self, *, deadline_s: float = PROBE_DEADLINE_S) -> float | None:
        """Stora's clock now: the ``Date`` of one ``GET {base_url}``, or ``None``.

        For the clock when nothing is being posted (every post reports its Date through
        ``on_server_date`` already).  No token is sent and any status counts; the
        request takes a rate-limit slot like any other (none free: ``None`` at once,
        nothing sent), ends within ``deadline_s``, and its Date is passed to
        ``on_server_date`` too.  ``None`` as well without an answer, or when the answer
        is untrusted (plain ``http://`` to another host) or has no valid Date.  Never
        raises: the clock's thread calls it.
        """
        try:
            if self.limiter.try_acquire() > 0:
                return None
        # on_record persists the send time; if that fails (disk full: any StoreError,
        # which this module does not know), the probe is not sent rather than raising.
        except Exception as exc:  # noqa: BLE001
            LOGGER.warning("server time probe not sent: %s", cap_text(exc))
            return None
        seen: list[float | None] = []

        def observe(response: httpx.Response) -> None:
            seen.append(self._server_date.observe(response))

        try:
            exchange(self._http, "GET", self.base_url, headers={"Accept": "application/json"},
                     deadline_s=deadline_s, limit=MAX_PROBE_BYTES, on_response=observe)
        except (httpx.HTTPError, DeadlineExceeded) as exc:
            LOGGER.debug("server time probe: %s", type(exc).__name__)
        return seen[0] if seen else None

    def _unanswered(
        self, answer: _NoAnswer | Retry, key: IdempotencyKey, attempt: int
    ) -> Retry:
        if isinstance(answer, Retry):
            return answer
        LOGGER.warning("event %s: no answer from Stora (%s)", key.value, answer.why)
        delay = backoff_delay(attempt, rng=self._rng)
        if answer.maybe_processed:
            return Retry(key.unanswered(self._clock()), delay, False, "no_answer",
                         detail=answer.why)
        return Retry(key, delay, False, "not_sent", sent=False, detail=answer.why)

    def _classify(self, answer: Answer, key: IdempotencyKey, attempt: int) -> PostOutcome:
        """A non-401 answer -> outcome, per the table in the module docstring."""
        status = answer.status
        if answer.unread is not None:
            LOGGER.warning("event %s: Stora answered %d with %s; not read",
                           key.value, status, answer.unread)
        if 200 <= status < 300:
            doc = _json_or_none(answer.body)
            event = doc.get("event") if isinstance(doc, dict) else None
            given = event.get("id") if isinstance(event, dict) else None
            event_id = safe_id(given)
            if given is not None and event_id is None:
                LOGGER.warning("event %s: Stora's event id %s is not id-shaped; not kept",
                               key.value, cap_text(repr(given), 80))
            LOGGER.info("event %s delivered (%d, %s)", key.value, status, event_id)
            return Delivered(key, status, event_id)
        if 300 <= status < 400:
            # Never followed (make_http_client): it would carry the token elsewhere.
            where = cap_text(answer.headers.get("location", "nowhere"))
            LOGGER.error("event %s: Stora redirects (%d to %s); check [stora] base_url",
                         key.value, status, where)
            return Dead(key, status, "redirect",
                        f"HTTP {status} redirect to {where}; redirects are not followed")
        err = _error_envelope(answer.body)
        backoff = backoff_delay(attempt, rng=self._rng)
        if status == 429:
            wait = parse_retry_delay(answer.headers, self._clock())
            if wait is None:
                wait = max(
                    RATE_LIMIT_FALLBACK_S,
                    backoff_delay(
                        attempt,
                        base_s=RATE_LIMIT_FALLBACK_S,
                        cap_s=RATE_LIMIT_FALLBACK_CAP_S,
                        rng=self._rng,
                    ),
                )
            wait += self._rng.uniform(0.0, min(RATE_LIMIT_JITTER_MAX_S, max(0.1, 0.1 * wait)))
            self.limiter.pause_for(wait)
            LOGGER.warning("Stora rate limit (429); waiting %.1f s", wait)
            return Retry(key, max(wait, self.limiter.delay()), False, "rate_limited", status)
        if status >= 500 and err is None:
            # Not Stora's app talking (a proxy or load balancer): the app may have
            # committed, so this is "no answer" and the key stays.
            LOGGER.warning("event %s: %d without a Stora error body", key.value, status)
            return Retry(key.unanswered(self._clock()), backoff, False, "gateway_error", status)
        if status >= 500 or (err is not None and err.type == "api_error"):
            LOGGER.warning(
                "event %s: Stora failed (%d %s); retrying under a new key",
                key.value, status, err.code if err else "",
            )
            return Retry(key.rotated(), backoff, True, "server_error", status)
        if status == 408:
            return Retry(key, backoff, False, "no_answer", status)
        if (
            status == 409
            and key.unanswered_since is not None
            and self._clock() - key.unanswered_since < IN_PROGRESS_GRACE_S
        ):
            return Retry(key, max(backoff, BACKOFF_BASE_S), False, "in_progress", status)
        code = err.code if err else f"http_{status}"
        message = err.message if err else f"HTTP {status} without a Stora error body"
        LOGGER.error("event %s refused by Stora: %d %s: %s", key.value, status, code, message)
        return Dead(
            key, status, code, message,
            err.details if err else (), err.request_id if err else None,
        )


def make_http_client(timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.Client:
    """The ``httpx.Client`` for Stora (gateway/stora/http.py): explicit phase timeouts, an
    overall deadline per exchange enforced at the socket, no redirects, a small pool."""
    return _make_http_client(timeout)
