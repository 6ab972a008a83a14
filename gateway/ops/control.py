"""The agent's local control socket: how the CLI acts through a running agent.

When the agent runs it owns the hardware, so a technician's ``unlock`` must queue behind
remote commands for that unit and be audited like them, rather than race the agent for
the bus.  The CLI therefore sends its request here and only opens the hardware itself
("direct mode") when no agent answers (contract §2).

Protocol: newline-delimited JSON over a Unix stream socket, UTF-8, one object per line;
a connection may carry several requests, answered in order::

    → {"id": 7, "method": "unlock", "params": {"unit": "A-101", "seconds": 8}}
    ← {"id": 7, "ok": true, "result": {...}}
    ← {"id": 7, "ok": false, "error": "one line", "status": 1, "code": "error"}

A long request (``test``, ``scan``) may send progress lines before its answer when
asked, and is cancelled by the client hanging up: ``gateway.ops.control_stream``.

``status`` is the exit status the CLI should give (1 the operation failed, 2 bad
usage); ``code`` says which kind of failure it is: ``error`` (the handler refused or
failed), ``denied`` (this caller may not use the socket), ``bad_request`` (not a
request; the id is ``null`` when it could not be read), ``busy`` (too many
connections) or ``internal`` (a bug in the handler, logged by the agent).

Who may connect (checked twice: by the kernel through the file mode 0660, and here on
every request from the peer's kernel-reported credentials): root, the agent's own user,
and members of the socket's group (primary or supplementary).

Errors, all :class:`~gateway.errors.GatewayError`::

    AgentUnavailable     nobody answers at the socket: the CLI falls back to direct mode
    ControlDenied        this user may not use the socket (exit status 2)
    ControlError         the agent answered with an error, or took the request and did
                         not answer; never retried in direct mode, the agent may be acting
    ControlSocketError   the server cannot create its socket (another agent serves it,
                         the group does not exist, …)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from gateway.ops.control_client import ControlClient
from gateway.ops.control_stream import serving
from gateway.ops.control_wire import (
    MAX_REQUEST_BYTES,
    AgentUnavailable,
    ControlDenied,
    ControlError,
    ControlSocketError,
    Peer,
    _encode,
    _error,
    _finite,
    _group_name,
    _LineReader,
    _LineTooLongError,
    _no_constant,
    allowed,
    denied_message,
    peer_of,
)

__all__ = [
    "MAX_REQUEST_BYTES",
    "AgentUnavailable",
    "ControlClient",
    "ControlDenied",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "ControlSocketError",
    "Peer",
    "allowed",
    "denied_message",
    "peer_of",
]

LOGGER = logging.getLogger(__name__)

#: How long a connection may sit without sending a whole request line, or take to
#: receive an answer, before the server drops it (a stuck client must not pin a thread).
IO_TIMEOUT_S: Final = 10.0
#: Connections served at once; the CLI uses one per command, so a few are plenty, and a
#: local flood cannot make the agent spawn threads without bound.
MAX_CONNECTIONS: Final = 8
#: How long ``start()`` lets an existing socket answer before calling it in use.
PROBE_TIMEOUT_S: Final = 1.0
#: How long ``stop()`` waits for connection threads to finish.
STOP_JOIN_S: Final = 2.0
#: Mode of the socket file (connect needs write permission) and of a directory we create.
SOCKET_MODE: Final = 0o660
DIR_MODE: Final = 0o750


# -- server -------------------------------------------------------------------------------
class ControlHandler(Protocol):
    """What the server calls for each request (gateway/ops/routes.py implements it).

    Called from one thread per connection, so possibly from several at once.
    """

    def handle(self, method: str, params: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        """Do ``method``; return a JSON-able result, or raise :class:`ControlError`."""
        ...


class ControlServer:
    """The agent's end: accepts connections on a Unix socket and answers requests.

    One thread accepts; each connection gets its own thread (at most
    ``max_connections``), so a slow ``test --all`` does not hold up ``status``.  The
    handler runs in the connection's thread and is never cut short: a technician must
    not be told "failed" while the door is in fact opening, so the handler bounds its
    own waits and the client reports a late answer as "may still be acting".
    """

    def __init__(
        self,
        path: Path,
        handler: ControlHandler,
        *,
        group: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        io_timeout: float = IO_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.max_connections = max_connections
        self.io_timeout = io_timeout
        self.agent_uid = os.geteuid()
        self.group_gid = os.getegid()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._mutex = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- start --------------------------------------------------------------------------
    def start(self) -> None:
        """Create the socket and start serving; :class:`ControlSocketError` if it cannot.

        The parent directory is created (mode 0750, the socket's group) when missing.  A
        socket file left by a dead agent is replaced; one that still answers is not.
        """
        if self._thread is not None:
            raise ControlSocketError(f"control socket {self.path}: already started")
        self.group_gid = self._resolve_group()
        self._make_directory()
        self._take_lock()
        try:
            self._remove_stale()
            listener = self._bind()
        except BaseException:
            self._release_lock()
            raise
        self._listener = listener
        self._wake = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept",
                                        daemon=True)
        self._thread.start()
        LOGGER.info("control socket %s ready (group %s)", self.path,
                    _group_name(self.group_gid))

    def _resolve_group(self) -> int:
        if self.group is None:
            return os.getegid()
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ControlSocketError(
                f"control socket {self.path}: group {self.group!r} does not exist"
            ) from None

    def _make_directory(self) -> None:
        directory = self.path.parent
        if directory.is_dir():
            return  # the admin's (or systemd's RuntimeDirectory=) choice of mode stands
        try:
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode passes through the umask; and members of the group must be
            # able to reach the socket, so the directory gets that group too.
            os.chmod(directory, DIR_MODE)
            os.chown(directory, -1, self.group_gid)
        except OSError as exc:
            raise ControlSocketError(
                f"control socket {self.path}: cannot create {directory}: {exc.strerror}"
            ) from exc

    def _take_lock(self) -> None:
        # The lock closes the window between "nothing answers, remove the stale file" and
        # bind(), in which two agents starting at once could each unlink the other's.
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ControlSocketError(
                f"control socket {self.path}: cannot open {lock_path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ControlSocketError(
                f"control socket {self.path}: another agent is serving it"
            ) from exc
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlSocketError(
                f"control socket {self.path}: the path exists and is not a socket; "
                "remove it or set [control] socket"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(PROBE_TIMEOUT_S)
            try:
                probe.connect(str(self.path))
            except ConnectionRefusedError:
                LOGGER.info("removing stale control socket %s", self.path)
                self.path.unlink(missing_ok=True)
                return
            except OSError as exc:  # a timeout means a listener with a full backlog
                raise ControlSocketError(
                    f"control socket {self.path}: something is listening there "
                    f"({exc.strerror or 'busy'})"
                ) from exc
        raise ControlSocketError(
            f"control socket {self.path}: another agent is listening there"
        )

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            listener.bind(str(self.path))
            bound = True
            # Mode and group are set before listen(): until then a connect is refused, so
            # there is no moment at which the umask's mode lets the wrong user in.
            os.chmod(self.path, SOCKET_MODE)
            info = os.stat(self.path)
            if info.st_gid != self.group_gid:
                os.chown(self.path, -1, self.group_gid)
            self._inode = (info.st_dev, info.st_ino)
            listener.listen(self.max_connections)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            if bound:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._inode = None
            raise ControlSocketError(
                f"control socket {self.path}: {exc.strerror or exc}"
                + (f" (is the agent's user in group {self.group}?)"
                   if exc.errno == errno.EPERM and self.group else "")
            ) from exc
        return listener

    # -- stop ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop accepting, drop open connections, remove the socket file."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        assert self._wake is not None
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        thread.join()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._unlink_if_ours()
        with self._mutex:
            connections = dict(self._connections)
        for conn in connections:
            # Wakes threads blocked in recv; a handler already running finishes, and
            # its answer then has nowhere to go (the client reports that).
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for worker in connections.values():
            worker.join(STOP_JOIN_S)
        for end in self._wake:
            end.close()
        self._wake = None
        self._release_lock()
        LOGGER.info("control socket %s closed", self.path)

    def _unlink_if_ours(self) -> None:
        # Only our own inode: never remove a socket another agent has since created.
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        except OSError:
            pass
        self._inode = None

    # -- serving ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        assert self._wake is not None
        listener, wake = self._listener, self._wake[0]
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return
                    self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return  # the client gave up between select() and accept()
        except OSError:
            # Out of file descriptors and the like: wait a little rather than spin.
            LOGGER.exception("control socket: accept failed")
            self._stopping.wait(0.1)
            return
        conn.settimeout(self.io_timeout)
        with self._mutex:
            busy = len(self._connections) >= self.max_connections
            if not busy:
                worker = threading.Thread(target=self._serve, args=(conn,),
                                          name="control-conn", daemon=True)
                self._connections[conn] = worker
        if busy:
            LOGGER.warning("control socket: %d connections open; refusing one more",
                           self.max_connections)
            with conn, contextlib.suppress(OSError):
                conn.sendall(_encode(_error(None, "the agent is busy with other requests; "
                                                  "try again", 1, "busy")))
            return
        worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                peer = peer_of(conn)
                reader = _LineReader(conn, MAX_REQUEST_BYTES)
                while not self._stopping.is_set():
                    try:
                        line = reader.readline()
                    except _LineTooLongError:
                        # The line's end is nowhere in sight, so the stream cannot be
                        # resynchronized: answer once and hang up.
                        conn.sendall(_encode(_error(
                            None, f"request too large (limit {MAX_REQUEST_BYTES} bytes)",
                            2, "bad_request")))
                        return
                    if line is None:
                        return
                    conn.sendall(self._answer(line, peer, conn))
        except OSError:
            pass  # the client went away or stayed silent too long: nothing to answer
        finally:
            with self._mutex:
                self._connections.pop(conn, None)

    def _answer(self, line: bytes, peer: Peer, conn: socket.socket | None = None) -> bytes:
        response = self._respond(line, peer, conn)
        try:
            return _encode(response)
        except (ValueError, TypeError, RecursionError):  # e.g. a circular result
            LOGGER.exception("control: cannot encode the answer")
            return _encode(_error(response.get("id"), "internal error in the agent (bad "
                                                      "result); see its log", 1, "internal"))

    def _respond(self, line: bytes, peer: Peer,
                 conn: socket.socket | None = None) -> dict[str, Any]:
        """The answer to one request line; never raises.

        The handler runs with the request as ``gateway.ops.control_stream.current_call()``:
        its progress lines and its cancel switch (the client hanging up).
        """
        try:
            request = json.loads(line, parse_constant=_no_constant, parse_float=_finite)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            return _error(None, "malformed request: not JSON (numbers must be finite)", 2,
                          "bad_request")
        if not isinstance(request, dict):
            return _error(None, "malformed request: expected a JSON object", 2, "bad_request")
        request_id = request.get("id")
        if not isinstance(request_id, int | str) or isinstance(request_id, bool):
            request_id = None
        if not allowed(peer, self.agent_uid, self.group_gid):
            LOGGER.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
            return _error(request_id, denied_message(_group_name(self.group_gid)), 2, "denied")
        method = request.get("method")
        params = request.get("params")
        if params is None:
            params = {}
        if not isinstance(method, str) or not method:
            return _error(request_id, "malformed request: 'method' must be a non-empty "
                                      "string", 2, "bad_request")
        if not isinstance(params, dict):
            return _error(request_id, "malformed request: 'params' must be an object", 2,
                          "bad_request")
        LOGGER.debug("control: %s from uid %d (pid %d)", method, peer.uid, peer.pid)
        try:
            with serving(conn, request_id, request.get("stream") is True):
                result = self.handler.handle(method, params, peer)
        except ControlDenied as exc:
            return _error(request_id, str(exc), 2, "denied")
        except ControlError as exc:
            return _error(request_id, str(exc), exc.status, "error")
        except Exception as exc:  # a bug in the handler must not take the socket down
            LOGGER.exception("control: %s failed", method)
            return _error(request_id, f"internal error in the agent ({type(exc).__name__}); "
                                      "see its log", 1, "internal")
        if not isinstance(result, dict):
            LOGGER.error("control: %s returned %s, not a dict", method, type(result).__name__)
            return _error(request_id, "internal error in the agent (bad result); see its log",
                          1, "internal")
        return {"id": request_id, "ok": True, "result": result}
