"""The ``zigbee2mqtt`` driver's conformance harness: a simulated bridge on the broker.

The bridge sits on the agent's own ``[mqtt]`` broker (no ``host``/``port`` in the
controller table), with two locks whose friendly names contain a ``/`` as real sites'
often do.  The agent owns the relock timer (these locks do not relock by themselves).
``REPORT_DELAY_S`` is how long a device takes to report after a command: realistic for
a mains-powered lock close to the coordinator, and short enough for a fast suite.
"""

from __future__ import annotations

from pathlib import Path

from devkit.mosquitto import Broker
from devkit.sims.zigbee2mqtt import Zigbee2MqttSim

BASE_TOPIC = "z2m-conformance"
DEVICES = ("storage/lock-0", "storage/lock-1")
REPORT_DELAY_S = 0.05


class Zigbee2MqttHarness:
    """Two simulated Zigbee locks behind one simulated Zigbee2MQTT."""

    driver = "zigbee2mqtt"
    self_relocking = False
    unlock_only = False

    def __init__(self, broker: Broker, report_delay_s: float = REPORT_DELAY_S) -> None:
        self.sim = Zigbee2MqttSim(broker.host, broker.port, DEVICES, base_topic=BASE_TOPIC,
                                  report_delay_s=report_delay_s).start()

    def controller_toml(self, name: str) -> str:
        return (f'[[controllers]]\nname = "{name}"\ndriver = "zigbee2mqtt"\n'
                f'base_topic = "{BASE_TOPIC}"\n')

    def lock_keys(self, index: int) -> str:
        return f'device = "{DEVICES[index]}"\n'

    def unlocked(self, index: int) -> bool:
        return self.sim.unlocked(DEVICES[index])

    def set_silent(self, silent: bool) -> None:
        self.sim.faults.silent = silent

    def set_offline(self, offline: bool) -> None:
        self.sim.set_online(not offline)

    def drift(self, index: int, unlocked: bool) -> None:
        self.sim.drift(DEVICES[index], unlocked)

    def close(self) -> None:
        self.sim.close()


def make(directory: Path, broker: Broker, *,
         report_delay_s: float = REPORT_DELAY_S) -> Zigbee2MqttHarness:
    """The harness (a simulated bridge needs no files).

    ``report_delay_s`` is the devices' report latency; ``harness.sim.report_delay_s``
    may also be changed while it runs (0.2-0.3 s is what a real lock takes).
    """
    del directory
    return Zigbee2MqttHarness(broker, report_delay_s)
