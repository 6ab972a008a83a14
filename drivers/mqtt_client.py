"""paho-mqtt's client, with its unix-socket connect made as careful as its TCP one.

A broker may be reached on a unix socket (a ``host`` that is a path: paho's ``unix``
transport; deploy/ ships the site broker that way).  paho 2.2 creates that socket and
connects it with neither a timeout nor cleanup: a broker that is restarting (the path is
missing, or nothing accepts) leaves an open descriptor behind at every attempt, and a
frozen broker whose backlog is full blocks the connect forever.  :class:`PahoClient`
gives it what paho's TCP path has: ``connect_timeout`` and a socket closed on failure.
Every MQTT link of the drivers and the agent's (``gateway.mqtt_wire``) builds on it.
"""

from __future__ import annotations

import socket

import paho.mqtt.client as paho

__all__ = ["PahoClient", "is_socket_path"]


def is_socket_path(host: str) -> bool:
    """True when a broker ``host`` is the path of a unix socket (it starts with ``/``)."""
    return host.startswith("/")


class PahoClient(paho.Client):
    """paho's client; a unix-socket connect has a timeout and never leaks its socket."""

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
