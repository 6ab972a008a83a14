"""MQTT at the packet level, under :class:`gateway.link.MqttLink`: paho's client, read
ahead, decoded lean, and held to a packet size (:class:`ReadAheadClient`).

The only module that leans on paho 2.x's private reader; :data:`FAST_PATH` says whether
the installed paho is one it was written for (otherwise paho's own reader does the
work).  See docs/design/mqtt-link.md, "The paho fast path".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import MQTTErrorCode

from drivers.mqtt.client import PahoClient

__all__ = [
    "FAST_PATH",
    "PAHO_VERSION",
    "ReadAheadClient",
    "fast_path_supported",
    "publish_packet_size",
    "variable_int",
    "variable_int_size",
]

LOGGER = logging.getLogger(__name__)

PublishHandler = Callable[[bytes, bytes, int, bool, bool, int], None]

#: The largest remaining length MQTT can express (a four-byte variable integer).
_MAX_REMAINING: Final = 268_435_455
#: The paho-mqtt major release the fast path was written for, and the private members of
#: its client that it overrides or reads.
_PAHO_MAJOR: Final = 2
_PAHO_PRIVATE: Final = ("_sock_recv", "_packet_read", "_handle_publish", "_in_packet")


def fast_path_supported(version: str, client: type[paho.Client]) -> bool:
    """Whether paho ``version`` (its ``__version__``) and its ``client`` class are what
    the read-ahead and the lean PUBLISH rely on: major release 2, the private members."""
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) != _PAHO_MAJOR:
        return False
    # _in_packet is set per instance, in __init__; its name is in the class's code.
    init_names = client.__init__.__code__.co_names
    return all(hasattr(client, name) or name in init_names for name in _PAHO_PRIVATE)


#: The installed paho-mqtt's version.
PAHO_VERSION: Final = paho_version
#: True when the installed paho-mqtt is one the fast path was written for.
FAST_PATH: Final = fast_path_supported(PAHO_VERSION, paho.Client)


def variable_int(data: bytes | bytearray, at: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``data[at:]``: (value, offset after it)."""
    value = 0
    for shift in (0, 7, 14, 21):
        if at >= len(data):
            raise ValueError("truncated variable byte integer")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    raise ValueError("variable byte integer longer than four bytes")


def variable_int_size(value: int) -> int:
    """How many bytes the variable byte integer ``value`` takes (1–4)."""
    if not 0 <= value <= _MAX_REMAINING:
        raise ValueError(f"{value} does not fit an MQTT variable byte integer")
    size = 1
    while value > 0x7F:
        value >>= 7
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, qos: int) -> int:
    """The whole size of the MQTT 5 PUBLISH paho sends for this message, in bytes.

    Fixed header (1 + remaining-length bytes), topic (2 + UTF-8 bytes), packet id (QoS
    > 0), one byte for an empty property list, payload::

        0x3? | len | len(topic) topic | [packet id] | 0x00 | payload

    This is the figure a broker compares with its ``max_packet_size`` (Mosquitto even
    counts one byte less), so a message that fits here fits there.
    """
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + 1 + payload_len
    if remaining > _MAX_REMAINING:
        return 1 + 4 + remaining
    return 1 + variable_int_size(remaining) + remaining


