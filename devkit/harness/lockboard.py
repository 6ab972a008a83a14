"""The ``lockboard`` driver's conformance harness: a simulated lock board on a pty.

The board can only release a latch (for its hold time); it has no lock command, so the
suite skips the steps that need one (``unlock_only``).
"""

from __future__ import annotations

from pathlib import Path

from devkit.mosquitto import Broker
from devkit.sims.lockboard import LockboardSim, start_lockboard_sim

ADDRESS = 2
HOLD_S = 1.0


class LockboardHarness:
    """Board 2 with 8 locks and a 1 s hold time."""

    driver = "lockboard"
    self_relocking = True
    unlock_only = True

    def __init__(self, directory: Path) -> None:
        self.running: LockboardSim = start_lockboard_sim(
            directory / "ttyConformanceLB", (ADDRESS,), 8, hold_s=HOLD_S)

    def controller_toml(self, name: str) -> str:
        return (f'[[controllers]]\nname = "{name}"\ndriver = "lockboard"\n'
                f'port = "{self.running.path}"\naddress = {ADDRESS}\nchannels = 8\n'
                "timeout_ms = 100\nretries = 1\n")

    def lock_keys(self, index: int) -> str:
        return f"channel = {index}\n"

    def unlocked(self, index: int) -> bool:
        return self.running.sim.is_unlocked(ADDRESS, index + 1)

    def set_silent(self, silent: bool) -> None:
        self.running.faults.ignore_requests = silent

    def set_offline(self, offline: bool) -> None:
        if offline:
            self.running.port.vanish()
        else:
            self.running.port.restore()

    def drift(self, index: int, unlocked: bool) -> None:
        sim = self.running.sim
        with sim._lock:  # the simulator's own lock: a latch released by hand
            sim.lock_at(ADDRESS, index + 1).released_at = sim.clock() if unlocked else None

    def close(self) -> None:
        self.running.close()


def make(directory: Path, broker: Broker) -> LockboardHarness:
    """The harness (the broker is not needed by a serial driver)."""
    del broker
    return LockboardHarness(directory)
