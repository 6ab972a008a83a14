"""``stora-gateway sandbox``: a local stand-in for the Stora Public API.

The outbox promises that each Timeline Event reaches Stora exactly once however the
network, the API or the gateway fail (contract §6).  Stora offers no self-service sandbox
(stora-api §1), so the tests and benchmarks need a peer that speaks the documented API over
real HTTP and fails on demand.  This is it: standard library only (``http.server``), one
process, state in memory, one operator and one app.

Endpoints::

    POST /oauth2/token              Client Credentials, JSON body (stora-api §2.2)
    POST /2025-09/timeline/events   creates an ``aevt_…`` event (stora-api §3.2)
    GET  /2025-09/timeline/sources  the ``timeline_sources`` given, paged (stora-api §3.4;
                                    scope ``public.timeline_source:read``), for
                                    ``check-config --online``
    /_sandbox/…                     admin API (state, faults, clock); not Stora's
    anything else                   404 invalid_endpoint

A request passes these layers in order, as a web app behind a rate limiter would:

1. **outage** (fault): the connection is closed without a reply.
   **redirect** (fault): a front proxy answers a 3xx with a ``Location`` elsewhere, as
   after a move of the API; nothing behind it sees the request.
2. **rate limiter**: ``429 too_many_requests`` during a storm or over a limit.
3. **router**: ``404 invalid_endpoint``.
4. **idempotency** (event POSTs with ``Idempotency-Key``): a stored reply is replayed
   verbatim; a key whose first request is still being processed gets ``409 conflict``.
5. **slow** (fault): the app takes this long.
6. **authentication**: ``401 invalid_token``; ``403 forbidden`` without the
   ``public.timeline_event:write`` scope.
7. **the app**: ``fail_next`` (fault; its message and ``details`` can be made huge, as
   no real Stora would, to test what a client keeps of them), ``406`` for an ``Accept``
   that excludes JSON, ``400``
   for a body that is not JSON, ``422`` for a body of the wrong shape or a rejected
   ``external.id`` (fault), else ``201``; ``drop_after_commit`` (fault) then closes the
   connection instead of answering.

Choices where Stora documents nothing ([ND] in stora-api.md), taken as the most hostile
reading that is still plausible, so a client that copes here copes with Stora:

* **Rate limits** apply to every request that reaches the API, ``/oauth2/token``
  included, and are shared by all clients and tokens.  Windows slide: no 1-second and no
  60-second span ever holds more accepted requests than the limit.  A request answered 429
  does not count.  ``RateLimit-Limit`` (the limit that refused) and ``RateLimit-Reset``
  (integer UTC epoch seconds, rounded up, when a slot frees) are sent on 429s only.
* **Idempotency keys** are global (not per token or client) and apply to event POSTs.
  The first reply is stored for ``idempotency_ttl_s``, counted from when it was stored,
  whatever its status: 201, 400, 403, 406, 422 and 500, and by default **401 too**
  (``store_unauthorized``), as if the idempotency layer sat in front of authentication;
  set it ``False`` for the opposite reading.  429s, 404s, the in-progress 409 and
  outages are answered in front of that layer and never stored.  A repeat with a
  *different* body gets the stored reply all the same (the docs say "replayed
  verbatim"); the request log flags it (``body_mismatch``) so tests can fail a client
  that reuses keys.  A replay is marked nowhere in the reply.
* **OAuth errors** use RFC 6749 §5.2: ``{"error": "invalid_client", "error_description":
  …}``, 401 for bad client credentials and 400 for the rest (``invalid_request``,
  ``unsupported_grant_type``, ``invalid_scope``).  The token endpoint takes JSON only,
  as in the docs' example; a form body is ``invalid_request``.  It has no idempotency.
* **Event bodies**: ``source.id`` and ``external.id`` are required non-empty strings;
  ``description`` is a string when present; ``template``, ``contact`` and ``site`` are
  ``null`` or ``{"id": …}`` with their documented id prefix; ``external.url`` is a string
  or ``null``; ``variables`` an object; any other key is refused.  Each problem is one
  ``details`` entry with a JSON pointer.
* **Static tokens** hold every scope; issued tokens hold the scopes asked for.

The clock (epoch seconds, injectable, plus :meth:`Sandbox.advance`) drives token expiry,
key expiry, rate limits and every recorded time; ``slow`` sleeps on real time.

Admin API, for a test in another process (same server; never rate limited,
authenticated or recorded)::

    GET  /_sandbox/state     counts and switches: see Sandbox.state
    GET  /_sandbox/events    {"events": [...]}, as created
    GET  /_sandbox/requests  {"requests": [RequestRecord as an object, ...]}
    POST /_sandbox/faults    {"reset": bool, "outage": bool, "fail_next": n,
                              "fail_status": 500, "fail_message_chars": n,
                              "fail_details": n, "redirect_next": n,
                              "redirect_status": 301, "storm_s": s, "slow_s": s,
                              "drop_after_commit": n, "reject_external_ids": [id, ...],
                              "reject_status": 422, "expire_tokens": bool,
                              "expire_static_tokens": bool, "store_unauthorized": bool,
                              "advance_s": s}
                             any subset, applied all or nothing ("reset" first);
                             200 {"faults": {...}} or 400 {"error": "..."}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer, TCPServer
from types import FrameType
from typing import Any, Final, TextIO, cast
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "API_VERSION",
    "EVENT_SCOPE",
    "RequestRecord",
    "Sandbox",
    "max_in_window",
    "read_secret_file",
    "read_token_file",
    "serve",
]

LOGGER = logging.getLogger(__name__)

API_VERSION: Final = "2025-09"
TOKEN_PATH: Final = "/oauth2/token"  # noqa: S105 (a path, not a password)
EVENTS_PATH: Final = f"/{API_VERSION}/timeline/events"
ADMIN_PREFIX: Final = "/_sandbox"
#: The scope ``POST /timeline/events`` needs (stora-api §3.2).
EVENT_SCOPE: Final = "public.timeline_event:write"
SOURCES_PATH: Final = f"/{API_VERSION}/timeline/sources"
#: The scope ``GET /timeline/sources`` needs (stora-api §3.4).
SOURCE_SCOPE: Final = "public.timeline_source:read"
#: stora-api §5: ``limit`` is 1–100, default 50.
PAGE_LIMIT_DEFAULT: Final = 50
PAGE_LIMIT_MAX: Final = 100
#: A request body larger than this is refused; an event is well under 4 KiB.
MAX_BODY: Final = 1 << 20
#: How often the serving loop looks for a stop request; bounds :meth:`Sandbox.stop`.
POLL_S: Final = 0.02
#: An idle keep-alive connection is closed after this long, like any web server does.
IDLE_S: Final = 30.0

#: stora-api §6: error code -> (HTTP status, type).
ERRORS: Final[Mapping[str, tuple[int, str]]] = {
    "invalid_request": (400, "invalid_request_error"),
    "api_error": (400, "api_error"),
    "invalid_token": (401, "invalid_request_error"),
    "forbidden": (403, "invalid_request_error"),
    "resource_not_found": (404, "invalid_request_error"),
    "invalid_endpoint": (404, "invalid_request_error"),
    "invalid_format": (406, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "invalid_url_param": (422, "invalid_request_error"),
    "invalid_content": (422, "invalid_request_error"),
    "too_many_requests": (429, "invalid_request_error"),
    "internal_server_error": (500, "api_error"),
}
#: Statuses the ``redirect_next`` fault can answer (a POST keeps its method on 307/308).
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
#: Where a redirect points when the test does not say: a host that never resolves.
REDIRECT_LOCATION: Final = "https://moved.invalid"
#: Statuses ``fail_next`` and ``reject_external_ids`` can answer, with their §6 code.
FAULT_CODES: Final[Mapping[int, str]] = {
    400: "api_error",
    403: "forbidden",
    404: "resource_not_found",
    409: "conflict",
    422: "invalid_content",
    500: "internal_server_error",
}
_LINKS: Final = (
    {
        "kind": "openapi",
        "name": "OpenAPI",
        "url": f"https://public-api.stora.co/{API_VERSION}/openapi.json",
    },
    {"kind": "docs", "name": "Errors", "url": f"https://docs.stora.co/{API_VERSION}/guides/errors"},
)
#: Optional ``{"id": …}`` references of an event body and the id prefix each takes.
_REFS: Final[Mapping[str, str]] = {"template": "aetpl_", "contact": "con_", "site": "site_"}
_EVENT_KEYS: Final = frozenset({"source", "external", "description", "variables", *_REFS})
_SCOPE_RE: Final = re.compile(r"public\.[a-z_]+:(read|write)")
_JSON: Final = "application/json; charset=utf-8"

Clock = Callable[[], float]


def max_in_window(times: Iterable[float], window_s: float) -> int:
    """The most ``times`` that fall within any span shorter than ``window_s``.

    Two times share a window when they are less than ``window_s`` apart, which is how
    the sandbox's limiter counts, so ``max_in_window(accepted, 1.0) <= max_per_second``
    always holds for the accepted requests.
    """
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request to the API (admin calls are not recorded).

    ``status`` is what the sandbox decided, also when it then ``dropped`` the connection
    instead of answering; it is ``None`` when the request was ``refused`` by an outage.
    """

    at: float
    method: str
    path: str
    status: int | None
    idempotency_key: str | None
    replayed: bool = False
    dropped: bool = False
    refused: bool = False
    body_mismatch: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False  # close the connection instead of sending this


