"""Where the Bearer token comes from: the :class:`TokenSource` protocol and its two kinds.

:class:`ClientCredentialsTokens` asks ``stora.token_url`` (stora-api §2.2) and refreshes
ahead of expiry, one refresh at a time, bounded in time and size; :class:`FileTokens`
reads ``stora.token_file`` (``static`` and ``broker``), again whenever it changes.
Secrets are read at each use and never logged.  See docs/design/idempotency.md
("Tokens").
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

import httpx

from gateway.stora.answers import json_or_none
from gateway.stora.errors import CredentialRejected, StoraError, TokenUnavailable
from gateway.stora.http import Answer, DeadlineExceeded, ServerDate, exchange
from gateway.stora.limits import TOKEN_DEADLINE_S, cap_text
from gateway.stora.ratelimit import (
    BACKOFF_BASE_S,
    MAX_LOCAL_WAIT_S,
    RATE_LIMIT_FALLBACK_S,
    Monotonic,
    RateLimiter,
    WallClock,
    backoff_delay,
    credential_retry_delay,
    parse_retry_delay,
)

__all__ = [
    "DEFAULT_TOKEN_LIFETIME_S",
    "EXPIRY_SKEW_S",
    "MAX_TOKEN_RESPONSE_BYTES",
    "REFRESH_AHEAD_FRACTION",
    "REFRESH_AHEAD_MIN_S",
    "ClientCredentialsTokens",
    "FileTokens",
    "TokenHealth",
    "TokenSource",
]

LOGGER = logging.getLogger(__name__)

#: stora-api §2.2: tokens live 2 hours; refresh when less than max(60 s, 10 %) remains.
REFRESH_AHEAD_MIN_S: Final = 60.0
REFRESH_AHEAD_FRACTION: Final = 0.1
DEFAULT_TOKEN_LIFETIME_S: Final = 7_200.0
#: A token this close to its expiry is not used while a refresh is failing.
EXPIRY_SKEW_S: Final = 5.0
#: A token answer is five short fields (stora-api §2.2), a few hundred bytes; 64 KiB
#: leaves room for any extension and bounds memory (a 300 MiB answer once took the
#: agent from 28 to 693 MiB).
MAX_TOKEN_RESPONSE_BYTES: Final = 64 * 1024


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
        doc = json_or_none(answer.body)
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
