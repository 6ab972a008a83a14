"""Time that tests move by hand.

:class:`FakeClock` is one time line (monotonic or epoch seconds) for code that takes a
``clock`` and a ``sleep``; :class:`FakeTime` is the wall clock, the monotonic clock and the
kernel's "synchronized" flag together, for :class:`gateway.clock.TrustedClock`, the jump
detector and the agent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from gateway.clock import BUILD_FLOOR, ClockMode, TrustedClock
from gateway.store import StoreFull

__all__ = ["DAY", "NOW", "FakeClock", "FakeTime", "MemoryMeta"]

DAY = 86_400.0
#: A plausible present, well above the build floor.
NOW = BUILD_FLOOR + 30 * DAY


class FakeClock:
    """Seconds that move only when told to (thread-safe).

    Call it for the time; pass :meth:`advance` or :meth:`sleep` where the code under test
    sleeps.  A sleep of a negative time does not move the clock (as ``time.sleep`` would
    refuse it); to step the clock back, set :attr:`now`.
    """

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now
        #: Every :meth:`sleep`, in order.
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Time passes (never backwards)."""
        with self._lock:
            self.now += max(seconds, 0.0)

    def sleep(self, seconds: float) -> None:
        """A sleep: recorded in :attr:`sleeps`, and the clock moves by it."""
        with self._lock:
            self.sleeps.append(seconds)
        self.advance(seconds)


@dataclass
class FakeTime:
    """A wall clock, a monotonic clock and the kernel's "synchronized" flag."""

    wall: float = NOW
    mono: float = 1_000.0
    synced: bool = False

    def wall_now(self) -> float:
        """The wall clock (a ``time.time`` stand-in)."""
        return self.wall

    def mono_now(self) -> float:
        """The monotonic clock (a ``time.monotonic`` stand-in)."""
        return self.mono

    def synced_now(self) -> bool:
        """The kernel's flag (a :func:`gateway.clock.kernel_synchronized` stand-in)."""
        return self.synced

    def advance(self, seconds: float) -> None:
        """Time passes normally: both clocks move together."""
        self.wall += seconds
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Someone (NTP, ``date -s``, a forged NTP answer) sets the wall clock: only it
        moves."""
        self.wall += seconds

    def clock(self, mode: ClockMode = "ntp", **kwargs: Any) -> TrustedClock:
        """A trusted clock reading these clocks."""
        return TrustedClock(mode, wall=self.wall_now, mono=self.mono_now,
                            synced=self.synced_now, **kwargs)

    def clock_class(self) -> type[TrustedClock]:
        """:class:`TrustedClock` reading these clocks, for code that builds its own (the
        agent): install it with ``monkeypatch.setattr(gateway.agent, "TrustedClock", …)``."""
        fake = self

        class FakeTrustedClock(TrustedClock):
            def __init__(self, mode: ClockMode, **kwargs: Any) -> None:
                kwargs.setdefault("synced", fake.synced_now)
                super().__init__(mode, wall=fake.wall_now, mono=fake.mono_now, **kwargs)

        return FakeTrustedClock


class MemoryMeta:
    """The store's ``meta``/``set_meta`` on a dict; ``fail`` makes every write fail like a
    full disk."""

    def __init__(self, **values: str) -> None:
        self.values = dict(values)
        self.fail = False

    def meta(self, key: str) -> str | None:
        """The value under ``key``, or ``None``."""
        return self.values.get(key)

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (or fail)."""
        if self.fail:
            raise StoreFull("state database test.db: disk full while writing meta")
        self.values[key] = value
