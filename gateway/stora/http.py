"""Bounded HTTP to Stora: deadlines that hold, bodies that are capped, text that is tamed.

Everything the agent takes from Stora over HTTP (an event reply, a token, an error, a
header) passes through here first, because each is a way for a broken or hostile peer,
or whoever sits on the path, to hurt the site (issue 11, items 2, 8 and 9):

* **Time.**  httpx's timeouts are per phase and per read: a server that drips a byte
  every few seconds, in the headers or in the body, never trips one.
  :func:`make_http_client` builds a client whose sockets honour the deadline of the
  exchange in progress on the calling thread (:func:`exchange` sets it), for connect,
  TLS, request, headers and body alike.  A client built elsewhere (tests inject one)
  still gets the deadline checked between body chunks.
* **Memory.**  :func:`exchange` reads at most ``limit`` bytes of a body, raw: it asks
  for ``Accept-Encoding: identity`` and does not decode a body compressed anyway (one
  64 KiB gzip chunk can inflate to 64 MiB).  Headers are bounded by h11 (16 KiB).
* **Text** (:mod:`gateway.stora.limits`).  ``cap_text`` makes a string one line
  (control characters escaped, so a newline or an ANSI escape cannot forge or colour a
  log line) and at most ``MAX_TEXT_CHARS`` long, marking the cut.  ``safe_id`` keeps an
  id only in the shape ids have.
* **Time from the server.**  :class:`ServerDate` hands the ``Date`` of responses that
  came over TLS (or from a loopback test server) to the clock as a second source.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpcore
import httpx

from gateway import __version__
from gateway.stora.limits import cap_text

__all__ = [
    "USER_AGENT",
    "Answer",
    "DeadlineExceeded",
    "ServerDate",
    "exchange",
    "make_http_client",
    "parse_http_date",
]

LOGGER = logging.getLogger(__name__)

USER_AGENT: Final = f"stora-gateway/{__version__}"

#: An IMF-fixdate is 29 characters; a much longer ``Date`` is not parsed at all.
_MAX_DATE_CHARS: Final = 64
#: No compression is asked for; anything but these is a body not to decode.
_IDENTITY: Final = frozenset({"", "identity"})


# -- the overall deadline, enforced at the socket ------------------------------------------
_DEADLINE = threading.local()


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` shortened to what is left of the thread's exchange; ``error`` past it."""
    ends: float | None = getattr(_DEADLINE, "ends", None)
    if ends is None:
        return timeout
    left = ends - time.monotonic()
    if left <= 0:
        raise error("the deadline of the exchange has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every wait ends by the current exchange's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking socket backend, with :class:`_DeadlineStream` streams."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` over :class:`_DeadlineBackend`.

    httpx offers no way to hand its connection pool a network backend, so the pool is
    built here as ``HTTPTransport`` builds it without a proxy, plus the backend; the
    request and response mapping is httpx's own.  (A proxy from the environment is
    mounted by httpx with its own transport: there only the between-chunks check holds.)
    """

    def __init__(self, limits: httpx.Limits) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend(),
        )


def make_http_client(timeout: httpx.Timeout) -> httpx.Client:
    """The ``httpx.Client`` for Stora: phase timeouts, overall deadlines, no redirects.

    Redirects are not followed: a request that Stora redirects means a wrong
    ``base_url`` or ``token_url``, and following it would resend the Authorization
    header (or the client secret) somewhere else.
    """
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
    return httpx.Client(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        transport=_DeadlineTransport(limits),
    )


# -- one exchange ----------------------------------------------------------------------------
class DeadlineExceeded(Exception):  # noqa: N818 - says what happened, like TimeoutError
    """The whole exchange took longer than its deadline."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back: status, headers (lower-case names) and the body when usable.

    ``unread`` says why ``body`` is empty although the server sent one (over the limit,
    or compressed); ``None`` when the body is all there.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes
    unread: str | None = None


def exchange(
    http: httpx.Client,
    method: str,
    url: str,
    *,
    deadline_s: float,
    limit: int,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    on_response: Callable[[httpx.Response], object] | None = None,
) -> Answer:
    """One request whose whole exchange ends within ``deadline_s``, body read up to ``limit``.

    ``on_response`` sees the response as soon as its headers are in (the body unread).
    Raises :class:`DeadlineExceeded` past the deadline, except for the ``httpx``
    errors that prove nothing was sent (``ConnectError``, ``ConnectTimeout``,
    ``PoolTimeout``), which are raised as they are, like every other ``httpx.HTTPError``.
    """
    ends = time.monotonic() + deadline_s
    outer: float | None = getattr(_DEADLINE, "ends", None)
    _DEADLINE.ends = ends if outer is None else min(outer, ends)
    sent = {**(headers or {}), "Accept-Encoding": "identity"}
    try:
        with http.stream(method, url, content=content, headers=sent) as response:
            if on_response is not None:
                on_response(response)
            return _read(response, ends, limit)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
        raise
    except httpx.HTTPError as exc:
        if time.monotonic() >= ends:
            raise DeadlineExceeded from exc
        raise
    finally:
        _DEADLINE.ends = outer


def _read(response: httpx.Response, ends: float, limit: int) -> Answer:
    headers = {k.lower(): v for k, v in response.headers.items()}
    status = response.status_code
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in _IDENTITY:
        return Answer(status, headers, b"", f"a body compressed ({cap_text(encoding, 40)}) "
                      "although none was asked for")
    # A response built in memory (httpx.MockTransport with bytes) arrives already read.
    raw = iter((response.content,)) if response.is_stream_consumed else response.iter_raw()
    chunks: list[bytes] = []
    size = 0
    for chunk in raw:
        if time.monotonic() > ends:
            raise DeadlineExceeded
        size += len(chunk)
        if size > limit:
            return Answer(status, headers, b"", f"a body of more than {limit} bytes")
        chunks.append(chunk)
    if time.monotonic() > ends:
        raise DeadlineExceeded
    return Answer(status, headers, b"".join(chunks))


# -- the server's clock ------------------------------------------------------------------------
def parse_http_date(value: str | None) -> float | None:
    """Epoch seconds of an HTTP ``Date`` (RFC 9110 IMF-fixdate), ``None`` for anything else."""
    if not value or len(value) > _MAX_DATE_CHARS:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
        stamp = when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None or not math.isfinite(stamp):  # "-0000": no zone, no trust
        return None
    return stamp


def _trusted(url: httpx.URL) -> bool:
    """Over TLS, or plain HTTP to this machine (tests): a Date nobody on the path wrote."""
    if url.scheme == "https":
        return True
    if url.scheme != "http":
        return False
    host = url.host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerDate:
    """Hands the ``Date`` of trusted responses to ``callback`` (epoch seconds).

    Trusted: received over ``https://``, or over ``http://`` from a loopback host.  A
    response without a ``Date``, or with one that does not parse, is ignored.  An
    exception from ``callback`` is logged and never reaches the request's caller.
    """

    def __init__(self, callback: Callable[[float], None] | None = None) -> None:
        self.callback = callback
        self._failures = 0

    def observe(self, response: httpx.Response) -> float | None:
        """The Date of ``response`` when trusted and valid (passed on), else ``None``."""
        if not _trusted(response.request.url):
            return None
        stamp = parse_http_date(response.headers.get("date"))
        if stamp is None or self.callback is None:
            return stamp
        try:
            self.callback(stamp)
        except Exception:  # the clock's problem must not stop delivery
            self._failures += 1
            if self._failures == 1:
                LOGGER.exception("the server-Date hook failed; delivery goes on")
            else:
                LOGGER.debug("the server-Date hook failed again (%d)", self._failures)
        return stamp
