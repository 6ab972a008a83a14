"""The CLI's end of the control socket: one connection per call (gateway/ops/control.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any, Final

from gateway.errors import one_line
from gateway.ops.control_wire import (
    MAX_RESPONSE_BYTES,
    AgentUnavailable,
    ControlDenied,
    ControlError,
    _encode,
    _group_name,
    _LineReader,
    _LineTooLongError,
    denied_message,
)

__all__ = ["CONNECT_TIMEOUT_S", "ControlClient"]

#: accepts at once unless the agent's backlog is full.
CONNECT_TIMEOUT_S: Final = 5.0

_ids = itertools.count(1)


class ControlClient:
    """The CLI's end: one connection per call.

    ``timeout`` bounds the wait for the answer once the request is sent; size it to the
    work asked for (a ``test --all`` takes minutes).  Failing to connect raises
    :class:`AgentUnavailable`; anything after the request went out raises
    :class:`ControlError`, because the agent may be acting on it.
    """

    def __init__(self, path: Path, *, timeout: float = 30.0,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request; the handler's result, or the error it answered with."""
        request_id = next(_ids)
        payload = _encode({"id": request_id, "method": method, "params": params})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            self._connect(sock)
            sock.settimeout(self.timeout)
            try:
                # The agent may have answered before hanging up ("busy"): read that.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(payload)
                line = _LineReader(sock, MAX_RESPONSE_BYTES).readline()
            except TimeoutError:
                raise ControlError(
                    f"the agent took the {method} request but did not answer within "
                    f"{self.timeout:g} s; it may still be acting (see its log, or run "
                    "`stora-gateway locks`)") from None
            except _LineTooLongError:
                raise ControlError(f"the agent's answer to {method} is too large") from None
            except OSError as exc:
                raise ControlError(
                    f"the agent dropped the connection ({exc.strerror or exc}); "
                    "is it stopping? see its log") from exc
        if line is None:
            raise ControlError("the agent closed the connection without answering; "
                               "is it stopping? see its log")
        return _result(line, request_id)

    def _connect(self, sock: socket.socket) -> None:
        sock.settimeout(min(self.timeout, self.connect_timeout))
        where = self.path
        try:
            sock.connect(str(where))
        except FileNotFoundError:
            raise AgentUnavailable(f"no control socket at {where}") from None
        except ConnectionRefusedError:
            raise AgentUnavailable(f"nothing listens on {where}") from None
        except PermissionError:
            raise ControlDenied(denied_message(self._group())) from None
        except TimeoutError:
            raise AgentUnavailable(f"the agent did not accept a connection on {where} "
                                   f"within {sock.gettimeout():g} s") from None
        except OSError as exc:  # not a socket, path too long for AF_UNIX, …
            raise AgentUnavailable(f"cannot reach an agent at {where}: "
                                   f"{exc.strerror or exc}") from exc

    def _group(self) -> str:
        # The group to name in "permission denied": the socket's, else (when the
        # directory cannot even be searched) the directory's.
        for candidate in (self.path, self.path.parent):
            try:
                return _group_name(os.stat(candidate).st_gid)
            except OSError:
                continue
        return "of the control socket"


def _result(line: bytes, request_id: int) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        raise ControlError("the agent's answer is not JSON (a different program on "
                           "the control socket?)") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError("the agent's answer is not understood")
    if not answer["ok"]:
        message = str(answer.get("error") or "the agent refused the request")
        if answer.get("code") == "denied":
            raise ControlDenied(one_line(message))
        status = answer.get("status")
        raise ControlError(message, status if isinstance(status, int) else 1)
    if answer.get("id") != request_id:
        raise ControlError("the agent answered another request")
    result = answer.get("result")
    if not isinstance(result, dict):
        raise ControlError("the agent's answer has no result")
    return result
