"""The ``osdp`` driver's conformance harness: a simulated PD (libosdp PD mode) on a pty.

Secure Channel on, with a random key in a 0600 file, as in production.
"""

from __future__ import annotations

import os
from pathlib import Path

from devkit.mosquitto import Broker
from devkit.sims.osdp import OsdpPdSim

ADDRESS = 5


def write_scbk(path: Path, key: bytes) -> Path:
    """``key`` as 32 hex digits in a file only its owner may read (scbk_file)."""
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    return path


class OsdpHarness:
    """A PD with 4 outputs (strikes) and 4 inputs (door contacts); it relocks by itself."""

    driver = "osdp"
    self_relocking = True
    unlock_only = False

    def __init__(self, directory: Path) -> None:
        key = os.urandom(16)
        self.scbk_file = write_scbk(directory / "osdp-scbk.hex", key)
        self.sim = OsdpPdSim(directory / "ttyConformanceOSDP", address=ADDRESS, scbk=key,
                             outputs=4, inputs=4).start()

    def controller_toml(self, name: str) -> str:
        return (f'[[controllers]]\nname = "{name}"\ndriver = "osdp"\n'
                f'port = "{self.sim.path}"\nbaudrate = 115200\naddress = {ADDRESS}\n'
                f'scbk_file = "{self.scbk_file}"\nchannels = 4\ninputs = 4\n')

    def lock_keys(self, index: int) -> str:
        return f"channel = {index}\ndoor_input = {index}\n"

    def unlocked(self, index: int) -> bool:
        return self.sim.output(index)

    def set_silent(self, silent: bool) -> None:
        self.sim.silent = silent

    def set_offline(self, offline: bool) -> None:
        self.sim.set_offline(offline)

    def drift(self, index: int, unlocked: bool) -> None:
        self.sim.set_output(index, unlocked)

    def close(self) -> None:
        self.sim.close()


def make(directory: Path, broker: Broker) -> OsdpHarness:
    """The harness (the broker is not needed by a serial driver)."""
    del broker
    return OsdpHarness(directory)
