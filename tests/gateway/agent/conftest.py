"""Fixtures of the tests here that run an agent on a simulated site."""

from __future__ import annotations

import pytest

from tests.support import sim_site

site = pytest.fixture(sim_site.site)
