"""The control socket's wire and callers: its errors, who is calling, and JSON lines.

Shared by the agent's end (:mod:`gateway.ops.control`) and the CLI's
(:mod:`gateway.ops.control_client`); the protocol is drawn in :mod:`gateway.ops.control`.
"""

from __future__ import annotations

import grp
import json
import math
import os
import pwd
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.errors import GatewayError, one_line

#: Largest request line the server reads; real requests are a few hundred bytes, so
#: anything near this is a bug or an attack, not a technician.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: Largest answer the client reads: ``locks`` on a site with thousands of units.
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
#: How long the client waits for the agent to accept a connection.  A Unix socket
_UCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
#: ``SO_PEERGROUPS`` (Linux 4.13): the peer's supplementary groups as the kernel saw them
#: at connect time, with no race on the pid.  Python lacks the constant; 59 is its value
#: on every architecture but parisc and sparc, which fall back to ``/proc``.
_SO_PEERGROUPS: Final[int | None] = getattr(socket, "SO_PEERGROUPS", None) or (
    59 if sys.platform == "linux" and not os.uname().machine.startswith(("parisc", "sparc"))
    else None
)
#: CPython refuses a larger ``getsockopt`` buffer; 256 groups fit, more fall back.
_GETSOCKOPT_MAX: Final = 1024


# -- errors -------------------------------------------------------------------------------
class AgentUnavailable(GatewayError):  # noqa: N818 - the name the agent and CLI use
    """No agent answers at the control socket (missing, refused, not accepting).

    Nothing was sent, so the caller may safely do the work itself (direct mode).
    """

    retryable = True


class ControlDenied(GatewayError):  # noqa: N818 - the name the agent and CLI use
    """The caller may not use the control socket: it is not root, the agent's user, or
    a member of the socket's group.  Exit status 2: a person must fix the permissions.
    """

    status = 2


class ControlError(GatewayError):
    """The agent answered with an error, or took the request and gave no answer.

    ``str(err)`` is one line for the user; ``status`` the CLI's exit status (1 the
    operation failed, 2 bad usage).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(one_line(message))
        self.status = status if status in (1, 2) else 1


class ControlSocketError(GatewayError):
    """The server could not create its socket; the message says why and what to do."""


def denied_message(group: str) -> str:
    """The one line a refused caller sees."""
    return f"permission denied: run as root or a member of group {group}"


# -- who is calling -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]

    @property
    def user(self) -> str:
        """The user name of ``uid`` (the number when the user has no name)."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def actor(self) -> str:
        """The audit trail's name for this caller, verified by the kernel.

        The same form as the CLI's own ``actor`` parameter, which is only a claim.
        """
        return f"technician {self.user} (uid {self.uid})"


def allowed(peer: Peer, agent_uid: int, group_gid: int) -> bool:
    """Whether ``peer`` may use a socket of the agent running as ``agent_uid`` whose
    file belongs to group ``group_gid``."""
    return (
        peer.uid in (0, agent_uid) or peer.gid == group_gid or group_gid in peer.groups
    )


def _groups_from_socket(conn: socket.socket) -> tuple[int, ...] | None:
    if _SO_PEERGROUPS is None:
        return None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GETSOCKOPT_MAX)
    except OSError:  # an old kernel (ENOPROTOOPT), or more than 256 groups (ERANGE)
        return None
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _groups_from_proc(pid: int) -> tuple[int, ...]:
    # Racy (the pid could be reused before we read it), hence only a fallback.
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def peer_of(conn: socket.socket) -> Peer:
    """The credentials of the process that connected ``conn`` (``SO_PEERCRED``)."""
    pid, uid, gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups = _groups_from_socket(conn)
    return Peer(pid, uid, gid, groups if groups is not None else _groups_from_proc(pid))


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# -- wire ---------------------------------------------------------------------------------
class _LineTooLongError(Exception):
    pass


class _LineReader:
    """Whole lines from a stream socket, each at most ``limit`` bytes."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._buffer = bytearray()

    def readline(self) -> bytes | None:
        """The next line without its newline; ``None`` at end of stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._limit:
                raise _LineTooLongError
            chunk = self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk


def _no_constant(name: str) -> Any:
    """``json.loads`` hook: NaN, Infinity and -Infinity are not JSON (RFC 8259 §6)."""
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    """``json.loads`` hook: a number too large for a float (``1e400``) is refused, not
    read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _encode(message: Mapping[str, Any]) -> bytes:
    # ensure_ascii keeps every answer on one line whatever a handler puts in it; str()
    # for the odd value a free-form status may hold (a Path, a datetime).
    return json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"


def _error(request_id: Any, message: str, status: int, code: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": one_line(message), "status": status,
            "code": code}
