"""Test faults: break one vital part of a running agent on purpose.

The systemd watchdog pings only while every vital part of the agent is alive
(gateway/schedule/watchdog.py); the tests prove that by breaking one and watching the pings stop.
The product has no switch for that: a test gives :func:`fault_hook`'s result to
``Agent(..., faults=…)`` (``gateway.agent.StartHook``), or runs the agent with
``python -m devkit.agent --fault NAME[@SECONDS]`` (devkit/agent.py).

Faults (:data:`FAULTS`), each ``SECONDS`` (default 1) after the start:

* ``wedge-units``: every unit worker blocked until shutdown;
* ``stop-link``: the MQTT link's threads end;
* ``stop-scheduler``: the scheduler's thread ends.

Each is logged as a warning when armed and when it fires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.agent import Agent, StartHook

__all__ = ["FAULTS", "FaultSpec", "fault_hook", "parse_fault"]

LOGGER = logging.getLogger(__name__)

#: Default delay between the start and the fault.
DEFAULT_DELAY_S: Final = 1.0
#: More keys than any unit pool has workers.
_WEDGE_KEYS: Final = 64


def _wedge_units(agent: Agent) -> None:
    for n in range(_WEDGE_KEYS):
        agent.units.run_exclusive(f"~wedge-{n}", agent.stop_event.wait)


def _stop_link(agent: Agent) -> None:
    agent.link.stop()


def _stop_scheduler(agent: Agent) -> None:
    agent.scheduler.shutdown_for_test()


#: Name -> what it does to a started agent.
FAULTS: Final[dict[str, Callable[[Agent], None]]] = {
    "wedge-units": _wedge_units,
    "stop-link": _stop_link,
    "stop-scheduler": _stop_scheduler,
}


class FaultSpec:
    """A fault by name and its delay after the start."""

    def __init__(self, name: str, delay_s: float = DEFAULT_DELAY_S) -> None:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; one of {sorted(FAULTS)}")
        if not delay_s >= 0:
            raise ValueError(f"fault delay {delay_s!r} must be 0 or more seconds")
        self.name = name
        self.delay_s = delay_s

    def __repr__(self) -> str:
        return f"{self.name}@{self.delay_s:g}"


def parse_fault(spec: str) -> FaultSpec:
    """``NAME[@SECONDS]`` as a :class:`FaultSpec`; ValueError for a typo, so a test with
    one fails loudly."""
    name, _, delay = spec.partition("@")
    try:
        seconds = float(delay) if delay else DEFAULT_DELAY_S
    except ValueError:
        raise ValueError(f"fault delay {delay!r} is not a number of seconds") from None
    return FaultSpec(name, seconds)


def fault_hook(fault: FaultSpec) -> StartHook:
    """The agent's start hook that injects ``fault`` after its delay (on a timer thread)."""

    def arm(agent: Agent) -> None:
        def fire() -> None:
            LOGGER.warning("TEST FAULT %s injected (the dev kit's, for tests only)",
                           fault.name)
            FAULTS[fault.name](agent)

        LOGGER.warning("test fault %r armed: this agent will break itself on purpose",
                       fault)
        timer = threading.Timer(fault.delay_s, fire)
        timer.daemon = True
        timer.name = "test-fault"
        timer.start()

    return arm