@dataclass(frozen=True, slots=True)
class _Stored:
    reply: _Reply
    stored_at: float
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class _Token:
    creator: str  # "app_…" or "tok_…", the event's creator
    scopes: frozenset[str] | None  # None: every scope
    expires_at: float
    issued: bool  # by /oauth2/token, as opposed to a static token


@dataclass(slots=True)
class _Faults:
    outage: bool = False
    fail_next: int = 0
    fail_status: int = 500
    fail_message_chars: int = 0
    fail_details: int = 0
    redirect_next: int = 0
    redirect_status: int = 301
    redirect_location: str = REDIRECT_LOCATION
    storm_until: float | None = None
    slow_s: float = 0.0
    drop_after_commit: int = 0
    reject_external_ids: frozenset[str] = frozenset()
    reject_status: int = 422

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reject_external_ids"] = sorted(self.reject_external_ids)
        return data


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _json_reply(status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, _dumps(obj), (("Content-Type", _JSON), *headers))


def _error(
    code: str,
    message: str,
    details: Iterable[tuple[str, str]] = (),
    headers: tuple[tuple[str, str], ...] = (),
) -> _Reply:
    """A stora-api §6 error; ``details`` are ``(pointer, message)`` pairs."""
    status, kind = ERRORS[code]
    error = {
        "code": code,
        "type": kind,
        "message": message,
        "request_id": str(uuid.uuid4()),
        "details": [{"message": m, "pointer": p} for p, m in details],
        "links": list(_LINKS),
    }
    return _json_reply(status, {"error": error}, headers)