class ReadAheadClient(PahoClient):
    """paho's client, reading ahead, decoding PUBLISH lean, refusing oversize packets.

    ``max_packet_bytes`` (0: no cap) is set by the link before it connects.
    :attr:`oversize` is the declared size of the packet that ended the connection, or
    ``None``; the link resets it before each connection.
    """

    READ_AHEAD: Final = 65536
    #: Whole PUBLISH packets taken from the buffer per read call, at most.
    BATCH: Final = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ahead = bytearray()
        self._ahead_sock: object = None
        self.recv_calls = 0
        self._publish_handler: PublishHandler | None = None

    def set_publish_handler(self, handler: PublishHandler | None) -> None:
        """Take every QoS 0/1 PUBLISH as ``handler(topic, payload, qos, retain, dup,
        mid)`` instead of through ``on_message``; ``None`` restores paho's path.

        On a paho the fast path was not written for (:data:`FAST_PATH` false) the
        handler is not used: messages come through ``on_message``, as with ``None``.
        """
        if handler is not None and not FAST_PATH:
            LOGGER.warning("paho-mqtt %s is not a 2.x release with the internals the lean "
                           "PUBLISH path reads; using paho's own reader",
                           PAHO_VERSION)
            handler = None
        self._publish_handler = handler

    def _handle_publish(self) -> MQTTErrorCode:
        """paho's PUBLISH handler, for the packets its own reader assembled."""
        header: int = self._in_packet["command"]
        if self._publish_handler is None or not self._lean(header, self._in_packet["packet"]):
            return super()._handle_publish()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _lean(self, header: int, packet: bytes | bytearray) -> bool:
        """Decode and hand over a QoS 0/1 MQTT 5 PUBLISH; ``False`` if it is unusual.

        paho's own decoder builds a ``Properties`` object, a ``MQTTMessage`` and a debug
        line for every message and matches it against every subscription: about 100 µs,
        nine tenths of what a flood of commands cost the agent.  The link needs none of
        the properties (it never allows topic aliases, so the broker sends none, MQTT 5
        §3.1.2.11.8), so they are skipped by their length.  Anything unusual (QoS 2,
        MQTT 3, an empty topic, a bad length) is left to paho, which stays the reference.
        """
        qos = (header & 0x06) >> 1
        handler = self._publish_handler
        if handler is None or qos == 2 or self._protocol != paho.MQTTv5:
            return False
        topic_len = int.from_bytes(packet[0:2], "big")
        at = 2 + topic_len
        topic = packet[2:at]
        mid = 0
        if qos:
            mid = int.from_bytes(packet[at:at + 2], "big")
            at += 2
        try:
            props_len, at = variable_int(packet, at)
        except ValueError:
            return False
        at += props_len
        if not topic or len(topic) != topic_len or at > len(packet) or (qos and not mid):
            return False
        handler(bytes(topic), bytes(packet[at:]), qos, bool(header & 0x01),
                bool(header & 0x08), mid)
        return True

    def _packet_read(self) -> MQTTErrorCode:
        """Take whole PUBLISH packets straight from the read-ahead buffer.

        paho assembles each packet through a state machine of several reads and a dict
        reset; under a flood that is most of what is left.  Whole QoS 0/1 PUBLISH
        packets at the head of the buffer are cut out here, up to :data:`BATCH` a call
        so the loop still turns for keepalive and writes; anything else (another packet
        type, a packet still arriving, one over the cap, paho half-way through one)
        goes to paho's reader, where :meth:`_sock_recv` enforces the cap.
        """
        ahead = self._ahead
        if (self._publish_handler is None or self._in_packet["command"] != 0
                or self._ahead_sock is not self._sock or len(ahead) < 2):
            return super()._packet_read()
        taken = 0
        cap = self.max_packet_bytes
        while taken < self.BATCH and len(ahead) >= 2:
            header = ahead[0]
            if header & 0xF0 != 0x30 or header & 0x06 == 0x06:
                break  # not a PUBLISH, or a malformed QoS: paho's to judge
            try:
                length, at = variable_int(ahead, 1)
            except ValueError:
                break  # not all here yet, or malformed: paho's to judge
            end = at + length
            if end > len(ahead) or (cap and end > cap):
                break
            packet = bytes(ahead[at:end])
            if not self._lean(header, packet):
                break  # unusual: paho reads it from the buffer, untouched
            del ahead[:end]
            taken += 1
        if not taken:
            return super()._packet_read()
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._ahead) if self._ahead_sock is self._sock else 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if not FAST_PATH:
            return super()._sock_recv(bufsize)  # the cap only, no read-ahead
        ahead = self._ahead
        if self._ahead_sock is not self._sock:  # a new connection: forget the old bytes
            ahead.clear()
            self._ahead_sock = self._sock
        if self._too_large():
            # An empty read is how paho learns a connection ended: it closes the socket
            # and reports MQTT_ERR_CONN_LOST without logging a receive error of its own.
            ahead.clear()
            return b""
        if not ahead:
            data = super()._sock_recv(self.READ_AHEAD)  # raises BlockingIOError when dry
            self.recv_calls += 1
            if len(data) <= bufsize:
                return data  # also b"" at end of stream, which paho must see
            ahead += data
        chunk = bytes(ahead[:bufsize])
        del ahead[:bufsize]  # O(1) at the front of a bytearray
        return chunk
