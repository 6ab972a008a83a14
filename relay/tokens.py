"""Operators' access tokens (contract §7.5): refreshed ahead of expiry, one refresh per
operator at a time across threads, processes and replicas.

:meth:`Tokens.access_token` gives the token for any call the relay makes to Stora for an
operator; :meth:`Tokens.call` runs a call with it and, on a 401, reloads the token
(refreshing it if the stored one is the one that failed) and tries once more.

When a token is refreshed
    On use, once :data:`REFRESH_AT` of its lifetime has passed (75 %), or at once when
    the stored token is the one Stora just refused with 401.

One refresh at a time: a lease, not a lock held over HTTP
    A refresh takes the operator's row ``FOR UPDATE`` (PostgreSQL: a row lock; SQLite:
    every transaction is already ``BEGIN IMMEDIATE``), re-reads it (another worker may
    have refreshed: its token is used), writes a lease (``refresh_lease_until``, timed by
    the database's clock, and ``refresh_lease_owner``, a random fencing value) and
    commits.  The HTTP refresh then runs with no transaction open: holding SQLite's write
    lock for a 10-s call would stop every writer of the relay (webhooks, commands) for as
    long.  The result is stored in a second short transaction, only if the stored refresh
    token is still the one presented (the real fence: a worker whose lease ran out while
    it stalled finds another's newer token and keeps it).  Workers that find the lease
    taken use the current token while it is still valid, or poll until the new one is
    there.  Within one process a gate also makes the refresh wait for that operator's
    calls in flight (:meth:`Tokens.call`), and new calls wait for the refresh, because
    Stora may revoke the old access token the moment it rotates (the sandbox does), which
    would fail those calls with a 401.

Rotation
    The newest ``refresh_token`` returned is always stored.

Refused
    ``invalid_grant`` for the stored refresh token: the operator becomes
    ``reauth_required`` (no retry loop) and every call for it raises
    :class:`ReauthRequiredError` at once, with no request to Stora, until the operator connects
    again (:meth:`relay.operators.Operators.connect` sets ``connected``).  An
    ``invalid_grant`` for a refresh token that is no longer the stored one only means
    another worker rotated it first.

Unreachable
    A network error, a 5xx or any other refusal of the token endpoint leaves a back-off
    lease (no owner) so that no worker retries at once; the old token is used while it is
    still valid, after that :class:`TokenUnavailableError` (retryable) is raised.

The refresh takes a slot of the operator's rate limit (the sandbox counts
``/oauth2/token`` against the operator), an urgent one: relay/ratelimit.py keeps a
reserve for it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.models import Operator
from relay.errors import RelayError
from relay.metrics import REFRESHES
from relay.operators import CONNECTED, REAUTH_REQUIRED, token_aad
from relay.ratelimit import RateLimitedError, RateLimiter, database_now
from relay.stora import OAuthError, StoraApi, StoraError, TokenSet

__all__ = [
    "LEASE_S",
    "REFRESH_AT",
    "NotConnectedError",
    "ReauthRequiredError",
    "TokenUnavailableError",
    "Tokens",
]

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

#: Refresh once this fraction of the token's lifetime has passed (contract §7.5).
REFRESH_AT: Final = 0.75
#: A token is not used in its last 10 % of life, nor its last 2 s: it must still be
#: valid when the request reaches Stora.
VALID_MARGIN_FRACTION: Final = 0.1
VALID_MARGIN_MAX_S: Final = 2.0
#: How long a refresh lease lasts: the rate-limit wait (``SLOT_WAIT_S``), the drain of
#: calls in flight (``DRAIN_S``) and the token call (relay/stora.py ``TIMEOUT_S``, 10 s)
#: with room to spare.  A worker that dies mid-refresh blocks others no longer.
LEASE_S: Final = 30.0
SLOT_WAIT_S: Final = 5.0
DRAIN_S: Final = 5.0
#: After a failed refresh no worker tries again for 2 % of the token's life, between
#: 1 s and 30 s (the old token serves meanwhile while it is valid).
BACKOFF_FRACTION: Final = 0.02
BACKOFF_MIN_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0
#: How long a caller waits for another worker's refresh when its own token is no longer
#: valid, and how often it looks.
WAIT_FOR_OTHER_S: Final = 12.0
POLL_S: Final = 0.05
#: :meth:`Tokens.call`: a local refresh between getting a token and sending it makes the
#: call fetch the new one; this bounds how often in a row.
MAX_RACES: Final = 5


class NotConnectedError(RelayError):
    """The operator is unknown, disconnected by staff, or has no token."""

    def __init__(self, operator_id: str, why: str = "is not connected") -> None:
        super().__init__(f"operator {operator_id} {why}")
        self.operator_id = operator_id


class ReauthRequiredError(NotConnectedError):
    """Stora refused the operator's refresh token (``invalid_grant``): the operator must
    connect again; nothing is sent for it until then."""

    def __init__(self, operator_id: str) -> None:
        super().__init__(operator_id, "must connect Stora again (its authorization "
                                      "was refused)")


class TokenUnavailableError(RelayError):
    """No valid token now (Stora's token endpoint unreachable or failing); try again
    after ``retry_after_s``."""

    retryable = True

    def __init__(self, operator_id: str, why: str, retry_after_s: float) -> None:
        super().__init__(f"operator {operator_id}: no valid Stora token ({why})")
        self.operator_id = operator_id
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class _State:
    """The operator's token as stored, and the database's clock when read."""

    access: str
    expires_at: float
    lifetime_s: float
    lease_until: float | None
    lease_owner: str | None
    db_now: float

    @property
    def due_at(self) -> float:
        return self.expires_at - (1.0 - REFRESH_AT) * self.lifetime_s

    @property
    def valid_until(self) -> float:
        return self.expires_at - min(VALID_MARGIN_MAX_S,
                                     VALID_MARGIN_FRACTION * self.lifetime_s)

    @property
    def backing_off(self) -> float:
        """Seconds left of a failed refresh's back-off (0: none)."""
        if self.lease_owner is not None or self.lease_until is None:
            return 0.0
        return max(0.0, self.lease_until - self.db_now)


@dataclass(frozen=True, slots=True)
class _Leased:
    owner: str
    refresh_token: str
    lifetime_s: float


class _NoRefreshToken:
    """:meth:`Tokens._take_lease` found no refresh token (now ``reauth_required``)."""


class _Gate:
    """One process's calls in flight for one operator, and its refresher.

    ``refreshing`` lets one local thread at a time look for the lease.  A thread that has
    it and sends the refresh enters :meth:`exclusive`: new calls wait, the calls in
    flight (:meth:`reading`) finish first, since Stora may revoke their token as soon as
    it rotates.  ``generation`` moves on with each refresh sent from this process.
    """

    def __init__(self) -> None:
        self.refreshing = threading.Lock()
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self.generation = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer, timeout=LEASE_S)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writer = True
            self._cond.wait_for(lambda: self._readers == 0, timeout=DRAIN_S)
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self.generation += 1
                self._cond.notify_all()


