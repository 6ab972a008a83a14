"""The sandbox's state: its settings, lifecycle, faults and introspection.

:class:`devkit.sandbox.api.Sandbox` adds the request pipeline on top.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from devkit.sandbox.rules import (
    _SETTINGS,
    API_VERSION,
    ERRORS,
    LOGGER,
    REDIRECT_LOCATION,
    REDIRECT_STATUSES,
    TOKEN_PATH,
    Clock,
    RequestRecord,
    _count,
    _dumps,
    _fault_code,
    _Faults,
    _RateLimiter,
    _Stored,
    _Token,
    max_in_window,
)

if TYPE_CHECKING:
    from devkit.sandbox.server import _Server


class SandboxState:
    """The state of a local Stora API (:class:`devkit.sandbox.api.Sandbox` serves it).

    ``clients`` maps OAuth client ids to secrets; ``static_tokens`` are long-lived Bearer
    tokens.  Every method is thread-safe.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clients: Mapping[str, str] | None = None,
        static_tokens: Iterable[str] = (),
        max_per_second: int = 10,
        max_per_minute: int = 60,
        token_ttl_s: float = 7200,
        idempotency_ttl_s: float = 86400,
        store_unauthorized: bool = True,
        clock: Clock = time.time,
        timeline_sources: Iterable[str] = (),
    ) -> None:
        if max_per_second < 1 or max_per_minute < 1:
            raise ValueError("rate limits must be at least 1 request per window")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not 0–65535")
        if token_ttl_s <= 0 or idempotency_ttl_s <= 0:
            raise ValueError("token_ttl_s and idempotency_ttl_s must be positive")
        self.host = host
        self.port = port
        self.max_per_second = max_per_second
        self.max_per_minute = max_per_minute
        self.token_ttl_s = token_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        #: Whether a 401 is stored under its Idempotency-Key (docs/design/sandbox.md).
        self.store_unauthorized = store_unauthorized
        self._clients = dict(clients or {})
        #: The operator's timeline sources (ids), listed by GET /timeline/sources.
        self.timeline_sources = list(timeline_sources)
        self._clock = clock
        self._offset = 0.0
        self._lock = threading.Lock()
        self._limiter = _RateLimiter(max_per_second, max_per_minute)
        self._faults = _Faults()
        self._tokens = {
            t: _Token(f"tok_{hashlib.sha256(t.encode()).hexdigest()[:16]}", None, math.inf, False)
            for t in static_tokens
        }
        # Idempotency keys belong to an operator: (operator, key).
        self._stored: dict[tuple[str, str], _Stored] = {}
        self._inflight: set[tuple[str, str]] = set()
        self._events: list[dict[str, Any]] = []
        self._log: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``, the real port once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The versioned API base: the config's ``[stora] base_url``."""
        return f"{self.url}/{API_VERSION}"

    @property
    def token_url(self) -> str:
        """The OAuth token endpoint: the config's ``[stora] token_url``."""
        return f"{self.url}{TOKEN_PATH}"

    def now(self) -> float:
        """The sandbox's time: the injected clock plus :meth:`advance`."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the sandbox's time forward, e.g. past a token's or a key's lifetime."""
        if seconds < 0:
            raise ValueError("the sandbox's clock only moves forward")
        with self._lock:
            self._offset += seconds

    # -- faults ---------------------------------------------------------------------
    def set_outage(self, on: bool = True) -> None:
        """While on, every API connection is closed without a reply (network down)."""
        with self._lock:
            self._faults.outage = on

    def fail_next(
        self, n: int, status: int = 500, *, message_chars: int = 0, details: int = 0
    ) -> None:
        """The next ``n`` authenticated event POSTs fail with ``status``, stored under their key.

        ``message_chars`` > 0 pads the error's ``message`` to that many characters, and
        ``details`` adds that many ``details`` entries with messages as long: answers no
        real Stora gives, for testing what a client keeps, logs and publishes of them
        (e.g. a 403 with an 80 KB message: ``fail_next(5, 403, message_chars=80_000)``).
        """
        code = _fault_code(status)
        with self._lock:
            self._faults.fail_next = _count(n)
            self._faults.fail_status = status
            self._faults.fail_message_chars = _count(message_chars)
            self._faults.fail_details = _count(details)
        LOGGER.debug("fail_next %d with %s", n, code)

    def redirect_next(self, n: int, status: int = 301, location: str | None = None) -> None:
        """The next ``n`` API requests get ``status`` (a 3xx) to ``location`` + their path.

        As a front proxy answers after the API moved; nothing behind it sees them.  The
        default location is a host that never resolves; a test may name a server of its
        own to prove that nothing follows the redirect.
        """
        if status not in REDIRECT_STATUSES:
            raise ValueError(f"status {status} is not one of {sorted(REDIRECT_STATUSES)}")
        with self._lock:
            self._faults.redirect_next = _count(n)
            self._faults.redirect_status = status
            self._faults.redirect_location = (location or REDIRECT_LOCATION).rstrip("/")

    def storm(self, seconds: float) -> None:
        """Answer 429 to every API request for ``seconds`` (0 ends a storm)."""
        with self._lock:
            self._faults.storm_until = self.now() + seconds if seconds > 0 else None

    def set_slow(self, seconds: float) -> None:
        """Every API request takes ``seconds`` (real time) longer; 0 turns it off."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        with self._lock:
            self._faults.slow_s = float(seconds)

    def drop_after_commit(self, n: int) -> None:
        """The next ``n`` created events are stored, then the connection is closed unanswered."""
        with self._lock:
            self._faults.drop_after_commit = _count(n)

    def expire_tokens(self, *, static: bool = False) -> int:
        """Invalidate every issued token (and static ones too with ``static``); how many."""
        with self._lock:
            doomed = [t for t, info in self._tokens.items() if info.issued or static]
            for token in doomed:
                del self._tokens[token]
        return len(doomed)

    def reject_external_ids(self, ids: Iterable[str], status: int = 422) -> None:
        """Answer ``status`` to events with these ``external.id`` values (replaces the set)."""
        _fault_code(status)
        with self._lock:
            self._faults.reject_external_ids = frozenset(ids)
            self._faults.reject_status = status

    def reset_faults(self) -> None:
        """Every fault off.  Events, tokens, stored replies and the clock are kept."""
        with self._lock:
            self._faults = _Faults()

    def configure(self, settings: Mapping[str, Any]) -> None:
        """Apply the admin API's ``POST /_sandbox/faults`` document, all or nothing.

        Raises ``ValueError`` naming the first bad key; nothing is applied then.
        """
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; known: {', '.join(_SETTINGS)}")
        for key, value in settings.items():
            if not _SETTINGS[key](value):
                raise ValueError(f"bad value for {key!r}: {value!r}")
        s = dict(settings)
        for status_key in ("fail_status", "reject_status"):
            if status_key in s:
                _fault_code(s[status_key])
        if s.get("redirect_status", 301) not in REDIRECT_STATUSES:
            raise ValueError(f"bad value for 'redirect_status': {s['redirect_status']!r}")
        if s.get("reset"):
            self.reset_faults()
        if "outage" in s:
            self.set_outage(s["outage"])
        fail_keys = ("fail_next", "fail_status", "fail_message_chars", "fail_details")
        if any(k in s for k in fail_keys):
            f = self._faults
            self.fail_next(
                s.get("fail_next", f.fail_next), s.get("fail_status", 500),
                message_chars=s.get("fail_message_chars", f.fail_message_chars),
                details=s.get("fail_details", f.fail_details),
            )
        if "redirect_next" in s or "redirect_status" in s:
            self.redirect_next(s.get("redirect_next", self._faults.redirect_next),
                               s.get("redirect_status", 301))
        if "storm_s" in s:
            self.storm(s["storm_s"])
        if "slow_s" in s:
            self.set_slow(s["slow_s"])
        if "drop_after_commit" in s:
            self.drop_after_commit(s["drop_after_commit"])
        if "reject_external_ids" in s or "reject_status" in s:
            ids = s.get("reject_external_ids", self._faults.reject_external_ids)
            self.reject_external_ids(ids, s.get("reject_status", 422))
        if s.get("expire_tokens") or s.get("expire_static_tokens"):
            self.expire_tokens(static=bool(s.get("expire_static_tokens")))
        if "store_unauthorized" in s:
            self.store_unauthorized = s["store_unauthorized"]
        if "advance_s" in s:
            self.advance(s["advance_s"])

    # -- introspection -------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """Every event created, oldest first (copies)."""
        with self._lock:
            return json.loads(_dumps(self._events))  # type: ignore[no-any-return]

    def count_by_external_id(self) -> dict[str, int]:
        """``external.id`` -> how many events were created with it (1 is exactly once)."""
        counts: dict[str, int] = {}
        with self._lock:
            for event in self._events:
                ext = event["external"]["id"]
                counts[ext] = counts.get(ext, 0) + 1
        return counts

    @property
    def requests(self) -> list[RequestRecord]:
        """Every API request, in the order it was answered (admin calls excluded)."""
        with self._lock:
            return list(self._log)

    def request_times(self, *, accepted_only: bool = False) -> list[float]:
        """Arrival times of the requests that reached the API (not those an outage refused).

        Requests answered 429 are included unless ``accepted_only``: a client that
        respects the limits has ``max_in_window(times, 1.0) <= max_per_second`` over all.
        """
        return [
            r.at
            for r in self.requests
            if not r.refused and not (accepted_only and r.status == ERRORS["too_many_requests"][0])
        ]

    def state(self) -> dict[str, Any]:
        """Counts and switches, as ``GET /_sandbox/state`` returns them."""
        records = self.requests
        counts = self.count_by_external_id()
        times = self.request_times()
        with self._lock:
            faults = self._faults.as_dict()
            keys, tokens = len(self._stored), sum(t.issued for t in self._tokens.values())
        return {
            "url": self.url,
            "api_url": self.api_url,
            "token_url": self.token_url,
            "now": self.now(),
            "events": sum(counts.values()),
            "by_external_id": counts,
            "duplicates": {k: n for k, n in counts.items() if n > 1},
            "requests": len(records),
            "rate_limited": sum(r.status == 429 for r in records),
            "replayed": sum(r.replayed for r in records),
            "dropped": sum(r.dropped for r in records),
            "refused": sum(r.refused for r in records),
            "body_mismatches": sum(r.body_mismatch for r in records),
            "max_in_1s": max_in_window(times, 1.0),
            "max_in_60s": max_in_window(times, 60.0),
            "idempotency_keys": keys,
            "tokens_issued": tokens,
            "limits": {
                "max_per_second": self.max_per_second,
                "max_per_minute": self.max_per_minute,
            },
            "store_unauthorized": self.store_unauthorized,
            "faults": faults,
        }

