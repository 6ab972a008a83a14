"""paho-mqtt's client, with its unix-socket connect made as careful as its TCP one.

A broker may be reached on a unix socket (a ``host`` that is a path: paho's ``unix``
transport; deploy/ ships the site broker that way).  paho 2.2 creates that socket and
connects it with neither a timeout nor cleanup: a broker that is restarting (the path is
missing, or nothing accepts) leaves an open descriptor behind at every attempt, and a
frozen broker whose backlog is full blocks the connect forever.  :class:`PahoClient`
gives it what paho's TCP path has: ``connect_timeout`` and a socket closed on failure.
Every MQTT connection builds on it: :class:`drivers.mqtt.transport.MqttTransport` (the
drivers' links), the agent's (``gateway.link.wire``) and the tools'.

It also refuses an incoming packet larger than :attr:`PahoClient.max_packet_bytes`
before buffering a byte of its body: paho reads whatever length a broker declares (up to
256 MiB), so a fake or broken broker could take a small box's memory with one packet.
The connection is ended instead (paho then reports it lost and the link reconnects).
"""

from __future__ import annotations

import socket
from typing import Any, Final

import paho.mqtt.client as paho

__all__ = ["DRIVER_MAX_PACKET_BYTES", "PahoClient"]

#: The incoming packet cap of a driver's link.  Zigbee2MQTT publishes its whole device
#: list as one retained message (a few hundred bytes a device), Tasmota far less; 2 MiB
#: leaves room for a few thousand devices and bounds what a broker can make a Pi hold.
DRIVER_MAX_PACKET_BYTES: Final = 2 * 1024 * 1024


class PahoClient(paho.Client):
    """paho's client; a unix-socket connect has a timeout and never leaks its socket, and
    an incoming packet over ``max_packet_bytes`` (0: no cap) ends the connection.

    :attr:`oversize` is the declared size of the packet that ended the last connection,
    or ``None``.
    """

    def __init__(self, *args: Any, max_packet_bytes: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet_bytes = max_packet_bytes
        self.oversize: int | None = None

    def _too_large(self) -> bool:
        """Whether paho is about to read the body of a packet over the cap.

        paho decodes the remaining length first (``have_remaining``) and only then asks
        for the body; that request is the moment to refuse, before a byte of it is kept.
        """
        packet = self._in_packet
        if not self.max_packet_bytes or not packet["have_remaining"]:
            return False
        size = 1 + len(packet["remaining_count"]) + packet["remaining_length"]
        if size <= self.max_packet_bytes:
            return False
        self.oversize = size
        return True

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._too_large():
            # An empty read is how paho learns a connection ended: it closes the socket
            # and reports MQTT_ERR_CONN_LOST without logging a receive error of its own.
            return b""
        data: bytes = super()._sock_recv(bufsize)
        return data

    def _create_unix_socket_connection(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A socket whose accept queue is full blocks connect() like a frozen TCP
            # peer: bounded as paho bounds socket.create_connection().
            sock.settimeout(self._connect_timeout)
            sock.connect(self._host)
        except BaseException:
            sock.close()
            raise
        return sock