def _oauth_error(status: int, error: str, description: str) -> _Reply:
    return _json_reply(status, {"error": error, "error_description": description})


def _rfc3339(t: float) -> str:
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    ranges = {_media_type(part) for part in accept.split(",")}
    return bool(ranges & {"application/json", "application/*", "*/*"})


def _fingerprint(body: bytes) -> bytes:
    """The body as compared between repeats of a key: parsed JSON, else the bytes."""
    try:
        return json.dumps(json.loads(body), sort_keys=True).encode() if body else b""
    except ValueError:
        return body


def _check_id(
    doc: Mapping[str, Any], key: str, prefix: str, required: bool
) -> list[tuple[str, str]]:
    """Problems with ``doc[key]``, which must be ``{"id": "<prefix>…"}`` (or null)."""
    value = doc.get(key)
    if value is None:
        return [(f"/{key}", "is required")] if required else []
    if not isinstance(value, dict):
        return [(f"/{key}", 'must be an object like {"id": "…"}')]
    problems = [(f"/{key}/{k}", "is not a permitted field") for k in value if k != "id"]
    ident = value.get("id")
    if ident is None:
        problems.append((f"/{key}/id", "is required"))
    elif not isinstance(ident, str) or not ident:
        problems.append((f"/{key}/id", "must be a non-empty string"))
    elif not ident.startswith(prefix):
        problems.append((f"/{key}/id", f"must be an id starting with {prefix!r}"))
    return problems


