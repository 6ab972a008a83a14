"""Shared test options and fixtures.

``pytest --port /dev/ttyUSB0`` runs the hardware-capable tests against a real bus
(wiring in hardware.md) and skips the tests that need a simulator's fault switches.

The shared fixtures: ``clock`` (a :class:`devkit.testing.FakeClock`), ``broker`` (one
Mosquitto per test) and ``sandbox`` (one Stora sandbox per test).  A test module tunes
the last two by overriding ``broker_options`` or ``sandbox_options``, which hold the
keyword arguments of :class:`devkit.mosquitto.Broker` and :class:`devkit.sandbox.Sandbox`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.site import STORA_TOKEN
from devkit.testing import FakeClock


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--port",
        default=None,
        help="serial port of a real RS-485 bus (pyserial URL); runs hardware tests there",
    )
    parser.addoption("--address", type=int, default=None, help="board address on --port")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    real = config.getoption("--port")
    for item in items:
        if real and "simulator_only" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="simulator-only test; --port given"))
        if not real and "hardware" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs --port (a real bus)"))


@pytest.fixture
def real_address(request: pytest.FixtureRequest) -> int | None:
    """The board address given with --address, or None."""
    value = request.config.getoption("--address")
    return int(value) if value is not None else None


@pytest.fixture
def real_port(request: pytest.FixtureRequest) -> str | None:
    """The real port given with --port, or None when running on simulators."""
    value = request.config.getoption("--port")
    return str(value) if value else None


@pytest.fixture
def clock() -> FakeClock:
    """Seconds that move only when the test says so."""
    return FakeClock()


@pytest.fixture
def broker_options() -> dict[str, Any]:
    """Keyword arguments for the ``broker`` fixture's :class:`Broker` (override per module)."""
    return {}


@pytest.fixture
def broker(tmp_path: Path, broker_options: dict[str, Any]) -> Iterator[Broker]:
    """A Mosquitto of this test's own on a free local port."""
    with Broker(tmp_path / "broker", **broker_options) as running:
        yield running


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    """Keyword arguments for the ``sandbox`` fixture's :class:`Sandbox` (override per
    module); by default it accepts the simulated site's static token."""
    return {"static_tokens": {STORA_TOKEN}}


@pytest.fixture
def sandbox(sandbox_options: dict[str, Any]) -> Iterator[Sandbox]:
    """A Stora sandbox of this test's own on a free local port."""
    with Sandbox(**sandbox_options) as running:
        yield running
