"""The drivers' own MQTT links (zigbee2mqtt, tasmota) refuse a huge packet unbuffered.

Found in review of issue 11: the incoming packet cap was only on the agent's link, while
the driver links, which may reach a LAN broker of their own, still read whatever length a
broker declared (up to 256 MiB).  A minimal MQTT 3.1.1 "broker" here answers CONNACK and
then one PUBLISH declaring 200 MB, streaming zeros until the client hangs up.
"""

from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt.client import DRIVER_MAX_PACKET_BYTES, PahoClient
from tests.support.fake_broker import encode_varint

DECLARED = 200 * 1024 * 1024


class _Streamer:
    """Accepts one client: CONNACK, then a PUBLISH header declaring ``DECLARED`` bytes and
    zeros until the client closes or ``limit`` bytes went out; counts what it sent."""

    def __init__(self, limit: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.limit = limit
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(4096)  # the CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            topic = b"zigbee2mqtt/bridge/devices"
            conn.sendall(b"\x30" + encode_varint(DECLARED) + len(topic).to_bytes(2, "big") + topic)
            chunk = bytes(65536)
            try:
                while self.sent < self.limit:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                pass  # the client hung up: what this test wants

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


def _run(max_packet_bytes: int, limit: int) -> tuple[int, int | None]:
    streamer = _Streamer(limit)
    client = PahoClient(callback_api_version=CallbackAPIVersion.VERSION2, client_id="z2m",
                        protocol=paho.MQTTv311, max_packet_bytes=max_packet_bytes)
    try:
        client.connect("127.0.0.1", streamer.port, keepalive=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                break
    finally:
        client.disconnect()
        client._reset_sockets()  # the socket pair too (unclosed-socket warnings)
        streamer.close()
    return streamer.sent, client.oversize


def test_a_driver_link_drops_a_huge_packet_before_buffering_it() -> None:
    sent, oversize = _run(DRIVER_MAX_PACKET_BYTES, limit=64 * 1024 * 1024)
    assert oversize is not None
    assert oversize > DRIVER_MAX_PACKET_BYTES
    # The client hung up at once: what the kernel's buffers took, nowhere near 64 MiB.
    assert sent < 16 * 1024 * 1024, sent


def test_without_the_cap_the_same_link_reads_on() -> None:
    """The control: with no cap paho keeps reading the declared body."""
    sent, oversize = _run(0, limit=16 * 1024 * 1024)
    assert oversize is None
    assert sent >= 16 * 1024 * 1024
