"""A scripted HTTP/1.1 server on 127.0.0.1 for answers no real Stora would give.

The sandbox (devkit/sandbox/) is a faithful Stora; this is the other side of the
path: whatever a broken proxy, a compromised endpoint or a man in the middle could send.
A test gives a ``script`` that maps each request to a :class:`Reply`, which may

* announce and stream a body of any size without allocating it (``size`` bytes of
  ``fill``, sent from one small buffer),
* drip its body or even its status line and headers, one byte every ``drip_s``,
* carry any status, headers (a ``Date`` or none) and body.

The server counts the bytes it managed to send (``bytes_sent``): a client that stops
reading at its cap makes the count stop near the cap.  Every connection is closed after
one reply (``Connection: close``).  With ``ssl_context`` it speaks HTTPS (the TLS
handshake runs in the handler thread).  :meth:`HostileServer.stop` wakes every drip and
joins every handler thread, so a test leaves no socket or thread behind.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from devkit.sandbox import ConnectionTracking

#: One write of a streamed body; the buffer is allocated once per reply.
CHUNK = 64 * 1024
#: A request body larger than this is not read (the gateway sends a few KiB).
MAX_REQUEST_BODY = 1 << 20


@dataclass(frozen=True)
class Request:
    """What the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    """One scripted answer.

    ``date``: ``None`` sends no ``Date``, ``"now"`` the current time, anything else as is.
    ``size``: stream ``size`` bytes of ``fill`` instead of ``body`` (Content-Length set).
    ``drip_s``: pause between body bytes, each sent alone; ``head_drip_s``: the same for
    the status line and headers.
    """

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    date: str | None = "now"
    size: int | None = None
    fill: bytes = b"x"
    drip_s: float = 0.0
    head_drip_s: float = 0.0


def json_reply(status: int, text: str, **kwargs: Any) -> Reply:
    """A reply with a JSON body given as text (so it may be anything, even invalid)."""
    headers = [("Content-Type", "application/json"), *kwargs.pop("headers", [])]
    return Reply(status, text.encode("utf-8"), headers, **kwargs)


class _Gone(Exception):
    """The client went away, or the server is stopping."""


class HostileServer:
    """Serves ``script(request) -> Reply`` on ``127.0.0.1``; use as a context manager."""

    def __init__(self, script: Callable[[Request], Reply],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.ssl_context = ssl_context
        self.requests: list[Request] = []
        self.bytes_sent = 0
        #: Bytes sent one at a time with a pause (``drip_s``/``head_drip_s``): how far a
        #: drip got tells how long a client listened, whatever the machine's load.
        self.bytes_dripped = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
            name="hostile-http", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (``https://`` with an ``ssl_context``)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, wake every drip, close every connection, join every thread."""
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()  # joins the handler threads (block_on_close)
        self._thread.join()

    # -- used by the handler ----------------------------------------------------------------
    def _record(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
        return self.script(request)

    def _send(self, sock: socket.socket, data: bytes, drip_s: float) -> None:
        pieces = [data] if drip_s <= 0 else [data[i:i + 1] for i in range(len(data))]
        for piece in pieces:
            if self._stopping.is_set():
                raise _Gone
            try:
                sock.sendall(piece)
            except OSError:
                raise _Gone from None
            with self._lock:
                self.bytes_sent += len(piece)
                self.bytes_dripped += len(piece) if drip_s > 0 else 0
            if drip_s > 0 and self._stopping.wait(drip_s):
                raise _Gone


class _Server(ConnectionTracking, socketserver.ThreadingTCPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, owner: HostileServer) -> None:
        self.owner = owner
        self.track_connections()
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        context = self.owner.ssl_context
        if context is not None:  # the handshake happens at the handler's first read
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-reply is what these tests are about


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        owner = self.server.owner
        try:
            request = self._read_request()
        except (OSError, ValueError):  # a failed TLS handshake, a garbled request
            return
        if request is None:
            return
        reply = owner._record(request)
        head = [f"HTTP/1.1 {reply.status} Scripted"]
        if reply.date == "now":
            head.append(f"Date: {formatdate(usegmt=True)}")
        elif reply.date is not None:
            head.append(f"Date: {reply.date}")
        length = reply.size if reply.size is not None else len(reply.body)
        head += [f"{k}: {v}" for k, v in reply.headers]
        head += [f"Content-Length: {length}", "Connection: close", "", ""]
        try:
            owner._send(self.connection, "\r\n".join(head).encode("latin-1"), reply.head_drip_s)
            if reply.size is None:
                owner._send(self.connection, reply.body, reply.drip_s)
                return
            buffer = (reply.fill * (CHUNK // len(reply.fill) + 1))[:CHUNK]
            left = reply.size
            while left > 0:
                piece = buffer if left >= CHUNK else buffer[:left]
                owner._send(self.connection, piece, reply.drip_s)
                left -= len(piece)
        except _Gone:
            return

    def _read_request(self) -> Request | None:
        line = self.rfile.readline(65_537).decode("latin-1").strip()
        if not line:
            return None
        method, path, _ = [*line.split(" ", 2), "", ""][:3]
        headers: dict[str, str] = {}
        while True:
            raw = self.rfile.readline(65_537).decode("latin-1")
            if raw in ("", "\r\n", "\n"):
                break
            name, _, value = raw.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = min(int(headers.get("content-length", "0") or 0), MAX_REQUEST_BODY)
        return Request(method, path, headers, self.rfile.read(length) if length else b"")
