"""The ``tasmota`` driver: relay channels of Tasmota devices over MQTT.

Layers, one module each::

    messages.py    topics and payloads of Tasmota's MQTT API           (pure)
    client.py      TasmotaClient: one paho-mqtt client per broker      (link)
    controller.py  TasmotaController                                   (controller API)

Its simulator (``TasmotaSim``, a simulated device on a real broker) is the dev kit's:
``devkit/sims/tasmota.py``, which production code never imports.
"""

from drivers.tasmota.client import BrokerSettings, ClientTiming, TasmotaClient
from drivers.tasmota.controller import TasmotaController, TasmotaTiming

__all__ = ["BrokerSettings", "ClientTiming", "TasmotaClient", "TasmotaController",
           "TasmotaTiming"]
