"""Shared test options.

``pytest --port /dev/ttyUSB0`` runs the hardware-capable tests against a real bus
(wiring in hardware.md) and skips the tests that need a simulator's fault switches.
"""

from __future__ import annotations

import pytest


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
