"""Fixtures of the Stora client tests (test_stora_client_*.py): a sandbox and a client on
one fake clock, over real HTTP (the helpers are in tests/support/stora_client.py).

``clock`` and ``sandbox_options`` override the root ones for this folder; the one other
module here, test_hostile_answers.py, uses neither.
"""

from __future__ import annotations

import pytest

from tests.support import stora_client as support

clock = pytest.fixture(support.clock)
http = pytest.fixture(support.http)
sandbox_options = pytest.fixture(support.sandbox_options)
rig = pytest.fixture(support.rig)
