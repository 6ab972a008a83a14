"""A hostile MQTT 5 "broker" on loopback, for what a real Mosquitto will never do.

Fault matrix #15 and issue 11 item 5: while Mosquitto restarts, any local user can bind
its port; a fake broker then accepts the agent's CONNECT (and its password) and can send
it one PUBLISH that declares ~800 MiB.  :class:`HostileBroker` does exactly that on its
first connection: CONNACK, SUBACK, then a PUBLISH whose fixed header declares
``declared`` bytes, followed by zeros streamed until the client hangs up or
``stream_limit`` bytes went out.  Every later connection gets a well-behaved CONNACK and
SUBACK and is then only read, so a client that dropped the hostile packet can be seen
coming back.

Just enough MQTT to do that, over the client's bytes: no retained state, no routing, no
PUBACK (a client waiting for one waits in vain).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

__all__ = ["MAXIMUM_PACKET_SIZE", "ConnectInfo", "HostileBroker", "encode_varint"]

#: How much of the hostile body goes out per send: the size of a typical socket read.
_CHUNK: Final = 65536
#: MQTT 5 property identifiers of CONNECT and the width of their values (§3.1.2.11);
#: -1: a UTF-8 string or binary data (two-byte length), -2: a string pair.
_CONNECT_PROPERTIES: Final = {0x11: 4, 0x21: 2, 0x27: 4, 0x22: 2, 0x19: 1, 0x17: 1,
                              0x26: -2, 0x15: -1, 0x16: -1}
#: Property id of Maximum Packet Size (MQTT 5 §3.1.2.11.4).
MAXIMUM_PACKET_SIZE: Final = 0x27


def encode_varint(value: int) -> bytes:
    """MQTT's variable byte integer (the remaining length of a fixed header)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return bytes(data)


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    header = _read_exact(conn, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read_exact(conn, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return header, _read_exact(conn, length)


def _connect_properties(body: bytes) -> dict[int, int]:
    """The integer properties of a CONNECT body (MQTT 5)."""
    at = 2 + int.from_bytes(body[0:2], "big")  # protocol name
    at += 1 + 1 + 2  # level, flags, keepalive
    length, shift = 0, 0
    while True:
        byte = body[at]
        at += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    end = at + length
    found: dict[int, int] = {}
    while at < end:
        ident = body[at]
        at += 1
        width = _CONNECT_PROPERTIES[ident]
        if width > 0:
            found[ident] = int.from_bytes(body[at:at + width], "big")
            at += width
        else:
            for _ in range(-width):
                at += 2 + int.from_bytes(body[at:at + 2], "big")
    return found


def _suback(body: bytes) -> bytes:
    """A SUBACK granting every filter of a SUBSCRIBE body at the QoS asked."""
    packet_id = body[0:2]
    at = 2
    length, shift = 0, 0
    while True:
        byte = body[at]
        at += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    at += length
    codes = bytearray()
    while at < len(body):
        at += 2 + int.from_bytes(body[at:at + 2], "big")
        codes.append(body[at] & 0x03)
        at += 1
    rest = packet_id + b"\x00" + bytes(codes)
    return b"\x90" + encode_varint(len(rest)) + rest


@dataclass
class ConnectInfo:
    """What one connection's CONNECT said."""

    properties: dict[int, int] = field(default_factory=dict)


class HostileBroker:
    """A listening socket on 127.0.0.1 and a thread serving connections one at a time."""

    host = "127.0.0.1"

    def __init__(self, *, declared: int, stream_limit: int, topic: str = "hostile") -> None:
        self.declared = declared
        self.stream_limit = stream_limit
        self.topic = topic
        self.connects: list[ConnectInfo] = []
        #: Bytes of the hostile PUBLISH that went out before the client hung up.
        self.sent = 0
        self.cond = threading.Condition()
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hostile-broker",
                                        daemon=True)

    def __enter__(self) -> HostileBroker:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (checked whenever a connection changes)."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                with contextlib.suppress(OSError, ConnectionError, ValueError):
                    self._session(conn, hostile=not self.connects)

    def _session(self, conn: socket.socket, *, hostile: bool) -> None:
        conn.settimeout(5)
        header, body = _read_packet(conn)
        if header >> 4 != 1:
            return
        with self.cond:
            self.connects.append(ConnectInfo(_connect_properties(body)))
            self.cond.notify_all()
        conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK v5: no session, success
        header, body = _read_packet(conn)
        if header >> 4 == 8:
            conn.sendall(_suback(body))
        if hostile:
            self._flood(conn)
            return
        conn.settimeout(0.2)
        while not self._stop.is_set():  # a well-behaved, silent broker
            try:
                header, _ = _read_packet(conn)
            except TimeoutError:
                continue
            if header >> 4 == 14:  # DISCONNECT
                return

    def _flood(self, conn: socket.socket) -> None:
        topic = self.topic.encode()
        head = len(topic).to_bytes(2, "big") + topic + b"\x00"  # QoS 0, no properties
        conn.sendall(b"\x30" + encode_varint(self.declared) + head)
        chunk = bytes(_CHUNK)
        sent = len(head)
        conn.settimeout(10)
        try:
            while sent < self.stream_limit and not self._stop.is_set():
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the client hung up: what a careful one does
        finally:
            with self.cond:
                self.sent = sent
                self.cond.notify_all()
        # Hold the connection (a client still reading waits for the rest) until it goes.
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                if not conn.recv(_CHUNK):
                    return
            except TimeoutError:
                continue
