"""Long control-socket requests: progress as they go, and a technician's Ctrl-C.

``test --all`` and ``scan`` take seconds to minutes.  Two additions to the protocol of
:mod:`gateway.ops.control` let the person at the door see them move and stop them:

* **Progress.**  A request with ``"stream": true`` may get any number of progress lines
  before its one answer, each ``{"id": 7, "progress": {...}}``; a request without it
  gets none, so a client that does not know about them never sees one.
* **Cancel.**  While a long request runs, the client closing its sending side
  (``shutdown(SHUT_WR)``) or the whole connection cancels it.  The handler stops what it
  has not started, finishes what it must (a lock under test is relocked, never left
  open), and still answers with what it did and what it cancelled, which the client
  reads on its open receiving side.  A client that sends a further request instead of
  hanging up does not cancel anything.

The agent's side: the server makes a :class:`Call` for each request and
:func:`current_call` hands it to the handler running in that connection's thread.  The
CLI's side: :func:`stream` sends a request, passes progress to a callback, and turns a
Ctrl-C into a cancel.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from gateway.ops.control_client import ControlClient, _ids, _result
from gateway.ops.control_wire import (
    MAX_RESPONSE_BYTES,
    ControlError,
    _encode,
    _LineReader,
    _LineTooLongError,
)

__all__ = ["Call", "current_call", "serving", "stream"]

LOGGER = logging.getLogger(__name__)

#: Largest progress line the client reads: one test row or scan result is well under.
MAX_PROGRESS_BYTES: Final = 64 * 1024
#: How long the watcher's wait for the end of a request may take to notice it is over.
#: It is woken at once by a socketpair; this only bounds a lost wake-up.
_WATCH_STOP_S: Final = 2.0


class Call:
    """One request being handled: its progress channel and its cancel switch.

    ``cancelled`` is set when the client hangs up while :meth:`watch` is active, or a
    progress line cannot be delivered (the client is gone).  Callbacks registered with
    :meth:`on_cancel` run once, on the thread that notices.
    """

    def __init__(self, conn: socket.socket | None = None, request_id: Any = None,
                 stream: bool = False) -> None:
        self._conn = conn
        self._id = request_id
        self._stream = stream and conn is not None
        self.cancelled = threading.Event()
        self._mutex = threading.Lock()
        self._callbacks: list[Callable[[], Any]] = []

    def progress(self, item: Mapping[str, Any]) -> None:
        """Send one progress line, if the client asked for them; never raises.

        Lines still go out after a cancel: a client that only shut its sending side
        reads them (what ran, what was cancelled) until the answer.
        """
        if not self._stream:
            return
        assert self._conn is not None
        try:
            self._conn.sendall(_encode({"id": self._id, "progress": dict(item)}))
        except OSError:
            # The client is gone (or stopped reading for longer than the socket's
            # timeout): nobody is waiting for the rest.
            self.cancel()

    def cancel(self) -> None:
        """Mark the request cancelled and run the callbacks (once)."""
        with self._mutex:
            if self.cancelled.is_set():
                return
            self.cancelled.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one bad callback must not keep the others from running
                LOGGER.exception("control: a cancel callback failed")

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` when the request is cancelled (at once if it already is)."""
        with self._mutex:
            if not self.cancelled.is_set():
                self._callbacks.append(callback)
                return
        callback()

    @contextlib.contextmanager
    def watch(self) -> Iterator[threading.Event]:
        """Watch the connection for the client hanging up while the block runs.

        Yields :attr:`cancelled`.  Outside a request (a management request, a test) there
        is nothing to watch and the event is never set by this.
        """
        if self._conn is None:
            yield self.cancelled
            return
        wake_r, wake_w = socket.socketpair()
        watcher = threading.Thread(target=self._watch, args=(self._conn, wake_r),
                                   name="control-watch", daemon=True)
        watcher.start()
        try:
            yield self.cancelled
        finally:
            with contextlib.suppress(OSError):
                wake_w.send(b"x")
            watcher.join(_WATCH_STOP_S)
            wake_r.close()
            wake_w.close()

    def _watch(self, conn: socket.socket, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return
                    try:
                        # Peek only: a byte that is there belongs to the next request.
                        data = conn.recv(1, socket.MSG_PEEK)
                    except (BlockingIOError, InterruptedError, TimeoutError):
                        continue
                    except OSError:  # reset by the peer: it is gone
                        data = b""
                    if not data:
                        LOGGER.info("control: the client hung up; cancelling its request")
                        self.cancel()
                    # Either way there is nothing more to watch for: a further request
                    # is not a cancel, and select would report its bytes forever.
                    return


_CURRENT: contextvars.ContextVar[Call] = contextvars.ContextVar("control_call")


def current_call() -> Call:
    """The request the calling thread is handling; a detached :class:`Call` (no progress,
    never cancelled by a client) outside the control socket's handler threads."""
    try:
        return _CURRENT.get()
    except LookupError:
        return Call()


@contextlib.contextmanager
def serving(conn: socket.socket | None, request_id: Any, stream: bool) -> Iterator[Call]:
    """Make a :class:`Call` the current one while the handler runs (the server's side)."""
    call = Call(conn, request_id, stream)
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def stream(
    client: ControlClient,
    method: str,
    params: Mapping[str, Any],
    on_progress: Callable[[dict[str, Any]], None],
    *,
    interrupt_wait_s: float,
) -> tuple[dict[str, Any], bool]:
    """Send one request with progress; the result and whether Ctrl-C interrupted it.

    The first Ctrl-C (``KeyboardInterrupt``) while waiting hangs up the sending side,
    which cancels the request in the agent, and keeps reading for up to
    ``interrupt_wait_s`` for the agent's answer (what ran, what it cancelled).  A second
    Ctrl-C is not caught.  Errors as :meth:`ControlClient.call`.
    """
    request_id = next(_ids)
    payload = _encode({"id": request_id, "method": method, "params": dict(params),
                       "stream": True})
    interrupted = False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        client._connect(sock)  # the same connect rules (and errors) as call()
        sock.settimeout(client.timeout)
        reader = _LineReader(sock, MAX_RESPONSE_BYTES)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        while True:
            try:
                line = _read(reader, method, client.timeout if not interrupted
                             else interrupt_wait_s, interrupted)
                if line is None:
                    raise ControlError("the agent closed the connection without answering; "
                                       "is it stopping? see its log")
                progress = _progress(line, request_id)
                if progress is None:
                    return _result(line, request_id), interrupted
                on_progress(progress)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)  # the agent's cue to cancel
                sock.settimeout(interrupt_wait_s)


def _read(reader: _LineReader, method: str, timeout: float, interrupted: bool) -> bytes | None:
    try:
        return reader.readline()
    except TimeoutError:
        if interrupted:
            raise ControlError(
                f"interrupted; the agent did not confirm within {timeout:g} s that it "
                "stopped: check the doors with `stora-gateway locks`") from None
        raise ControlError(
            f"the agent took the {method} request but did not answer within {timeout:g} s; "
            "it may still be acting (see its log, or run `stora-gateway locks`)") from None
    except _LineTooLongError:
        raise ControlError(f"the agent's answer to {method} is too large") from None
    except OSError as exc:
        raise ControlError(f"the agent dropped the connection ({exc.strerror or exc}); "
                           "is it stopping? see its log") from exc


def _progress(line: bytes, request_id: int) -> dict[str, Any] | None:
    """The progress item of ``line``, or ``None`` when it is the final answer."""
    import json

    if len(line) > MAX_PROGRESS_BYTES or b'"progress"' not in line:
        return None
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None  # _result reports it
    if (isinstance(message, dict) and "ok" not in message
            and message.get("id") == request_id and isinstance(message.get("progress"), dict)):
        return dict(message["progress"])
    return None
