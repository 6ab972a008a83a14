"""The sandbox's HTTP server: connection tracking, framing, the request handler."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer, TCPServer
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from devkit.sandbox.rules import (
    ADMIN_PREFIX,
    IDLE_S,
    LOGGER,
    MAX_BODY,
    _error,
    _json_reply,
    _Reply,
)

if TYPE_CHECKING:
    from devkit.sandbox.api import Sandbox


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
            self._send(sandbox._admin(self.command, path, body, query))
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
