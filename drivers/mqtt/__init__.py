"""MQTT for every connection of ours: the drivers' links, the agent's and the tools'.

Layers, one module each::

    settings.py    BrokerSettings (where, who, TLS, timings), the password file
    tls.py         the client TLS context (chain and hostname checked)
    backoff.py     the one reconnect policy: capped exponential backoff, full jitter
    client.py      PahoClient: paho's client, careful unix-socket connect, packet cap
    transport.py   MqttTransport: a connection kept up in the background (drivers)

The agent's link (``gateway.link``) builds on the same client, policy, TLS context and
password file, with its own session and liveness rules on top.  Nothing here imports
``gateway``.

Only the modules without paho-mqtt are re-exported here: the config loader reads
:class:`BrokerSettings` on every CLI command, which must not load paho.  Import
``PahoClient`` and ``MqttTransport`` from their modules.
"""

from drivers.mqtt.backoff import Backoff, full_jitter_delay
from drivers.mqtt.settings import BrokerSettings, is_socket_path, read_secret_file
from drivers.mqtt.tls import TlsContext, client_tls_context

__all__ = [
    "Backoff",
    "BrokerSettings",
    "TlsContext",
    "client_tls_context",
    "full_jitter_delay",
    "is_socket_path",
    "read_secret_file",
]