class Tokens:
    """The operators' access tokens over the database (thread-safe; one per process)."""

    def __init__(self, db: Database, keyring: Keyring, stora: StoraApi, limiter: RateLimiter,
                 *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._db = db
        self._keyring = keyring
        self._stora = stora
        self._limiter = limiter
        self._clock = clock
        self._sleep = sleep
        self._gates: dict[str, _Gate] = {}
        self._gates_lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def access_token(self, operator_id: str, *, not_this: str | None = None) -> str:
        """A valid access token for the operator, refreshed first when due; with
        ``not_this`` (a token Stora refused with 401) never that one.

        :class:`ReauthRequiredError` / :class:`NotConnectedError` at once when the operator
        cannot be called; :class:`TokenUnavailableError` when no valid token can be had.
        """
        gate = self._gate(operator_id)
        deadline = time.monotonic() + WAIT_FOR_OTHER_S
        while True:
            seen = gate.generation
            state = self._read(operator_id)
            if state.access != not_this and self._clock() < state.due_at:
                return state.access
            if state.lease_until is None or state.lease_until <= state.db_now:
                fresh = self._refresh(operator_id, gate, seen, not_this)
                if fresh is not None:
                    return fresh
                state = self._read(operator_id)
            usable = state.access != not_this and self._clock() < state.valid_until
            if usable:
                return state.access  # another worker is refreshing, or it failed: still good
            if state.backing_off > 0:
                raise TokenUnavailableError(operator_id, "the last refresh failed",
                                            state.backing_off)
            if time.monotonic() > deadline:
                raise TokenUnavailableError(operator_id, "another worker's refresh is "
                                            "taking too long", POLL_S * 20)
            self._sleep(POLL_S)

    def call(self, operator_id: str, fn: Callable[[str], T]) -> T:
        """``fn(token)``; if it raises a 401 :class:`StoraError`, once more with a reloaded
        (if need be, refreshed) token.  A second 401 is raised to the caller."""
        gate = self._gate(operator_id)
        failed: str | None = None
        for _ in range(MAX_RACES):
            seen = gate.generation
            token = self.access_token(operator_id, not_this=failed)
            with gate.reading():
                if gate.generation != seen:
                    continue  # refreshed here meanwhile: that may have revoked ``token``
                try:
                    return fn(token)
                except StoraError as exc:
                    if exc.status != 401 or failed is not None:
                        raise
                    LOGGER.info("operator %s: Stora answered 401; reloading the token",
                                operator_id)
                    failed = token
        raise TokenUnavailableError(operator_id, "the token kept changing", POLL_S * 20)

    # ------------------------------------------------------------------ reading

    def _gate(self, operator_id: str) -> _Gate:
        with self._gates_lock:
            return self._gates.setdefault(operator_id, _Gate())

    def _decrypt(self, operator_id: str, column: str, value: str) -> str:
        return self._keyring.decrypt(value, aad=token_aad(operator_id, column)).decode()

    def _usable_row(self, s: Session, operator_id: str, *, lock: bool) -> Operator:
        query = select(Operator).where(Operator.id == operator_id)
        row = s.execute(query.with_for_update() if lock else query).scalar_one_or_none()
        if row is None:
            raise NotConnectedError(operator_id, "is unknown")
        if row.status == REAUTH_REQUIRED:
            raise ReauthRequiredError(operator_id)
        if row.status != CONNECTED or row.access_token_enc is None:
            raise NotConnectedError(operator_id)
        return row

    def _state(self, s: Session, row: Operator) -> _State:
        assert row.access_token_enc is not None  # _usable_row checked it
        expires = row.token_expires_at if row.token_expires_at is not None else 0.0
        return _State(self._decrypt(row.id, "access_token", row.access_token_enc), expires,
                      row.token_lifetime_s or 0.0, row.refresh_lease_until,
                      row.refresh_lease_owner, database_now(s))

    def _read(self, operator_id: str) -> _State:
        with self._db.read() as s:
            return self._state(s, self._usable_row(s, operator_id, lock=False))

    # ------------------------------------------------------------------ refreshing

    def _refresh(self, operator_id: str, gate: _Gate, seen: int,
                 not_this: str | None) -> str | None:
        """Refresh if this worker may: the new token, another's new one, or ``None``
        (another worker holds the lease, or the refresh failed)."""
        with gate.refreshing:
            if gate.generation != seen:
                return None  # this process has just refreshed: read its token
            leased = self._take_lease(operator_id, not_this)
            if isinstance(leased, _NoRefreshToken):
                raise ReauthRequiredError(operator_id)
            if not isinstance(leased, _Leased):
                return leased
            with gate.exclusive():
                started = self._clock()
                try:
                    self._limiter.acquire(operator_id, "refresh", urgent=True,
                                          max_wait_s=SLOT_WAIT_S)
                    tokens = self._stora.refresh(leased.refresh_token)
                except OAuthError as exc:
                    if exc.code == "invalid_grant":
                        REFRESHES.labels("invalid_grant").inc()
                        return self._refused(operator_id, leased)
                    REFRESHES.labels("failed").inc()
                    self._failed(operator_id, leased, exc)
                    return None
                except (StoraError, RateLimitedError) as exc:
                    REFRESHES.labels("failed").inc()
                    self._failed(operator_id, leased, exc)
                    return None
                REFRESHES.labels("ok").inc()
                return self._store(operator_id, leased, tokens, started)

    def _take_lease(self, operator_id: str,
                    not_this: str | None) -> str | _Leased | _NoRefreshToken | None:
        """The lease (and the refresh token to present), a token another worker just
        stored, or ``None`` when the lease is someone else's or backing off."""
        with self._db.session() as s:
            row = self._usable_row(s, operator_id, lock=True)
            state = self._state(s, row)
            if state.access != not_this and self._clock() < state.due_at:
                return state.access
            if state.lease_until is not None and state.lease_until > state.db_now:
                return None
            if row.refresh_token_enc is None:  # never given one: only a new consent helps
                row.status = REAUTH_REQUIRED
                return _NoRefreshToken()
            owner = secrets.token_hex(8)
            row.refresh_lease_until = state.db_now + LEASE_S
            row.refresh_lease_owner = owner
            return _Leased(owner, self._decrypt(operator_id, "refresh_token",
                                                row.refresh_token_enc), state.lifetime_s)

    def _presented_is_stored(self, row: Operator, leased: _Leased) -> bool:
        return row.refresh_token_enc is not None and self._decrypt(
            row.id, "refresh_token", row.refresh_token_enc) == leased.refresh_token

    def _store(self, operator_id: str, leased: _Leased, tokens: TokenSet,
               started: float) -> str:
        """Keep the new tokens, unless another worker's newer ones are there already."""
        with self._db.session() as s:
            row = self._usable_row(s, operator_id, lock=True)
            if not self._presented_is_stored(row, leased):
                if row.refresh_lease_owner == leased.owner:
                    row.refresh_lease_until = row.refresh_lease_owner = None
                assert row.access_token_enc is not None
                return self._decrypt(operator_id, "access_token", row.access_token_enc)
            now = self._clock()
            row.access_token_enc = self._keyring.encrypt(
                tokens.access_token.encode(), aad=token_aad(operator_id, "access_token"))
            if tokens.refresh_token is not None:  # rotation: always the newest
                row.refresh_token_enc = self._keyring.encrypt(
                    tokens.refresh_token.encode(), aad=token_aad(operator_id, "refresh_token"))
            row.token_lifetime_s = tokens.expires_in
            row.token_expires_at = started + tokens.expires_in  # from before: errs early
            if tokens.scope:
                row.scopes = tokens.scope
            row.refreshes += 1
            row.last_refresh_at = now
            row.refresh_lease_until = row.refresh_lease_owner = None
            row.updated_at = now
        LOGGER.info("operator %s: access token refreshed (lifetime %.0f s)", operator_id,
                    tokens.expires_in)
        return tokens.access_token

    def _refused(self, operator_id: str, leased: _Leased) -> str | None:
        """``invalid_grant``: reauth_required, unless the refresh token presented was
        already replaced (another worker, or a new connect): then nothing is wrong."""
        with self._db.session() as s:
            row = self._usable_row(s, operator_id, lock=True)
            if not self._presented_is_stored(row, leased):
                if row.refresh_lease_owner == leased.owner:
                    row.refresh_lease_until = row.refresh_lease_owner = None
                return None
            row.status = REAUTH_REQUIRED
            row.refresh_lease_until = row.refresh_lease_owner = None
            row.updated_at = self._clock()
        LOGGER.error("operator %s: Stora refused the refresh token (invalid_grant); the "
                     "operator must connect again", operator_id)
        raise ReauthRequiredError(operator_id)

    def _failed(self, operator_id: str, leased: _Leased, exc: RelayError) -> None:
        """Turn our lease into a back-off so that no worker hammers the token endpoint."""
        backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, BACKOFF_FRACTION * leased.lifetime_s))
        LOGGER.warning("operator %s: token refresh failed (%s); no retry for %.0f s",
                       operator_id, exc, backoff)
        with self._db.session() as s:
            row = s.execute(select(Operator).where(Operator.id == operator_id)
                            .with_for_update()).scalar_one_or_none()
            if row is not None and row.refresh_lease_owner == leased.owner:
                row.refresh_lease_owner = None
                row.refresh_lease_until = database_now(s) + backoff
