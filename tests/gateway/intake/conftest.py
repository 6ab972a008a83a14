"""Fixtures of the remote-management tests (test_mgmt*.py): a simulated site and a client
subscribed to the answers; the helpers are in tests/support/mgmt.py.
"""

from __future__ import annotations

import pytest

from tests.support import mgmt, sim_site

site = pytest.fixture(sim_site.site)
client = pytest.fixture(mgmt.make_client, name="client")
