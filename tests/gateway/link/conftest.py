"""Fixtures of the MqttLink tests (test_mqtt_link_*.py); the helpers are in
tests/support/mqtt_link.py.

Every test that needs ``mosquitto`` gets it from the ``broker`` fixture, which raises
(fails) when the binary is missing: these tests never skip.  Timings are shrunk through
:class:`LinkTimings`; the figures asked for by the fault matrix are printed (run with
``-s`` to see them).
"""

from __future__ import annotations

import pytest

from tests.support import mqtt_link as support

make_link = pytest.fixture(support.make_link)
