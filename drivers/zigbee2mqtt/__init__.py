"""The ``zigbee2mqtt`` driver: Zigbee door locks behind a Zigbee2MQTT bridge, over MQTT.

Layers, one module each::

    messages.py    topics and payloads of Zigbee2MQTT          (pure)
    client.py      BridgeLink: the driver's own MQTT transport  (link)
    controller.py  Zigbee2MqttController                        (controller API)

Its simulator (``Zigbee2MqttSim``, a bridge on a real broker) is the dev kit's:
``devkit/sims/zigbee2mqtt.py``, which production code never imports.

The names below are imported when first used: the config loader reads this
package's ``settings`` on every CLI command, which must not load paho-mqtt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from drivers.lazy import lazy_getattr

if TYPE_CHECKING:
    from drivers.mqtt.settings import BrokerSettings
    from drivers.zigbee2mqtt.client import BridgeLink
    from drivers.zigbee2mqtt.controller import (
        DeviceOfflineError,
        Z2MStats,
        Zigbee2MqttController,
    )
    from drivers.zigbee2mqtt.settings import Z2MTiming

__all__ = [
    "BridgeLink",
    "BrokerSettings",
    "DeviceOfflineError",
    "Z2MStats",
    "Z2MTiming",
    "Zigbee2MqttController",
]

#: Where each name lives, imported on first use (PEP 562).
_LAZY: Final = {
    "BridgeLink": "drivers.zigbee2mqtt.client",
    "BrokerSettings": "drivers.mqtt.settings",
    "DeviceOfflineError": "drivers.zigbee2mqtt.controller",
    "Z2MStats": "drivers.zigbee2mqtt.controller",
    "Z2MTiming": "drivers.zigbee2mqtt.settings",
    "Zigbee2MqttController": "drivers.zigbee2mqtt.controller",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