def _validate_event(doc: object) -> list[tuple[str, str]]:
    """``(pointer, message)`` for each problem of a ``POST /timeline/events`` body."""
    if not isinstance(doc, dict):
        return [("", "must be a JSON object")]
    problems = [(f"/{k}", "is not a permitted field") for k in doc if k not in _EVENT_KEYS]
    problems += _check_id(doc, "source", "tsrc_", required=True)
    for key, prefix in _REFS.items():
        problems += _check_id(doc, key, prefix, required=False)
    if "description" in doc and not isinstance(doc["description"], str):
        problems.append(("/description", "must be a string"))
    if "variables" in doc and not isinstance(doc["variables"], dict):
        problems.append(("/variables", "must be an object"))
    external = doc.get("external")
    if not isinstance(external, dict):
        problems.append(("/external", "is required" if external is None else "must be an object"))
        return problems
    problems += [
        (f"/external/{k}", "is not a permitted field") for k in external if k not in ("id", "url")
    ]
    if not isinstance(external.get("id"), str) or not external["id"]:
        problems.append(("/external/id", "is required and must be a non-empty string"))
    if not isinstance(external.get("url", ""), str | None):
        problems.append(("/external/url", "must be a string"))
    return problems


class _RateLimiter:
    """Sliding 1-second and 60-second windows over accepted requests."""

    def __init__(self, per_second: int, per_minute: int) -> None:
        self.windows = ((1.0, per_second), (60.0, per_minute))
        self._accepted: list[float] = []

    def admit(self, now: float) -> tuple[int, float] | None:
        """``None`` and the request counts, or ``(limit, reset_at)`` and it does not.

        With ``k`` requests in a window of limit ``n``, a slot frees when the
        ``(k - n + 1)``-th oldest leaves it (``k == n`` unless the clock went back).
        """
        self._accepted = [t for t in self._accepted if t > now - 60.0]
        refusal: tuple[int, float] | None = None
        for span, limit in self.windows:
            inside = sorted(t for t in self._accepted if t > now - span)
            if len(inside) >= limit:
                reset = inside[len(inside) - limit] + span
                if refusal is None or reset > refusal[1]:
                    refusal = (limit, reset)
        if refusal is None:
            self._accepted.append(now)
        return refusal


