"""The ``tasmota`` driver's ``[[controllers]]`` settings: keys, ranges, defaults.

A device has up to 8 relays (``POWER1``-``POWER8``) and 8 inputs (``Switch1``-``Switch8``);
``topic`` is its Tasmota ``%topic%``.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.settings import (
    MQTT_DEVICE_KEYS,
    DriverSpec,
    MqttDeviceSettings,
    Range,
    SettingsReader,
    check_foreign,
    read_broker,
)

__all__ = ["SPEC", "TasmotaSettings"]

CHANNELS = Range(1, 8, 1)
INPUTS = Range(0, 8, 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class TasmotaSettings(MqttDeviceSettings):
    """One Tasmota device: its topic, relays and inputs, and its broker."""

    topic: str
    channels: int = CHANNELS.default
    inputs: int = INPUTS.default


def parse(r: SettingsReader) -> TasmotaSettings:
    """The settings of one ``tasmota`` controller table."""
    broker = read_broker(r)
    check_foreign(r, "scbk_file", "allow_insecure")
    channels = CHANNELS.read(r, "channels")
    inputs = INPUTS.read(r, "inputs")
    check_foreign(r, "pulse", "pulse_style", "pulse_base", "timeout_ms", "retries")
    return TasmotaSettings(
        channels=channels,
        inputs=inputs,
        topic=r.get_topic("topic"),
        broker_host=broker.host,
        broker_port=broker.port,
        broker_username=broker.username,
        broker_password_file=broker.password_file,
    )


SPEC = DriverSpec(
    name="tasmota",
    keys=MQTT_DEVICE_KEYS | {"topic", "channels", "inputs"},
    settings=TasmotaSettings,
    parse=parse,
    module="drivers.tasmota.controller",
    channels=CHANNELS,
    inputs=INPUTS,
    lock_refuses={
        "device": "device is for zigbee2mqtt locks; use channel",
        "status_input": "status_input (lock feedback) is read on modbus boards only",
    },
)
