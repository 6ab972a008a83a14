"""MQTT 3.1.1 / 5 wire encoding for the dev kit's embedded broker.

Packet types, property wire types, variable-length integers, strings, a packet
reader and topic-filter matching (MQTT 5 §1.5, §2, §4.7): pure code over bytes.
"""

from __future__ import annotations

from typing import Final

# Packet types (MQTT 5 §2.1.2), high nibble of the first byte.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

# MQTT 5 property identifiers this broker reads or writes (§2.2.2.2).
SESSION_EXPIRY: Final = 0x11
ASSIGNED_CLIENT_ID: Final = 0x12
SUBSCRIPTION_ID: Final = 0x0B
TOPIC_ALIAS: Final = 0x23
SUB_ID_AVAILABLE: Final = 0x29
SHARED_SUB_AVAILABLE: Final = 0x2A
# Every property's wire type, to skip or copy the ones it does not interpret.
_BYTE, _INT2, _INT4, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: Final = {
    0x01: _BYTE, 0x02: _INT4, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY,
    0x0B: _VARINT, 0x11: _INT4, 0x12: _STRING, 0x13: _INT2, 0x15: _STRING,
    0x16: _BINARY, 0x17: _BYTE, 0x18: _INT4, 0x19: _BYTE, 0x1A: _STRING,
    0x1C: _STRING, 0x1F: _STRING, 0x21: _INT2, 0x22: _INT2, 0x23: _INT2,
    0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _INT4, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}


class ProtocolError(Exception):
    """A client broke the protocol: its connection is closed (with its will)."""


# -- encoding ---------------------------------------------------------------------------
def encode_varint(n: int) -> bytes:
    """MQTT's variable byte integer (§1.5.5): 7 bits a byte, low first, at most 4 bytes."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_string(data: str | bytes) -> bytes:
    """A UTF-8 string or binary data with its 2-byte length (§1.5.4, §1.5.6)."""
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(2, "big") + raw


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """A whole packet: fixed header (type, flags, remaining length) and ``body``."""
    return bytes([kind << 4 | flags]) + encode_varint(len(body)) + body


class Reader:
    """Reads the fields of one packet's body in order; short data is a ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        if self.at + n > len(self.data):
            raise ProtocolError("packet shorter than its fields")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def byte(self) -> int:
        """One byte."""
        return self.take(1)[0]

    def int2(self) -> int:
        """A two-byte big-endian integer."""
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        """Length-prefixed binary data."""
        return self.take(self.int2())

    def string(self) -> str:
        """A length-prefixed UTF-8 string."""
        try:
            return self.binary().decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("a string is not UTF-8") from exc

    def varint(self) -> int:
        """A variable byte integer."""
        value = 0
        for shift in range(0, 28, 7):
            digit = self.byte()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
        raise ProtocolError("variable byte integer longer than 4 bytes")

    def properties(self) -> list[tuple[int, bytes]]:
        """An MQTT 5 property list as ``(identifier, raw value bytes)`` pairs."""
        length = self.varint()
        end = self.at + length
        if end > len(self.data):
            raise ProtocolError("properties longer than the packet")
        props: list[tuple[int, bytes]] = []
        while self.at < end:
            ident = self.byte()
            kind = _PROPERTY_TYPES.get(ident)
            start = self.at
            if kind is None:
                raise ProtocolError(f"unknown property 0x{ident:02x}")
            if kind == _BYTE:
                self.take(1)
            elif kind == _INT2:
                self.take(2)
            elif kind == _INT4:
                self.take(4)
            elif kind == _VARINT:
                self.varint()
            elif kind in (_STRING, _BINARY):
                self.binary()
            else:  # a string pair
                self.binary()
                self.binary()
            props.append((ident, self.data[start:self.at]))
        if self.at != end:
            raise ProtocolError("a property runs past the property list")
        return props

    def rest(self) -> bytes:
        """Everything not read yet."""
        chunk = self.data[self.at:]
        self.at = len(self.data)
        return chunk


def encode_properties(props: list[tuple[int, bytes]]) -> bytes:
    """The property list ``props`` (as :meth:`Reader.properties` returns it), encoded."""
    body = b"".join(bytes([ident]) + raw for ident, raw in props)
    return encode_varint(len(body)) + body


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT 5 §4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # §4.7.2: $-topics are not matched by a leading wildcard
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level not in ("+", t_levels[i])):
            return False
    return len(f_levels) == len(t_levels)


def valid_filter(topic_filter: str) -> bool:
    """A well-formed topic filter: ``#`` only as the last level, wildcards whole levels."""
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True
