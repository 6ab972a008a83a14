"""Fixtures of the sandbox tests (test_sandbox_*.py), the only modules here that use the
``clock`` or ``sandbox`` fixtures: a fake clock, and sandboxes on it whose limits a frozen
clock never meets (``sandbox``) or soon meets (``limited``); the helpers are in
tests/support/sandbox.py.

The sandbox is the peer of the outbox's exactly-once tests, so the sandbox tests pin the
behaviours those tests rely on: replay of the first reply under a key (201, 422 and 500
alike), key and token expiry on the injected clock, strict sliding-window rate limits,
and every fault switch, through both the Python API and the admin HTTP API.  Requests go
through ``http.client`` on real sockets; time moves by advancing a fake clock, not by
sleeping (except where the point is real time).
"""

from __future__ import annotations

import pytest

from tests.support import sandbox as support

clock = pytest.fixture(support.clock)
sandbox_options = pytest.fixture(support.sandbox_options)
limited = pytest.fixture(support.limited)
