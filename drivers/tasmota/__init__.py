"""The ``tasmota`` driver: relay channels of Tasmota devices over MQTT.

Layers, one module each::

    messages.py    topics and payloads of Tasmota's MQTT API           (pure)
    client.py      TasmotaClient: one MQTT transport per broker        (link)
    controller.py  TasmotaController                                   (controller API)

Its simulator (``TasmotaSim``, a simulated device on a real broker) is the dev kit's:
``devkit/sims/tasmota.py``, which production code never imports.

The names below are imported when first used: the config loader reads this
package's ``settings`` on every CLI command, which must not load paho-mqtt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from drivers.lazy import lazy_getattr

if TYPE_CHECKING:
    from drivers.mqtt.settings import BrokerSettings
    from drivers.tasmota.client import ClientTiming, TasmotaClient
    from drivers.tasmota.controller import TasmotaController, TasmotaTiming

__all__ = ["BrokerSettings", "ClientTiming", "TasmotaClient", "TasmotaController",
           "TasmotaTiming"]

#: Where each name lives, imported on first use (PEP 562).
_LAZY: Final = {
    "BrokerSettings": "drivers.mqtt.settings",
    "ClientTiming": "drivers.tasmota.client",
    "TasmotaClient": "drivers.tasmota.client",
    "TasmotaController": "drivers.tasmota.controller",
    "TasmotaTiming": "drivers.tasmota.controller",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
