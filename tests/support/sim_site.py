"""The simulated site the agent tests share (tests/gateway/{agent,clock,intake,ops}/): simulators
on ptys and a config, on the test's broker or on one of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from devkit.mosquitto import Broker
from devkit.site import SimSite, make_site


def site(tmp_path: Path, broker: Broker) -> Iterator[SimSite]:
    """A site on ``broker``, closed at teardown."""
    s = make_site(tmp_path, broker)
    try:
        yield s
    finally:
        s.close()


def site_on_own_broker(tmp_path: Path) -> Iterator[SimSite]:
    """A site on a Mosquitto of its own (not the ``broker`` fixture); both are stopped at
    teardown."""
    with Broker(tmp_path / "broker") as broker:
        yield from site(tmp_path, broker)
