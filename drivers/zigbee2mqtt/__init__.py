"""The ``zigbee2mqtt`` driver: Zigbee door locks behind a Zigbee2MQTT bridge, over MQTT.

Layers, one module each::

    messages.py    topics and payloads of Zigbee2MQTT          (pure)
    client.py      BridgeLink: the driver's own paho client     (link)
    controller.py  Zigbee2MqttController                        (controller API)

Its simulator (``Zigbee2MqttSim``, a bridge on a real broker) is the dev kit's:
``devkit/sims/zigbee2mqtt.py``, which production code never imports.
"""

from drivers.zigbee2mqtt.client import BridgeLink, BrokerSettings
from drivers.zigbee2mqtt.controller import (
    DeviceOfflineError,
    Z2MStats,
    Z2MTiming,
    Zigbee2MqttController,
)

__all__ = [
    "BridgeLink",
    "BrokerSettings",
    "DeviceOfflineError",
    "Z2MStats",
    "Z2MTiming",
    "Zigbee2MqttController",
]
