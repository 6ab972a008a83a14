"""The ``zigbee2mqtt`` driver's settings: its ``[[controllers]]`` keys, thresholds, timings.

One controller is one Zigbee2MQTT instance (``base_topic``); its locks are named by
device, so it has no numbered outputs or inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from drivers.settings import (
    MQTT_DEVICE_KEYS,
    DriverSpec,
    MqttDeviceSettings,
    SettingsReader,
    check_foreign,
    read_broker,
)

__all__ = ["BATTERY_LOW_PCT", "BATTERY_OK_PCT", "SPEC", "Z2MTiming", "Zigbee2MqttSettings"]

#: Battery alarm thresholds in %: lock makers warn between 15 and 25 %, leaving weeks of
#: operation; the gap between the two keeps a battery that hovers around the threshold
#: (it reads lower in the cold) from raising an alarm at every report.
BATTERY_LOW_PCT: Final = 20.0
BATTERY_OK_PCT: Final = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Zigbee2MqttSettings(MqttDeviceSettings):
    """One Zigbee2MQTT instance: its base topic and its broker."""

    base_topic: str = "zigbee2mqtt"


def parse(r: SettingsReader) -> Zigbee2MqttSettings:
    """The settings of one ``zigbee2mqtt`` controller table."""
    broker = read_broker(r)
    check_foreign(r, "scbk_file", "allow_insecure", "pulse", "pulse_style", "pulse_base",
                  "timeout_ms", "retries")
    return Zigbee2MqttSettings(
        base_topic=r.get_topic("base_topic", "zigbee2mqtt"),
        broker_host=broker.host,
        broker_port=broker.port,
        broker_username=broker.username,
        broker_password_file=broker.password_file,
    )


SPEC = DriverSpec(
    name="zigbee2mqtt",
    keys=MQTT_DEVICE_KEYS | {"base_topic"},
    settings=Zigbee2MqttSettings,
    parse=parse,
    module="drivers.zigbee2mqtt.controller",
    lock_refuses={
        "channel": "a zigbee2mqtt lock is named by its device",
        "door_input": "the Zigbee lock reports its door itself",
        "status_input": "status_input is for modbus boards",
    },
    locks_by_device=True,
)


@dataclass(frozen=True, slots=True)
class Z2MTiming:
    """Every timing of the driver, named; tests shrink these rather than sleep.

    ``report_timeout_s``: how long a ``/set`` waits for the device's report.
    Zigbee2MQTT sends the Door Lock command, then reads the lock state back 200 ms
    later (``readAfterWriteTime``); a motor lock takes 1-3 s to throw its bolt and
    reports again when it got there, and a battery lock (a sleepy end device) only
    picks up its messages when it polls its parent, every few seconds.
    ``get_timeout_s``: how long a ``/get`` waits (one read, no motor).
    ``max_report_age_s``: a report this old is asked again on a read; well below
    Zigbee2MQTT's availability check of active devices (10 min).
    ``connect_wait_s``: how long an action waits for the broker link at start-up.
    ``retry_initial_s`` / ``retry_max_s``: pauses before an unresponsive device is
    asked again by a read (doubling).
    """

    report_timeout_s: float = 5.0
    get_timeout_s: float = 3.0
    max_report_age_s: float = 300.0
    connect_wait_s: float = 5.0
    subscribe_timeout_s: float = 5.0
    retry_initial_s: float = 5.0
    retry_max_s: float = 60.0
