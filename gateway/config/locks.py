"""``[[locks]]``: each lock, where it is wired, and the checks across locks.

A lock names its controller; what it may say depends on that controller's driver (a
channel or a device, which inputs: the driver's :class:`~drivers.settings.DriverSpec`),
and no two locks share an output or an input.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Final

from drivers.registry import driver_spec
from gateway.config.controllers import Controllers
from gateway.config.model import ControllerConfig, EnergizeTo, LockConfig
from gateway.config.problems import guarded
from gateway.config.reader import Table, check_stora_id, check_topic_segment, show_int

__all__ = ["LOCK_KEYS", "parse_locks"]


LOCK_KEYS: Final = frozenset({
    "unit", "reference", "controller", "channel", "door_input", "status_input", "device",
    "energize_to", "unlock_seconds",
})
_ENERGIZE: Final[Mapping[str, EnergizeTo]] = {"unlock": "unlock", "lock": "lock"}


def _nothing() -> None:
    """The fallback of a lock that could not be built: it is left out."""


def _not_for_driver(t: Table, name: str, driver: str, why: str) -> None:
    if t.has(name):
        t.error(name, f"key not valid for driver {driver}: {why}")


def _get_index(t: Table, name: str, what: str, c: ControllerConfig | None,
               count: int) -> int | None:
    """An optional 0-based output/input number that must exist on controller ``c``.

    ``None`` when absent or wrong; without a usable controller only its type is checked.
    """
    value = t.get_opt_int(name)
    if value is None or c is None or not t.ok(name):
        return value
    if not 0 <= value < count:
        span = f"0–{count - 1}" if count else f"it has no {what}s"
        t.error(name, f"{what} {show_int(value)} is out of range for controller "
                      f"{c.name!r} ({span})")
        return None
    return value


def _parse_lock(t: Table, found: Controllers) -> LockConfig:
    t.check_keys(LOCK_KEYS)
    unit = t.get_str("unit")
    if t.ok("unit") and check_stora_id(t, "unit", unit, "unit_", "unit id"):
        check_topic_segment(t, "unit", unit)
    reference = t.get_str("reference", nonempty=True)
    name = t.get_str("controller")
    c = found.usable.get(name) if t.ok("controller") else None
    if t.ok("controller") and name not in found.names and not found.unnamed:
        known = ", ".join(repr(n) for n in found.names) or "none are defined"
        t.error("controller", f"no controller named {name!r} (known: {known})")
    device: str | None = None
    channel: int | None = None
    if c is None:
        # The controller is unknown or has problems of its own (reported there): what
        # depends on it cannot be judged, and the checks across locks skip this one.
        t.bad.add("controller")
        channel = t.get_opt_int("channel")
    else:
        # Which lock keys a driver refuses, and whether its locks are named by device, is
        # the driver's own (drivers/<driver>/settings.py).
        spec = driver_spec(c.driver)
        if spec is None:  # pragma: no cover (a controller's driver was checked when parsed)
            raise LookupError(f"controller {c.name!r} has unknown driver {c.driver!r}")
        for key, why in spec.lock_refuses.items():
            _not_for_driver(t, key, c.driver, why)
        if spec.locks_by_device:
            if not t.has("device"):
                t.error("device", f"required for a lock on {c.driver} controller {c.name!r}: "
                                  "the device's friendly name")
            else:
                device = t.get_topic("device")
        elif not t.has("channel"):
            t.error("channel", "required key is missing: the output number on controller "
                               f"{c.name!r}")
        else:
            channel = _get_index(t, "channel", "channel", c, c.channels)
    inputs = c.inputs if c is not None else 0
    return LockConfig(
        unit=unit,
        reference=reference,
        controller=name,
        channel=channel,
        door_input=_get_index(t, "door_input", "input", c, inputs),
        status_input=_get_index(t, "status_input", "input", c, inputs),
        device=device,
        energize_to=t.get_choice("energize_to", "unlock", _ENERGIZE),
        unlock_seconds=t.get_int("unlock_seconds", 8, 1, 3600),
    )


def parse_locks(tables: list[Table], found: Controllers) -> tuple[LockConfig, ...]:
    locks: list[tuple[Table, LockConfig]] = []
    units: dict[str, int] = {}
    references: dict[str, int] = {}
    outputs: dict[tuple[str, int | str], int] = {}  # (controller, channel or device)
    inputs: dict[tuple[str, int], tuple[int, str]] = {}  # (controller, input) -> (lock, key)
    for t in tables:
        index = t.index or 0
        lock = guarded(t.problems, partial(_parse_lock, t, found), _nothing)
        if lock is None:
            continue
        locks.append((t, lock))
        if t.ok("unit"):
            if lock.unit in units:
                t.error("unit", f"duplicate unit id {lock.unit!r} (also "
                                f"locks[{units[lock.unit]}])")
            else:
                units[lock.unit] = index
        folded = lock.reference.casefold()
        if t.ok("reference"):
            if folded in references:
                t.error("reference", f"duplicate reference {lock.reference!r} "
                                     f"(also locks[{references[folded]}])")
            else:
                references[folded] = index
        if not t.ok("controller"):
            continue  # outputs and inputs belong to a controller that is not sound
        _check_wiring(t, lock, outputs, inputs)
    # A reference that is another lock's unit id would make `unlock UNIT` ambiguous.
    for t, lock in locks:
        owner = units.get(lock.reference)
        if owner is not None and owner != t.index and t.ok("reference"):
            t.error("reference", f"{lock.reference!r} is also the unit id of "
                                 f"locks[{owner}]; a reference must differ from every unit "
                                 "id")
    return tuple(lock for _, lock in locks)


def _check_wiring(t: Table, lock: LockConfig, outputs: dict[tuple[str, int | str], int],
                  inputs: dict[tuple[str, int], tuple[int, str]]) -> None:
    """No two locks on one output of a controller, nor on one of its inputs."""
    index = t.index or 0
    where: tuple[str, int | str] | None = None
    if lock.device is not None and t.ok("device"):
        where, key, label = (lock.controller, lock.device), "device", f"device {lock.device!r}"
    elif lock.channel is not None and t.ok("channel"):
        where, key, label = (lock.controller, lock.channel), "channel", f"channel {lock.channel}"
    if where is not None:
        if where in outputs:
            t.error(key, f"{label} of controller {lock.controller!r} is already used by "
                         f"locks[{outputs[where]}]")
        else:
            outputs[where] = index
    for input_key in ("door_input", "status_input"):
        number = getattr(lock, input_key)
        if number is None or not t.ok(input_key):
            continue
        if (lock.controller, number) in inputs:
            other, other_key = inputs[(lock.controller, number)]
            t.error(input_key, f"input {number} of controller {lock.controller!r} is "
                               f"already used as locks[{other}].{other_key}")
        else:
            inputs[(lock.controller, number)] = (index, input_key)
