"""Fixtures of the state database tests (test_store_*.py): the database path, an open
store, a populated file and a tiny filesystem; the helpers are in tests/support/store.py.
"""

from __future__ import annotations

import pytest

from tests.support import store as support

db = pytest.fixture(support.db)
store = pytest.fixture(support.store)
populated = pytest.fixture(support.populated)
tiny_fs = pytest.fixture(support.tiny_fs)
