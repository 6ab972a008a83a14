"""Zigbee2MQTT's lock messages as pure code: topics, payloads in and out.

No I/O, no clock.  The formats are Zigbee2MQTT's, as documented on each lock's device
page ("Exposes: lock (state, lock_state), battery") and in "MQTT Topics and Messages"::

    <base>/<name>               device → us   {"state": "LOCK"|"UNLOCK",
                                                "lock_state": "locked"|"unlocked"|
                                                              "not_fully_locked",
                                                "battery": 0-100, …}
    <base>/<name>/set           us → device   {"state": "LOCK"} / {"state": "UNLOCK"}
    <base>/<name>/get           us → device   {"state": ""}  (read the lock state)
    <base>/<name>/availability  device → us   {"state": "online"|"offline"} (retained);
                                               legacy plain "online"/"offline"
    <base>/bridge/state         bridge → us   the same, for Zigbee2MQTT itself (its will)

``<name>`` is the device's friendly name, which may contain ``/`` (``site/A-101``), so a
topic is never split to find the device: the client matches whole topics it built.

A state message carries the device's whole cached state, not only what changed: a
battery report repeats ``state`` as Zigbee2MQTT last knew it.  Freshness is therefore
the receiver's business (``controller``), never this module's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from drivers.base import DoorState, LockState

#: Characters a friendly name must not contain: MQTT wildcards, NUL; and no empty level
#: at either end (Zigbee2MQTT refuses such names too).
_FORBIDDEN: Final = frozenset("+#\0")
#: Suffixes Zigbee2MQTT reserves after a friendly name.
_RESERVED_SUFFIXES: Final = ("/set", "/get", "/availability")

LOCK: Final = "LOCK"
UNLOCK: Final = "UNLOCK"
_LOCK_STATES: Final = {
    "locked": LockState.LOCKED,
    "unlocked": LockState.UNLOCKED,
    # The bolt stopped between the two (jammed, door not shut): neither is true.
    "not_fully_locked": LockState.UNKNOWN,
}
_DOOR_STATES: Final = {"open": DoorState.OPEN, "closed": DoorState.CLOSED}


class PayloadError(ValueError):
    """A payload that is not what Zigbee2MQTT sends (not JSON, not an object, …)."""


def check_friendly_name(name: str) -> str:
    """``name`` if it can be a friendly name in a topic; ``ValueError`` otherwise."""
    if not name or _FORBIDDEN & set(name):
        raise ValueError(f"bad Zigbee2MQTT friendly name {name!r}: empty or has + # NUL")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise ValueError(f"bad Zigbee2MQTT friendly name {name!r}: empty topic level")
    if name.endswith(_RESERVED_SUFFIXES) or name == "bridge" or name.startswith("bridge/"):
        raise ValueError(f"bad Zigbee2MQTT friendly name {name!r}: reserved by Zigbee2MQTT")
    return name


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one Zigbee2MQTT instance (``base_topic``, default ``zigbee2mqtt``)."""

    base: str = "zigbee2mqtt"

    def state(self, name: str) -> str:
        """Where the device's state reports arrive."""
        return f"{self.base}/{name}"

    def set(self, name: str) -> str:
        """Where commands go."""
        return f"{self.base}/{name}/set"

    def get(self, name: str) -> str:
        """Where a read request goes; the answer is a state report."""
        return f"{self.base}/{name}/get"

    def availability(self, name: str) -> str:
        """The device's retained online/offline state."""
        return f"{self.base}/{name}/availability"

    @property
    def bridge_state(self) -> str:
        """Zigbee2MQTT's own retained online/offline state (its last will)."""
        return f"{self.base}/bridge/state"


# --------------------------------------------------------------------------- outgoing


def encode_set(locked: bool) -> bytes:
    """The ``/set`` payload that locks (``True``) or unlocks (``False``)."""
    return json.dumps({"state": LOCK if locked else UNLOCK}).encode()


