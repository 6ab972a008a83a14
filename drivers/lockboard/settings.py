"""The ``lockboard`` driver's ``[[controllers]]`` settings: keys, ranges, defaults.

A board's address is its 5-bit DIP switch (0-31); a board has up to 48 locks.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.settings import (
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

__all__ = ["SPEC", "LockboardSettings"]

ADDRESS = Range(0, 31, 0)
CHANNELS = Range(1, 48, 16)


@dataclass(frozen=True, kw_only=True, slots=True)
class LockboardSettings(SerialSettings):
    """One CU16/CU48-style lock-control board: its address and how many locks it has."""

    channels: int = CHANNELS.default


def parse(r: SettingsReader) -> LockboardSettings:
    """The settings of one ``lockboard`` controller table."""
    port, baudrate = read_serial_port(r)
    check_foreign(r, "scbk_file", "allow_insecure")
    address = ADDRESS.read(r, "address")
    channels = CHANNELS.read(r, "channels")
    check_foreign(r, "pulse", "pulse_style", "pulse_base")
    return LockboardSettings(
        port=port,
        baudrate=baudrate,
        address=address,
        channels=channels,
        timeout_ms=TIMEOUT_MS.read(r, "timeout_ms"),
        retries=RETRIES.read(r, "retries"),
    )


SPEC = DriverSpec(
    name="lockboard",
    keys=SERIAL_KEYS | {"channels"},
    settings=LockboardSettings,
    parse=parse,
    module="drivers.lockboard.controller",
    address=ADDRESS,
    channels=CHANNELS,
    scan=range(32),
    lock_refuses={
        "device": "device is for zigbee2mqtt locks; use channel",
        "door_input": "the lock board reports each lock's door state itself",
        "status_input": "status_input (lock feedback) is read on modbus boards only",
    },
)
