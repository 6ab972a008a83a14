"""Time that tests move by hand, for :class:`gateway.clock.TrustedClock` and the agent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.clock import BUILD_FLOOR, TrustedClock

DAY = 86_400.0
#: A plausible present, well above the build floor.
NOW = BUILD_FLOOR + 30 * DAY


@dataclass
class FakeTime:
    """A wall clock, a monotonic clock and the kernel's "synchronized" flag."""

    wall: float = NOW
    mono: float = 1_000.0
    synced: bool = False

    def advance(self, seconds: float) -> None:
        """Time passes normally: both clocks move together."""
        self.wall += seconds
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Someone (NTP, ``date -s``, a forged NTP answer) sets the wall clock: only it
        moves."""
        self.wall += seconds

    def clock(self, mode: str = "ntp", **kwargs: Any) -> TrustedClock:
        """A trusted clock reading these clocks."""
        return TrustedClock(
            mode,  # type: ignore[arg-type]
            wall=lambda: self.wall,
            mono=lambda: self.mono,
            synced=lambda: self.synced,
            **kwargs,
        )

    def clock_class(self) -> type[TrustedClock]:
        """:class:`TrustedClock` reading these clocks, for code that builds its own (the
        agent): install it with ``monkeypatch.setattr(gateway.clock, "TrustedClock", …)``."""
        fake = self

        class FakeClock(TrustedClock):
            def __init__(self, mode: Any, **kwargs: Any) -> None:
                kwargs.setdefault("synced", lambda: fake.synced)
                super().__init__(mode, wall=lambda: fake.wall, mono=lambda: fake.mono,
                                 **kwargs)

        return FakeClock


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
            from gateway.store import StoreFull

            raise StoreFull("state database test.db: disk full while writing meta")
        self.values[key] = value
