"""Fixtures of the deploy/ tests; the helpers are in tests/support/deploy_site.py."""

from __future__ import annotations

import pytest

from tests.support import deploy_site as support

bridged = pytest.fixture(support.bridged)
