"""The relay's client of Stora's Public API (stora-api.md): OAuth and the resources.

Synchronous ``httpx`` (the relay's routes that call Stora run in worker threads).  Every
answer is size-capped before it is parsed; errors become :class:`StoraError` with
Stora's code (stora-api §6) or, from the token endpoint, :class:`OAuthError` with the
RFC 6749 ``error`` ([ND] in stora-api §6: both shapes are read, whichever comes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from relay.config import StoraSection
from relay.errors import RelayError
from relay.metrics import STORA_REQUESTS

__all__ = ["MAX_ANSWER_BYTES", "Forwarded", "OAuthError", "StoraApi", "StoraError", "TokenSet"]

#: The most of one answer read (a page of 100 units is far less).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
TIMEOUT_S = 10.0


class StoraError(RelayError):
    """Stora refused or failed a request (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"Stora answered {status} {code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message


class OAuthError(StoraError):
    """The token endpoint refused: ``code`` is RFC 6749's ``error`` (``invalid_grant``…)."""


@dataclass(frozen=True)
class Forwarded:
    """Stora's answer as it came: status, body bytes (capped) and headers."""

    status: int
    body: bytes
    headers: httpx.Headers


@dataclass(frozen=True)
class TokenSet:
    """What the token endpoint gave (stora-api §2.2)."""

    access_token: str
    refresh_token: str | None
    expires_in: float
    scope: str
    created_at: float


def _text(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)[:limit]
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _error_of(status: int, doc: object) -> tuple[str, str]:
    """``(code, message)`` of an error body in Stora's shape or RFC 6749's."""
    if isinstance(doc, Mapping):
        error = doc.get("error")
        if isinstance(error, Mapping):  # Stora: {"error": {"code", "message", …}}
            return _text(error.get("code", "unknown")), _text(error.get("message", ""))
        if isinstance(error, str):  # RFC 6749 §5.2: {"error", "error_description"}
            return _text(error), _text(doc.get("error_description", ""))
    return "http_error", f"HTTP {status}"


class StoraApi:
    """Stora's API for the relay: ``transport`` lets tests route it anywhere."""

    def __init__(self, settings: StoraSection, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._http = httpx.Client(timeout=TIMEOUT_S, transport=transport,
                                  follow_redirects=False,
                                  headers={"User-Agent": "stora-relay"})

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ------------------------------------------------------------------ transport

    def _send(self, method: str, url: str, *, token: str | None = None,
              body: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
              idempotency_key: str | None = None) -> tuple[int, Any, httpx.Headers]:
        kind = "token" if url == self._settings.token_url else "api"
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        answer = self._exchange(method, url, headers, json_body=body, params=params,
                                kind=kind)
        try:
            doc = json.loads(answer.body) if answer.body else None
        except ValueError:
            doc = None
        return answer.status, doc, answer.headers

    def _exchange(self, method: str, url: str, headers: Mapping[str, str], *,
                  json_body: Mapping[str, Any] | None = None, content: bytes | None = None,
                  params: Mapping[str, Any] | None = None, kind: str = "api") -> Forwarded:
        """One request; the answer's bytes capped at :data:`MAX_ANSWER_BYTES`; counted
        by ``kind`` and status (relay/metrics.py)."""
        try:
            with self._http.stream(method, url, headers=headers, json=json_body, content=content,
                                   params=params) as answer:
                raw = b""
                for chunk in answer.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_ANSWER_BYTES:
                        raise StoraError(0, "too_large", f"Stora's answer to {method} {url} "
                                         f"is over {MAX_ANSWER_BYTES} bytes")
        except httpx.HTTPError as exc:
            STORA_REQUESTS.labels(kind, "unreachable").inc()
            raise StoraError(0, "unreachable", f"Stora could not be reached ({method} {url}): "
                             f"{type(exc).__name__}") from None
        STORA_REQUESTS.labels(kind, str(answer.status_code)).inc()
        return Forwarded(answer.status_code, raw, answer.headers)

    def _url(self, path: str) -> str:
        return self._settings.base_url.rstrip("/") + "/" + path.lstrip("/")

    # ------------------------------------------------------------------ OAuth

    def _token(self, body: Mapping[str, Any]) -> TokenSet:
        status, doc, _ = self._send("POST", self._settings.token_url, body=body)
        if status != 200:
            code, message = _error_of(status, doc)
            raise OAuthError(status, code, message)
        if not isinstance(doc, Mapping) or not isinstance(doc.get("access_token"), str):
            raise OAuthError(status, "invalid_response", "the token endpoint answered "
                             "without an access_token")
        refresh = doc.get("refresh_token")
        expires = doc.get("expires_in")
        created = doc.get("created_at")
        scope = doc.get("scope")
        return TokenSet(
            access_token=doc["access_token"],
            refresh_token=refresh if isinstance(refresh, str) and refresh else None,
            expires_in=float(expires) if isinstance(expires, int | float) else 7200.0,
            scope=scope if isinstance(scope, str) else "",
            created_at=float(created) if isinstance(created, int | float) else 0.0,
        )

    def exchange_code(self, code: str, redirect_uri: str, verifier: str) -> TokenSet:
        """Trade an authorization code for tokens (PKCE ``code_verifier``)."""
        s = self._settings
        return self._token({"grant_type": "authorization_code", "code": code,
                            "redirect_uri": redirect_uri, "client_id": s.client_id,
                            "client_secret": s.client_secret, "code_verifier": verifier})

    def refresh(self, refresh_token: str) -> TokenSet:
        """A new access token (and very probably a new refresh token: store it)."""
        s = self._settings
        return self._token({"grant_type": "refresh_token", "refresh_token": refresh_token,
                            "client_id": s.client_id, "client_secret": s.client_secret})

    # ------------------------------------------------------------------ resources

    def request(self, method: str, path: str, token: str, *,
                body: Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None,
                idempotency_key: str | None = None) -> Any:
        """One API call; its JSON document, or :class:`StoraError`."""
        status, doc, _ = self._send(method, self._url(path), token=token, body=body,
                                    params=params, idempotency_key=idempotency_key)
        if not 200 <= status < 300:
            code, message = _error_of(status, doc)
            raise StoraError(status, code, message)
        return doc

    def forward(self, method: str, path: str, token: str, content: bytes, *,
                idempotency_key: str | None = None,
                content_type: str = "application/json") -> Forwarded:
        """Send ``content`` as it is (the Timeline broker's way) and return Stora's answer
        whatever its status: status, body bytes and headers.  :class:`StoraError` (status
        0, ``unreachable`` or ``too_large``) only when there is no usable answer; then
        Stora may or may not have processed the request."""
        headers = {"Accept": "application/json", "Content-Type": content_type,
                   "Authorization": f"Bearer {token}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return self._exchange(method, self._url(path), headers, content=content,
                              kind="timeline")

    def pages(self, path: str, key: str, token: str, *,
              params: Mapping[str, Any] | None = None, limit: int = 100,
              max_pages: int = 1000) -> Iterator[dict[str, Any]]:
        """Every item of a paged list (stora-api §5), page by page."""
        page = 1
        while page <= max_pages:
            doc = self.request("GET", path, token, params={**(params or {}), "page": page,
                                                           "limit": limit})
            items = doc.get(key) if isinstance(doc, Mapping) else None
            if not isinstance(items, list):
                raise StoraError(200, "invalid_response", f"{path} answered without {key!r}")
            yield from (i for i in items if isinstance(i, dict))
            meta = doc.get("meta")
            pagination = meta.get("pagination") if isinstance(meta, Mapping) else None
            pages = pagination.get("pages") if isinstance(pagination, Mapping) else None
            if not isinstance(pages, int) or page >= pages or not items:
                return
            page += 1