def encode_get() -> bytes:
    """The ``/get`` payload that reads the lock state (a value is required and ignored)."""
    return b'{"state": ""}'


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded ``/set`` or ``/get`` payload (what a bridge receives; the simulator's)."""

    state: Literal["LOCK", "UNLOCK"] | None
    read: bool


def decode_command(payload: bytes, *, get: bool) -> Command:
    """Decode what was published on ``/set`` (``get=False``) or ``/get`` (``get=True``).

    Zigbee2MQTT also takes a bare ``LOCK`` on ``/set``; both forms are accepted.
    """
    text = _text(payload).strip()
    if not get and text.upper() in (LOCK, UNLOCK):
        return Command(LOCK if text.upper() == LOCK else UNLOCK, read=False)
    obj = _object(text)
    if "state" not in obj:
        raise PayloadError("no 'state' key")
    if get:
        return Command(None, read=True)
    value = obj["state"]
    if not isinstance(value, str) or value.upper() not in (LOCK, UNLOCK):
        raise PayloadError(f"state must be LOCK or UNLOCK, got {value!r}")
    return Command(LOCK if value.upper() == LOCK else UNLOCK, read=False)


# --------------------------------------------------------------------------- incoming


@dataclass(frozen=True, slots=True)
class Report:
    """The lock-related part of one state message; ``None`` where the message has none.

    ``battery`` is a percentage (0-100), ``battery_low`` the flag some devices send
    instead; ``auto_relock`` is exposed by locks that relock by themselves.
    """

    state: Literal["LOCK", "UNLOCK"] | None = None
    lock_state: str | None = None
    battery: float | None = None
    battery_low: bool | None = None
    door_state: str | None = None
    auto_relock: bool | None = None

    @property
    def lock(self) -> LockState:
        """What the report says about the bolt.

        ``lock_state`` wins: Zigbee2MQTT derives ``state`` from the same attribute but
        maps "not fully locked" to ``UNLOCK``, which is not the truth either.
        """
        if self.lock_state is not None:
            return _LOCK_STATES.get(self.lock_state, LockState.UNKNOWN)
        if self.state == LOCK:
            return LockState.LOCKED
        if self.state == UNLOCK:
            return LockState.UNLOCKED
        return LockState.UNKNOWN

    @property
    def door(self) -> DoorState:
        """The door, for locks that report ``door_state``; ``UNKNOWN`` otherwise."""
        return _DOOR_STATES.get(self.door_state or "", DoorState.UNKNOWN)

    @property
    def has_lock(self) -> bool:
        """True when the message says anything about the lock itself."""
        return self.state is not None or self.lock_state is not None

    def payload(self) -> dict[str, Any]:
        """The message as Zigbee2MQTT would publish it (for the simulator)."""
        out: dict[str, Any] = {}
        for key in ("state", "lock_state", "battery", "battery_low", "door_state",
                    "auto_relock"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def encode(self) -> bytes:
        """:meth:`payload` as JSON bytes."""
        return json.dumps(self.payload()).encode()


def decode_report(payload: bytes) -> Report:
    """Decode a state message; unknown keys (``linkquality``, …) are ignored.

    A key with a value of the wrong type is ignored too (the device said nothing usable
    about it); a payload that is not a JSON object is a ``PayloadError``.
    """
    obj = _object(_text(payload))
    state = obj.get("state")
    lock_state = obj.get("lock_state")
    battery = obj.get("battery")
    door = obj.get("door_state")
    return Report(
        state=state if state in (LOCK, UNLOCK) else None,
        lock_state=lock_state if isinstance(lock_state, str) else None,
        battery=_percent(battery),
        battery_low=_opt_bool(obj.get("battery_low")),
        door_state=door if isinstance(door, str) else None,
        auto_relock=_opt_bool(obj.get("auto_relock")),
    )


def decode_availability(payload: bytes) -> bool | None:
    """``True`` online, ``False`` offline, ``None`` for anything else.

    Zigbee2MQTT sends ``{"state":"online"}``; older versions (and
    ``legacy_availability_payload: true``) a bare ``online``.  An empty payload is a
    cleared retained message: nothing is known.
    """
    try:
        text = _text(payload).strip()
    except PayloadError:
        return None
    if text in ("online", "offline"):
        return text == "online"
    try:
        obj = _object(text)
    except PayloadError:
        return None
    value = obj.get("state")
    if value in ("online", "offline"):
        return bool(value == "online")
    return None


def encode_availability(online: bool, *, legacy: bool = False) -> bytes:
    """An availability payload (for the simulator)."""
    word = "online" if online else "offline"
    return word.encode() if legacy else json.dumps({"state": word}).encode()


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"not UTF-8: {exc}") from exc


def _object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise PayloadError(f"not a JSON object: {type(obj).__name__}")
    return obj


def _percent(value: object) -> float | None:
    """A battery percentage, or None for anything that is not a number in 0-100."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.nan
    return number if math.isfinite(number) and 0 <= number <= 100 else None


def _opt_bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None
