"""The sandbox's rules: limits, error shapes, event validation, the rate limiter.

Pure helpers of :class:`devkit.sandbox.app.Sandbox`; the behaviours they encode are
listed in docs/design/sandbox.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

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
    #: The operator whose budget the request was charged to (docs/design/sandbox.md).
    operator: str | None = None

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
    operator: str = "default"  # whose resources it reaches (devkit/sandbox/operators.py)
    grant: str | None = None  # the Authorization Code grant it came from, if any


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

