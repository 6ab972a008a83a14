"""Fixtures of the outbox drainer tests (test_outbox_agent/bounds/delivery.py): a store,
the sandbox over real HTTP and a drainer (the helpers are in tests/support/outbox.py).

The fake ``clock`` and the limited ``sandbox_options`` are not here: test_outbox_kill.py
uses the root ``sandbox``, so each of those modules overrides them itself.
"""

from __future__ import annotations

import pytest

from tests.support import outbox as support

http = pytest.fixture(support.http)
rig = pytest.fixture(support.rig)
