"""Helpers the tests share: one fake clock, one ``wait_for``, one builder of the agent's
TOML.  The fixtures that use them (broker, sandbox, clock) are in ``tests/conftest.py``.
"""

from devkit.testing.agent_toml import AgentToml, Table, TomlValue, toml_value
from devkit.testing.clock import DAY, NOW, FakeClock, FakeTime, MemoryMeta
from devkit.testing.wait import returns_within, wait_for

__all__ = [
    "DAY",
    "NOW",
    "AgentToml",
    "FakeClock",
    "FakeTime",
    "MemoryMeta",
    "Table",
    "TomlValue",
    "returns_within",
    "toml_value",
    "wait_for",
]