class Sandbox:
    """A local Stora API: the real HTTP peer of the outbox's tests and benchmarks.

    ``clients`` maps OAuth client ids to secrets; ``static_tokens`` are long-lived Bearer
    tokens.  Use as a context manager or call :meth:`start` and :meth:`stop`.  Every
    method is thread-safe.  The module docstring lists the behaviours chosen where
    Stora's are undocumented.
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
        #: Whether a 401 is stored under its Idempotency-Key (module docstring).
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
        self._stored: dict[str, _Stored] = {}
        self._inflight: set[str] = set()
        self._events: list[dict[str, Any]] = []
        self._log: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> Sandbox:
        """Listen and serve in a background thread; :attr:`port` becomes the real port."""
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_S},
            name="stora-sandbox",
            daemon=True,
        )
        self._thread.start()
        LOGGER.info("Stora sandbox listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, idle keep-alive ones included."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes requests sleeping in "slow"
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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

    # -- the API ---------------------------------------------------------------------
    def _refuse(self, method: str, path: str, key: str | None) -> bool:
        """True (and recorded) when an outage refuses this request."""
        with self._lock:
            if not self._faults.outage:
                return False
            self._log.append(RequestRecord(self.now(), method, path, None, key, refused=True))
            return True

    def _handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                query: str = "") -> _Reply:
        """Answer one API request (layers 2–8 of the module docstring) and record it."""
        key = headers.get("idempotency-key") or None
        with self._lock:
            now = self.now()
            reply = self._redirect(path) or self._admit(now)
        replayed = mismatch = False
        if reply is not None:
            pass
        elif method == "POST" and path == TOKEN_PATH:
            self._delay()
            reply = self._issue_token(headers, body)
        elif method == "POST" and path == EVENTS_PATH:
            reply, replayed, mismatch = self._post_event(headers, body, key)
        elif method == "GET" and path == SOURCES_PATH:
            self._delay()
            reply = self._list_sources(headers, query)
        else:
            self._delay()
            reply = _error("invalid_endpoint", f"no endpoint {method} {path}")
        record = RequestRecord(
            now, method, path, reply.status, key, replayed, reply.drop, False, mismatch
        )
        with self._lock:
            self._log.append(record)
        return reply

    def _redirect(self, path: str) -> _Reply | None:
        """The front proxy's 3xx while ``redirect_next`` lasts (caller holds the lock)."""
        f = self._faults
        if f.redirect_next <= 0:
            return None
        f.redirect_next -= 1
        target = f.redirect_location + path
        page = f'<html><body>Moved to <a href="{target}">{target}</a></body></html>'
        return _Reply(f.redirect_status, page.encode(),
                      (("Content-Type", "text/html"), ("Location", target)))

    def _admit(self, now: float) -> _Reply | None:
        """The 429 for a storm or an exceeded limit, else ``None`` (caller holds the lock)."""
        storm = self._faults.storm_until
        if storm is not None and now < storm:
            limit, reset = self.max_per_second, storm
        else:
            refusal = self._limiter.admit(now)
            if refusal is None:
                return None
            limit, reset = refusal
        headers = (("RateLimit-Limit", str(limit)), ("RateLimit-Reset", str(math.ceil(reset))))
        return _error(
            "too_many_requests", "Rate limit exceeded; retry after RateLimit-Reset", (), headers
        )

    def _delay(self) -> None:
        with self._lock:
            slow = self._faults.slow_s
        if slow > 0:
            self._stopping.wait(slow)

    def _issue_token(self, headers: Mapping[str, str], body: bytes) -> _Reply:
        if _media_type(headers.get("content-type")) != "application/json":
            return _oauth_error(
                400, "invalid_request", "the body must be JSON (Content-Type: application/json)"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            return _oauth_error(400, "invalid_request", "the body is not valid JSON")
        fields = ("grant_type", "client_id", "client_secret", "scope")
        if not isinstance(doc, dict) or not all(
            isinstance(doc.get(f), str) and doc[f] for f in fields
        ):
            return _oauth_error(400, "invalid_request", f"{', '.join(fields)} are required strings")
        if doc["grant_type"] != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "only client_credentials is supported"
            )
        secret = self._clients.get(doc["client_id"])
        if secret is None or not hmac.compare_digest(
            secret.encode(), doc["client_secret"].encode()
        ):
            return _oauth_error(401, "invalid_client", "client authentication failed")
        scopes = doc["scope"].split()
        if not scopes or not all(_SCOPE_RE.fullmatch(s) for s in scopes):
            return _oauth_error(
                400, "invalid_scope", "scopes look like public.<resource>:read|write"
            )
        token = secrets.token_urlsafe(32)
        creator = f"app_{hashlib.sha256(doc['client_id'].encode()).hexdigest()[:16]}"
        with self._lock:
            now = self.now()
            self._tokens[token] = _Token(creator, frozenset(scopes), now + self.token_ttl_s, True)
        return _json_reply(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_ttl_s),
                "scope": " ".join(scopes),
                "created_at": int(now),
                "refresh_token": None,
            },
        )

    def _post_event(
        self, headers: Mapping[str, str], body: bytes, key: str | None
    ) -> tuple[_Reply, bool, bool]:
        """Idempotency around :meth:`_create_event`: ``(reply, replayed, body_mismatch)``."""
        fingerprint = _fingerprint(body)
        if key is not None:
            with self._lock:
                stored = self._stored.get(key)
                if stored is not None and self.now() >= stored.stored_at + self.idempotency_ttl_s:
                    del self._stored[key]
                    stored = None
                if stored is not None:
                    return stored.reply, True, stored.fingerprint != fingerprint
                if key in self._inflight:
                    return (
                        _error("conflict", "a request with this Idempotency-Key is in progress"),
                        False,
                        False,
                    )
                self._inflight.add(key)
        try:
            self._delay()
            reply = self._create_event(headers, body)
            with self._lock:
                if key is not None and (reply.status != 401 or self.store_unauthorized):
                    self._stored[key] = _Stored(reply, self.now(), fingerprint)
                if reply.status == 201 and self._faults.drop_after_commit > 0:
                    self._faults.drop_after_commit -= 1
                    reply = dataclasses.replace(reply, drop=True)
        finally:
            if key is not None:
                with self._lock:
                    self._inflight.discard(key)
        return reply, False, False

    def _authenticate(self, headers: Mapping[str, str],
                      scope: str = EVENT_SCOPE) -> _Token | _Reply:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            info = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            valid = info is not None and self.now() < info.expires_at
        if info is None or not valid:
            why = "missing Bearer token" if not token else "the access token is invalid or expired"
            return _error(
                "invalid_token", why, (), (("WWW-Authenticate", 'Bearer error="invalid_token"'),)
            )
        if info.scopes is not None and scope not in info.scopes:
            return _error("forbidden", f"the access token lacks the {scope} scope")
        return info

    def _list_sources(self, headers: Mapping[str, str], query: str) -> _Reply:
        """``GET /timeline/sources``: one page of the sources, as stora-api §3.4 and §5."""
        token = self._authenticate(headers, SOURCE_SCOPE)
        if isinstance(token, _Reply):
            return token
        params = dict(parse_qsl(query))
        try:
            page = int(params.get("page", "1"))
            limit = int(params.get("limit", str(PAGE_LIMIT_DEFAULT)))
        except ValueError:
            page = limit = 0
        if page < 1 or not 1 <= limit <= PAGE_LIMIT_MAX:
            return _error("invalid_url_param",
                          f"page must be at least 1 and limit 1–{PAGE_LIMIT_MAX}")
        stamp = _rfc3339(self.now())
        sources = [{"id": ident, "name": f"Sandbox source {ident}", "website_url": None,
                    "global": False, "created_at": stamp, "updated_at": stamp}
                   for ident in self.timeline_sources]
        pages = max(1, math.ceil(len(sources) / limit))
        pagination = {"count": len(sources), "page": page, "pages": pages, "limit": limit,
                      "next": page + 1 if page < pages else None,
                      "prev": page - 1 if page > 1 else None, "last": pages}
        return _json_reply(200, {
            "timeline_sources": sources[(page - 1) * limit:page * limit],
            "meta": {"pagination": pagination, "request_id": str(uuid.uuid4())},
        })

    def _create_event(self, headers: Mapping[str, str], body: bytes) -> _Reply:
        """Layers 6 and 7: authenticate, validate and commit one event."""
        token = self._authenticate(headers)
        if isinstance(token, _Reply):
            return token
        with self._lock:
            f = self._faults
            failing = f.fail_next > 0
            if failing:
                f.fail_next -= 1
                status, chars, details = f.fail_status, f.fail_message_chars, f.fail_details
        if failing:
            return _injected_failure(status, chars, details)
        if not _accepts_json(headers.get("accept")):
            return _error("invalid_format", "this endpoint answers application/json only")
        if _media_type(headers.get("content-type")) != "application/json":
            return _error(
                "invalid_request", "request bodies must be JSON (Content-Type: application/json)"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            return _error("invalid_request", "the request body is not valid JSON")
        problems = _validate_event(doc)
        if problems:
            return _error("invalid_content", "the request body is invalid", problems)
        external_id = doc["external"]["id"]
        with self._lock:
            rejected = external_id in self._faults.reject_external_ids
            status = self._faults.reject_status
            if not rejected:
                event = self._new_event(doc, token.creator)
                self._events.append(event)
        if rejected:
            return _error(
                FAULT_CODES[status],
                "external id refused (sandbox reject_external_ids)",
                [("/external/id", "is refused")],
            )
        return _json_reply(201, {"event": event, "meta": {"request_id": str(uuid.uuid4())}})

    def _new_event(self, doc: Mapping[str, Any], creator: str) -> dict[str, Any]:
        """The stored event, shaped like stora-api §3.2's response example."""
        stamp = _rfc3339(self.now())
        external = doc["external"]

        def ref(key: str) -> dict[str, str] | None:
            value = doc.get(key)
            return {"id": value["id"]} if isinstance(value, dict) else None

        return {
            "id": f"aevt_{uuid.uuid4().hex[:24]}",
            "contact": ref("contact"),
            "site": ref("site"),
            "unit": None,
            "unit_type": None,
            "tenancy": None,
            "subscription": None,
            "invoice": None,
            "source": ref("source"),
            "template": ref("template"),
            "creator": {"id": creator},
            "description": doc.get("description"),
            "external": {"id": external["id"], "url": external.get("url")},
            "variables": doc.get("variables") or {},
            "created_at": stamp,
            "updated_at": stamp,
        }

    # -- the admin API ------------------------------------------------------------------
    def _admin(self, method: str, path: str, body: bytes) -> _Reply:
        """``/_sandbox/…``: not Stora's; never limited, authenticated or recorded."""
        route = (method, path.rstrip("/"))
        if route == ("GET", f"{ADMIN_PREFIX}/state"):
            return _json_reply(200, self.state())
        if route == ("GET", f"{ADMIN_PREFIX}/events"):
            return _json_reply(200, {"events": self.events()})
        if route == ("GET", f"{ADMIN_PREFIX}/requests"):
            return _json_reply(200, {"requests": [r.as_dict() for r in self.requests]})
        if route == ("POST", f"{ADMIN_PREFIX}/faults"):
            try:
                self.configure(_json_object(body))
            except (TypeError, ValueError) as exc:
                return _json_reply(400, {"error": str(exc)})
            return _json_reply(200, {"faults": self.state()["faults"]})
        return _json_reply(404, {"error": f"no admin endpoint {method} {path}"})


def _injected_failure(status: int, message_chars: int, details: int) -> _Reply:
    """The ``fail_next`` error, its message and details padded as the fault asks."""
    message = _padded("injected failure (sandbox fail_next)", message_chars)
    extra = [(f"/details/{i}", _padded(f"injected detail {i}", message_chars))
             for i in range(details)]
    return _error(FAULT_CODES[status], message, extra)


def _padded(text: str, chars: int) -> str:
    return text if len(text) >= chars else text + " " + "x" * (chars - len(text) - 1)


def _json_object(body: bytes) -> dict[str, Any]:
    doc = json.loads(body or b"{}")
    if not isinstance(doc, dict):
        raise TypeError("the body must be a JSON object")
    return doc


def _count(n: int) -> int:
    if n < 0:
        raise ValueError("a count cannot be negative")
    return n


def _fault_code(status: int) -> str:
    code = FAULT_CODES.get(status)
    if code is None:
        raise ValueError(f"status {status} cannot be injected; use one of {sorted(FAULT_CODES)}")
    return code


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_seconds(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(i, str) for i in v)


#: ``POST /_sandbox/faults`` keys and their validators.
_SETTINGS: Final[Mapping[str, Callable[[object], bool]]] = {
    "reset": _is_bool,
    "outage": _is_bool,
    "fail_next": _is_count,
    "fail_status": _is_count,
    "fail_message_chars": _is_count,
    "fail_details": _is_count,
    "redirect_next": _is_count,
    "redirect_status": _is_count,
    "storm_s": _is_seconds,
    "slow_s": _is_seconds,
    "drop_after_commit": _is_count,
    "reject_external_ids": _is_ids,
    "reject_status": _is_count,
    "expire_tokens": _is_bool,
    "expire_static_tokens": _is_bool,
    "store_unauthorized": _is_bool,
    "advance_s": _is_seconds,
}


# -- HTTP ---------------------------------------------------------------------------------
class ConnectionTracking(BaseServer):
    """A socketserver mixin that remembers its open connections, so a stop can end them:
    a keep-alive client must not talk to a stopped server, and a handler thread that
    never closes its socket leaves it to the garbage collector (a warning in tests).
    Call :meth:`track_connections` from ``__init__``; list it before the server class.
    """

    _connections: set[socket.socket]
    _conn_lock: threading.Lock

    def track_connections(self) -> None:
        """Start with no connection."""
        self._connections = set()
        self._conn_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut and close every open connection."""
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


class _Server(ConnectionTracking, ThreadingHTTPServer):
    """A threading HTTP server that can close its open connections on stop."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sandbox = sandbox
        self.track_connections()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow on a box
        # without DNS; the name is only used in CGI environments.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = (
            str(self.server_address[0]),
            int(self.server_address[1]),
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        # A reply goes out in two writes (headers, then body); with Nagle's algorithm the
        # body waits for the client's delayed ACK, about 40 ms per request on Linux.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOGGER.debug("connection from %s failed", client_address, exc_info=True)


class _BadFramingError(Exception):
    """The request's body cannot be delimited; the connection cannot continue."""


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP into :meth:`Sandbox._handle` calls and back."""

    protocol_version = "HTTP/1.1"  # keep-alive, as an httpx client uses it
    timeout = IDLE_S
    server_version = "stora-sandbox"
    sys_version = ""

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        sandbox = cast(_Server, self.server).sandbox
        path, query = urlsplit(self.path).path, urlsplit(self.path).query
        headers = {k.lower(): v for k, v in self.headers.items()}
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            try:
                body = self._read_body(headers)
            except _BadFramingError as exc:
                self._send(_json_reply(400, {"error": str(exc)}), close=True)
                return
            self._send(sandbox._admin(self.command, path, body))
            return
        if sandbox._refuse(self.command, path, headers.get("idempotency-key") or None):
            self.close_connection = True  # network down: no reply at all
            return
        try:
            body = self._read_body(headers)
        except _BadFramingError as exc:
            self._send(_error("invalid_request", str(exc)), close=True)
            return
        reply = sandbox._handle(self.command, path, headers, body, query)
        if reply.drop:
            self.close_connection = True
        else:
            self._send(reply)

    def _read_body(self, headers: Mapping[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadFramingError("chunked request bodies are not supported; send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadFramingError("Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise _BadFramingError(f"the body must be 0–{MAX_BODY} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            # The client went away mid-body (killed between the headers and the body,
            # which httpx writes separately).  A real server never dispatches such a
            # request, so nothing may be stored under its Idempotency-Key.
            raise _BadFramingError(f"the body ended after {len(body)} of {length} bytes")
        return body

    def _send(self, reply: _Reply, close: bool = False) -> None:
        try:
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:  # the client went away: nothing to tell it
            self.close_connection = True

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.debug("%s " + format, self.address_string(), *args)


# -- command line ---------------------------------------------------------------------------
def read_secret_file(path: str) -> str:
    """The secret in ``path``, surrounding whitespace removed; ``ValueError`` if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def read_token_file(path: str) -> list[str]:
    """Static tokens in ``path``, one per line; blank lines and ``#`` comments skipped."""
    tokens = [
        line.strip()
        for line in read_secret_file(path).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return tokens


def serve(sandbox: Sandbox, out: TextIO) -> int:
    """Run ``sandbox`` in the foreground until SIGINT or SIGTERM; print its URLs first.

    ``OSError`` when the address cannot be bound.  Outside the main thread (where
    signals cannot be caught) it serves until the process ends.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("signal %d: stopping the sandbox", signum)
        stop.set()

    sandbox.start()
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        for name, value in (
            ("url", sandbox.url),
            ("api_url", sandbox.api_url),
            ("token_url", sandbox.token_url),
            ("admin_url", sandbox.url + ADMIN_PREFIX),
        ):
            out.write(f"{name}: {value}\n")
        out.flush()
        while not stop.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sandbox.stop()
    return 0
