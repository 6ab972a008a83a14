"""The ``modbus`` driver's ``[[controllers]]`` settings: keys, ranges, defaults.

Slave ids are 1-247 (Modbus over serial line spec §2.2).  With ``pulse`` the board times
an unlock itself; ``pulse_style`` says how it is asked (hardware.md, "Board-timed
unlock"): Waveshare's "flash on" coil write, or a holding-register write at
``pulse_base`` + channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.settings import (
    PULSE_STYLES,
    RETRIES,
    SERIAL_KEYS,
    TIMEOUT_MS,
    DriverSpec,
    Range,
    SerialSettings,
    SettingsReader,
    check_foreign,
    read_serial_port,
)

__all__ = ["SPEC", "ModbusSettings"]

ADDRESS = Range(1, 247, 1)
CHANNELS = Range(1, 256, 8)
INPUTS = Range(0, 256, 8)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModbusSettings(SerialSettings):
    """One Modbus RTU relay board: its coils, inputs and how it times a pulse."""

    channels: int = CHANNELS.default
    inputs: int = INPUTS.default
    pulse: bool = False
    pulse_style: str = "flash_coil"
    pulse_base: int | None = None


def parse(r: SettingsReader) -> ModbusSettings:
    """The settings of one ``modbus`` controller table."""
    port, baudrate = read_serial_port(r)
    check_foreign(r, "scbk_file", "allow_insecure")
    return ModbusSettings(
        port=port,
        baudrate=baudrate,
        address=ADDRESS.read(r, "address"),
        channels=CHANNELS.read(r, "channels"),
        inputs=INPUTS.read(r, "inputs"),
        pulse=r.get_bool("pulse", False),
        pulse_style=r.get_choice("pulse_style", "flash_coil", PULSE_STYLES),
        pulse_base=r.get_int("pulse_base", 0, 0, 0xFFFF) if r.has("pulse_base") else None,
        timeout_ms=TIMEOUT_MS.read(r, "timeout_ms"),
        retries=RETRIES.read(r, "retries"),
    )


SPEC = DriverSpec(
    name="modbus",
    keys=SERIAL_KEYS | {"pulse", "pulse_style", "pulse_base", "channels", "inputs"},
    settings=ModbusSettings,
    parse=parse,
    module="drivers.modbus.controller",
    address=ADDRESS,
    channels=CHANNELS,
    inputs=INPUTS,
    scan=range(1, 248),
    lock_refuses={
        "device": "device is for zigbee2mqtt locks; use channel",
    },
)
