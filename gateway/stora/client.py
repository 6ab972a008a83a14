"""The Stora client: one ``POST /timeline/events`` attempt and what it proved.

:class:`StoraClient` sends an event under its :class:`IdempotencyKey` through the rate
limiter and the token source, and classifies the answer into an outcome
(gateway/stora/answers.py) by the table of docs/design/idempotency.md; it never sleeps
longer than ``MAX_LOCAL_WAIT_S`` and keeps no per-event state.
:func:`make_http_client` builds the bounded ``httpx.Client`` it shares with the token
source.  See docs/design/idempotency.md.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

import httpx

from gateway.config import StoraConfig
from gateway.stora.answers import (
    AuthFailed,
    Dead,
    Delivered,
    PostOutcome,
    Retry,
    json_or_none,
    parse_error_envelope,
)
from gateway.stora.errors import CredentialRejected, TokenUnavailable
from gateway.stora.http import Answer, DeadlineExceeded, ServerDate, exchange
from gateway.stora.http import make_http_client as _make_http_client
from gateway.stora.idempotency import IN_PROGRESS_GRACE_S, REPLAY_SAFE_S, IdempotencyKey
from gateway.stora.limits import cap_text, safe_id
from gateway.stora.ratelimit import (
    BACKOFF_BASE_S,
    MAX_LOCAL_WAIT_S,
    RATE_LIMIT_FALLBACK_CAP_S,
    RATE_LIMIT_FALLBACK_S,
    RATE_LIMIT_JITTER_MAX_S,
    RateLimiter,
    WallClock,
    backoff_delay,
    credential_retry_delay,
    parse_retry_delay,
)
from gateway.stora.tokens import ClientCredentialsTokens, FileTokens, TokenSource

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_TIMEOUT",
    "MAX_PROBE_BYTES",
    "MAX_RESPONSE_BYTES",
    "PROBE_DEADLINE_S",
    "StoraClient",
    "make_http_client",
]

LOGGER = logging.getLogger(__name__)

#: Explicit httpx phase timeouts (fault matrix #19); no default is relied upon.
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=5.0, read=15.0, write=10.0, pool=5.0)
#: The whole exchange, body included, ends by then: a server that drips a byte just
#: often enough to beat the read timeout is cut off here.
DEFAULT_DEADLINE_S: Final = 30.0
#: A Timeline Event reply is a few KiB; more is not read.
MAX_RESPONSE_BYTES: Final = 1 << 20
#: ``GET base_url`` for the server's Date: a Date that took longer than this to arrive
#: says little about now, and the clock's thread should not wait longer.
PROBE_DEADLINE_S: Final = 10.0
#: The probe's answer is not needed; it is read (this much at most) only so that the
#: connection can be kept alive for the next request.
MAX_PROBE_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class _NoAnswer:
    """Nothing usable came back; ``maybe_processed`` when the request may have arrived."""

    maybe_processed: bool
    why: str


# Transport failures where the request cannot have reached the application.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class StoraClient:
    """``POST {base_url}/timeline/events`` with the key policy of docs/design/idempotency.md.

    One ``httpx.Client`` (kept-alive connections, explicit timeouts, the
    ``stora-gateway/<version>`` User-Agent) shared with the token source.  Thread-safe.
    ``clock`` is the wall clock (``unanswered_since``, 429 resets); waiting for the limiter
    uses the limiter's own clocks.  ``on_server_date`` gets the ``Date`` of every trusted
    response, token answers included (docs/design/idempotency.md, "The server's clock").
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
        self, body: Mapping[str, object], key: IdempotencyKey, *, attempt: int = 0
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
        """The 401 rule of docs/design/idempotency.md: renew once, then same or next key."""
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
        """A non-401 answer -> outcome, per the table in docs/design/idempotency.md."""
        status = answer.status
        if answer.unread is not None:
            LOGGER.warning("event %s: Stora answered %d with %s; not read",
                           key.value, status, answer.unread)
        if 200 <= status < 300:
            doc = json_or_none(answer.body)
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
        err = parse_error_envelope(answer.body)
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
