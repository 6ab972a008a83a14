"""Tasmota's MQTT messages as pure code: topics and payloads in, typed reports out.

Tasmota builds every topic from its ``FullTopic``, ``%prefix%/%topic%/`` by default, with
the prefixes ``cmnd`` (to the device), ``stat`` (answers and state changes) and ``tele``
(telemetry and the last will)::

    cmnd/<topic>/POWER2        ON | OFF | TOGGLE | ""      switch relay 2; "" = query
    cmnd/<topic>/PulseTime2    0..64900 | ""               relay 2's pulse; "" = query
    cmnd/<topic>/Status        10                          sensor status (inputs)
    stat/<topic>/POWER2        ON | OFF                    relay 2 changed or was queried
    stat/<topic>/RESULT        {"POWER2":"ON"}             the same, as JSON
                               {"PulseTime2":{"Set":30,"Remaining":30}}
                               {"Switch1":{"Action":"ON"}} (SetOption114 1)
                               {"PowerOnState":0}, {"SetOption114":"ON"}, {"SwitchMode1":1}
    stat/<topic>/STATUS10      {"StatusSNS":{"Time":"…","Switch1":"ON"}}
    stat/<topic>/PULSETIME1    {"PulseTime1":{…}}           (SetOption4 1: per command)
    tele/<topic>/SENSOR        {"Time":"…","Switch1":"ON"}  (TelePeriod; SwitchMode 15)
    tele/<topic>/STATE         {"Time":"…","POWER1":"ON",…} (TelePeriod)
    tele/<topic>/LWT           Online | Offline             retained; Offline is the will

Relay numbers are 1-based on the wire (``POWER1`` … ``POWER8``).  A device with a single
relay names it ``POWER`` (without a number) unless ``SetOption26 1`` is set, so ``POWER``
is read as relay 1.

``PulseTime<n>`` (Tasmota docs, Commands → PulseTime): 0 = off; 1..111 = 0.1 s steps
(0.1 to 11.1 s); 112..64900 = whole seconds + 100 (12 s to 64800 s).  When relay *n* is
switched on, by any source, the device switches it off again after that time.

Nothing here does I/O, reads a clock or keeps state.  Payloads Tasmota would not send
are rejected with :class:`MessageError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: Topic prefixes of the default ``FullTopic`` (Tasmota ``Prefix1`` … ``Prefix3``).
CMND: Final = "cmnd"
STAT: Final = "stat"
TELE: Final = "tele"
#: The last-will / birth payloads (Tasmota ``MQTT_LWT_ONLINE`` / ``MQTT_LWT_OFFLINE``).
ONLINE: Final = "Online"
OFFLINE: Final = "Offline"
#: Tasmota's default ``StateText1`` / ``StateText2``.
ON: Final = "ON"
OFF: Final = "OFF"
#: Relays a device may have (``POWER1`` … ``POWER32`` on ESP32; the config allows 1-8).
MAX_RELAYS: Final = 32
#: ``PulseTime`` limits: 1..111 are tenths of a second, 112..64900 seconds + 100.
PULSE_TENTHS_MAX: Final = 111
PULSE_SECONDS_OFFSET: Final = 100
PULSE_VALUE_MAX: Final = 64900
#: The longest pulse, in seconds (64900 - 100).
PULSE_MAX_S: Final = float(PULSE_VALUE_MAX - PULSE_SECONDS_OFFSET)
#: ``PowerOnState`` values (Tasmota docs, Commands → PowerOnState).
POWER_ON_STATES: Final[Mapping[int, str]] = {
    0: "relays off after power-up",
    1: "relays on after power-up (then off after PulseTime)",
    2: "relays toggled after power-up",
    3: "relays restored to their saved state after power-up",
    4: "relays on after power-up and relay control disabled",
    5: "relays off after power-up, then on after PulseTime (inverted PulseTime)",
}

_TOPIC_LEVEL = re.compile(r"^[^/+#\s]+$")
_INDEXED = re.compile(r"^(POWER|PulseTime|Switch|SwitchMode)([1-9][0-9]?)?$", re.IGNORECASE)


class MessageError(ValueError):
    """A message on a device's topics that Tasmota would not send (bad JSON, bad value)."""


# --------------------------------------------------------------------------- values


