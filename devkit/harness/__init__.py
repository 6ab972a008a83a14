"""One simulated controller per driver, behind one interface, for the conformance suite.

``tests/drivers/test_conformance.py`` runs the same scenarios against every driver through its
simulator, with the real agent in between (signed commands on a real broker, the unit
manager, reconciliation, alarms):

* unlock → confirmed → relock → confirmed;
* no reply → ``not_confirmed`` (never ``done``);
* controller offline → an alarm; back online → state read again, lockout re-applied;
* hardware drift (the lock changes by itself) → corrected by reconciliation.

A driver joins the suite with a module ``devkit/harness/<driver>.py`` exposing
``make(directory: Path, broker: Broker) -> Harness`` and a line in :data:`HARNESSES`.
Nothing else: the suite never names a driver.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from devkit.mosquitto import Broker

#: driver -> module with ``make(directory, broker)``.  Every driver of contract §3.
HARNESSES: dict[str, str] = {
    "modbus": "devkit.harness.modbus",
    "lockboard": "devkit.harness.lockboard",
    "zigbee2mqtt": "devkit.harness.zigbee2mqtt",
    "tasmota": "devkit.harness.tasmota",
    "osdp": "devkit.harness.osdp",
}


class Harness(Protocol):
    """A running simulator of one controller with (at least) two locks, 0 and 1."""

    #: The driver name, as in ``[[controllers]] driver``.
    driver: str
    #: True when the controller ends a timed unlock by itself (a pulse): the suite then
    #: expects the relock without the agent's timer.
    self_relocking: bool
    #: True when the device can only unlock (a latch that re-engages by itself, like the
    #: lock board): the suite then skips the "lock" and drift-to-unlocked steps.
    unlock_only: bool

    def controller_toml(self, name: str) -> str:
        """The ``[[controllers]]`` table for this simulator, named ``name`` (with the
        ``[[controllers]]`` header; timeouts short enough for tests)."""
        ...

    def lock_keys(self, index: int) -> str:
        """The driver's keys of lock ``index`` (``channel = 0`` / ``device = "…"``, and
        ``door_input`` where the simulator has door contacts), TOML lines."""
        ...

    def unlocked(self, index: int) -> bool:
        """Whether lock ``index`` is physically unlocked in the simulator right now."""
        ...

    def set_silent(self, silent: bool) -> None:
        """Stop (or resume) answering: commands and reads get no reply at all."""
        ...

    def set_offline(self, offline: bool) -> None:
        """The controller disappears (or comes back) as it would in the field: a serial
        adapter unplugged, an MQTT device's availability/LWT going offline."""
        ...

    def drift(self, index: int, unlocked: bool) -> None:
        """The hardware changes lock ``index`` by itself (someone at the device, a glitch)."""
        ...

    def close(self) -> None:
        """Stop the simulator and remove what it created."""
        ...


def make_harness(driver: str, directory: Path, broker: Broker) -> Harness:
    """The harness of ``driver`` (see :data:`HARNESSES`)."""
    module = importlib.import_module(HARNESSES[driver])
    harness: Harness = module.make(directory, broker)
    return harness
