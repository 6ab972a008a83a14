"""The ``tasmota`` driver's conformance harness: a simulated Tasmota device on the broker.

The device has two relays (``POWER1``/``POWER2``) and two door contacts (``Switch1``/
``Switch2``, detached from the relays with ``SetOption114 1``), and sits on the same
Mosquitto as the agent (no ``host``/``port`` in its table).  It ends an unlock itself
(``PulseTime``), so the suite expects the relock without the agent's timer.
"""

from __future__ import annotations

from pathlib import Path

from devkit.mosquitto import Broker
from devkit.sims.tasmota import TasmotaSim

TOPIC = "conformance_relay"


class TasmotaHarness:
    """A two-relay Tasmota device with door contacts; it relocks by itself."""

    driver = "tasmota"
    self_relocking = True
    unlock_only = False

    def __init__(self, broker: Broker) -> None:
        # loop_sleep_s: Tasmota's default "Sleep 50" delays each command by 0-50 ms.
        self.sim = TasmotaSim(broker.host, broker.port, TOPIC, relays=2, switches=2,
                              loop_sleep_s=0.05).start()

    def controller_toml(self, name: str) -> str:
        return (f'[[controllers]]\nname = "{name}"\ndriver = "tasmota"\n'
                f'topic = "{TOPIC}"\nchannels = 2\ninputs = 2\n')

    def lock_keys(self, index: int) -> str:
        return f"channel = {index}\ndoor_input = {index}\n"

    def unlocked(self, index: int) -> bool:
        return self.sim.device.relay(index + 1)

    def set_silent(self, silent: bool) -> None:
        self.sim.silent = silent

    def set_offline(self, offline: bool) -> None:
        self.sim.set_offline(offline)

    def drift(self, index: int, unlocked: bool) -> None:
        self.sim.device.press(index + 1, unlocked)  # someone at the device's button

    def close(self) -> None:
        self.sim.close()


def make(directory: Path, broker: Broker) -> TasmotaHarness:
    """The harness (the device needs no files)."""
    del directory
    return TasmotaHarness(broker)