def pulse_value(seconds: float) -> int:
    """The ``PulseTime`` value for a pulse of at least ``seconds`` (rounded up).

    Up to 11.1 s the pulse is set in tenths (``3.2`` → ``32``); beyond, in whole seconds
    plus 100 (``12`` → ``112``, ``11.5`` → ``112``).  Rounding is always up, so the door
    is never relocked before the time asked for, and never by more than one step.
    """
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a pulse must be a positive number of seconds, got {seconds!r}")
    tenths = math.ceil(round(seconds * 10, 6))
    if tenths <= PULSE_TENTHS_MAX:
        return tenths
    value = math.ceil(round(seconds, 6)) + PULSE_SECONDS_OFFSET
    if value > PULSE_VALUE_MAX:
        raise ValueError(f"a Tasmota pulse lasts at most {PULSE_MAX_S:g} s, "
                         f"asked for {seconds:g} s")
    return value


def pulse_seconds(value: int) -> float:
    """The length of a ``PulseTime`` value in seconds (0 = no pulse)."""
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"PulseTime value out of range: {value}")
    if value <= PULSE_TENTHS_MAX:
        return value / 10
    return float(value - PULSE_SECONDS_OFFSET)


def check_topic(topic: str) -> str:
    """``topic`` if it can be a Tasmota ``%topic%`` (one level, no wildcards)."""
    if not _TOPIC_LEVEL.match(topic):
        raise ValueError(f"not a usable Tasmota topic: {topic!r} (one MQTT level, no "
                         "'/', '+', '#' or whitespace)")
    return topic


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    """One command to a device: published on ``cmnd/<topic>/<name>`` with ``payload``."""

    name: str
    payload: str = ""

    def topic(self, device: str) -> str:
        """The full topic for device ``device``."""
        return f"{CMND}/{device}/{self.name}"

    def encode(self) -> bytes:
        """The payload as sent (UTF-8; empty for a query)."""
        return self.payload.encode()


def power(relay: int, on: bool | None) -> Command:
    """``POWER<relay> ON|OFF``, or the query ``POWER<relay>`` with ``on=None``."""
    _check_relay(relay)
    return Command(f"POWER{relay}", "" if on is None else (ON if on else OFF))


def pulse_time(relay: int, value: int | None) -> Command:
    """``PulseTime<relay> <value>``, or the query with ``value=None``."""
    _check_relay(relay)
    if value is not None and not 0 <= value <= PULSE_VALUE_MAX:
        raise ValueError(f"PulseTime value out of range: {value}")
    return Command(f"PulseTime{relay}", "" if value is None else str(value))


def sensor_status() -> Command:
    """``Status 10``: the device answers with every input on ``stat/<topic>/STATUS10``."""
    return Command("Status", "10")


def query(name: str) -> Command:
    """A query of a setting (``PowerOnState``, ``SetOption114``, ``SwitchMode1``)."""
    return Command(name)


def _check_relay(relay: int) -> None:
    if not 1 <= relay <= MAX_RELAYS:
        raise ValueError(f"Tasmota relays are numbered 1-{MAX_RELAYS}, got {relay}")


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class PowerReport:
    """Relay ``relay`` (1-based) is on or off."""

    relay: int
    on: bool


@dataclass(frozen=True, slots=True)
class PulseReport:
    """``PulseTime<relay>`` is set to ``set``; ``remaining`` of a running pulse (same units)."""

    relay: int
    set: int
    remaining: int


@dataclass(frozen=True, slots=True)
class SwitchReport:
    """Input ``switch`` (1-based, ``Switch<n>``) is on (circuit closed) or off."""

    switch: int
    on: bool


@dataclass(frozen=True, slots=True)
class SettingReport:
    """The answer to a setting query: ``{"PowerOnState":0}`` → ``("PowerOnState", "0")``."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Availability:
    """``tele/<topic>/LWT``: the device's MQTT session is up (or its will was published)."""

    online: bool


Report = PowerReport | PulseReport | SwitchReport | SettingReport | Availability


