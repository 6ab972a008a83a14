"""Waiting for something another thread or process does, without a fixed sleep.

Timeouts here are ceilings for a stuck test, never speed targets (those live in
``bench/``).  To check that something ends *by a deadline* without timing it, make every
other way out far slower than the ceiling (a long phase timeout, a long backoff) and wait
for the end with :func:`returns_within`: only the deadline can end it in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TypeVar

__all__ = ["returns_within", "wait_for"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             what: str | Callable[[], object] = "condition", *,
             interval: float = 0.02) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it is true.

    Past ``timeout`` the test fails with ``what`` (text, or a function that describes the
    state at that moment).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            shown = what() if callable(what) else what
            raise AssertionError(f"not within {timeout} s: {shown}")
        time.sleep(interval)


def returns_within(ceiling: float, call: Callable[[], T], what: str = "the call") -> T:
    """``call()``, run in a worker thread; fails the test if it has not returned within
    ``ceiling`` seconds.  Exceptions pass through.  (A call that never returns keeps the
    interpreter from exiting until it does: give the slow ways out an end, too.)"""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="returns-within")
    try:
        return pool.submit(call).result(timeout=ceiling)
    except FuturesTimeout:
        raise AssertionError(f"{what} did not return within {ceiling} s") from None
    finally:
        pool.shutdown(wait=False)