def split_topic(topic: str) -> tuple[str, str, str] | None:
    """``(prefix, device, name)`` of ``prefix/device/name``; None for other shapes."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] not in (CMND, STAT, TELE) or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def decode(prefix: str, name: str, payload: bytes) -> list[Report]:
    """The reports in one message from a device (``prefix`` is ``stat`` or ``tele``).

    Messages that carry nothing this driver reads (``tele/…/INFO1``, a ``Dimmer``
    answer…) give an empty list; a payload that cannot be what Tasmota sends raises
    :class:`MessageError`.
    """
    if prefix == TELE and name == "LWT":
        return [Availability(_lwt(payload))]
    if prefix == STAT:
        if payload.lstrip().startswith(b"{"):  # RESULT, STATUS10, or <Command> (SetOption4)
            return _from_json(_json(payload))
        match = _INDEXED.match(name)
        if match and match.group(1).upper() == "POWER":
            return [PowerReport(_index(match.group(2)), _state(_text(payload), name))]
        if name == "RESULT" or name.startswith("STATUS"):
            raise MessageError(f"{name}: expected a JSON object, got {payload[:60]!r}")
        return []
    if prefix == TELE and name in ("SENSOR", "STATE"):
        return _from_json(_json(payload))
    return []


def _from_json(doc: Mapping[str, object]) -> list[Report]:
    reports: list[Report] = []
    for key, value in doc.items():
        if key in ("StatusSNS", "StatusSTS") and isinstance(value, Mapping):
            reports += _from_json(value)
            continue
        match = _INDEXED.match(key)
        if match is None:
            if key in ("PowerOnState", "Command") or key.startswith("SetOption"):
                reports.append(SettingReport(key, _scalar(key, value)))
            continue
        kind, number = match.group(1).lower(), _index(match.group(2))
        if kind == "power":
            reports.append(PowerReport(number, _state(value, key)))
        elif kind == "pulsetime":
            reports.append(_pulse(key, number, value))
        elif kind == "switch":
            if isinstance(value, Mapping):  # {"Switch1":{"Action":"ON"}} (SetOption114)
                action = value.get("Action")
                if action in (ON, OFF):  # HOLD, INC_DEC … are button gestures, not states
                    reports.append(SwitchReport(number, action == ON))
            else:
                reports.append(SwitchReport(number, _state(value, key)))
        elif kind == "switchmode":
            reports.append(SettingReport(f"SwitchMode{number}", _scalar(key, value)))
    return reports


def _pulse(key: str, relay: int, value: object) -> PulseReport:
    if not isinstance(value, Mapping):
        raise MessageError(f"{key}: expected {{\"Set\":…,\"Remaining\":…}}, got {value!r}")
    set_, remaining = value.get("Set"), value.get("Remaining")
    if not _is_int(set_) or not _is_int(remaining):
        raise MessageError(f"{key}: Set and Remaining must be integers, got {value!r}")
    assert isinstance(set_, int)
    assert isinstance(remaining, int)
    return PulseReport(relay, set_, remaining)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF


def _scalar(key: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MessageError(f"{key}: expected a number or a word, got {value!r}")
    return str(value)


def _index(digits: str | None) -> int:
    number = int(digits) if digits else 1  # "POWER" of a one-relay device is relay 1
    if not 1 <= number <= MAX_RELAYS:
        raise MessageError(f"index out of range: {number}")
    return number


def _state(value: object, key: str) -> bool:
    if isinstance(value, str) and value.upper() in (ON, OFF):
        return value.upper() == ON
    raise MessageError(f"{key}: expected ON or OFF, got {value!r}")


def _lwt(payload: bytes) -> bool:
    text = _text(payload)
    if text.lower() == ONLINE.lower():
        return True
    if text.lower() == OFFLINE.lower():
        return False
    raise MessageError(f"LWT: expected Online or Offline, got {text!r}")


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise MessageError(f"payload is not UTF-8: {payload[:40]!r}") from exc


def _json(payload: bytes) -> Mapping[str, object]:
    try:
        doc = json.loads(_text(payload))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise MessageError(f"payload is not JSON: {payload[:60]!r}") from exc
    if not isinstance(doc, dict):
        raise MessageError(f"expected a JSON object, got {payload[:60]!r}")
    return doc


# --------------------------------------------------------------------------- device side


def power_name(relay: int, relays: int, *, index_always: bool = False) -> str:
    """What a device calls relay ``relay``: ``POWER`` on a one-relay device, else ``POWERn``.

    ``index_always`` is ``SetOption26 1`` (always ``POWER1``).
    """
    return f"POWER{relay}" if relays > 1 or index_always else "POWER"


def encode_state(on: bool) -> bytes:
    """``ON`` / ``OFF`` as on ``stat/<topic>/POWER<n>``."""
    return (ON if on else OFF).encode()


def encode_result(doc: Mapping[str, object]) -> bytes:
    """A ``stat/<topic>/RESULT`` (or STATUS, SENSOR) payload, compact like Tasmota's."""
    return json.dumps(doc, separators=(",", ":")).encode()
