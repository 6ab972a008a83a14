"""The trusted-clock rule (gateway/clock.py), with injected wall, monotonic and sync probes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.clock import (
    BUILD_FLOOR,
    JUMP_THRESHOLD_S,
    TrustedClock,
    kernel_synchronized,
    rfc3339,
)

DAY = 86_400.0
NOW = BUILD_FLOOR + 30 * DAY  # a plausible present, well above the build floor


@dataclass
class FakeTime:
    """A wall clock and a monotonic clock that tests move by hand."""

    wall: float = NOW
    mono: float = 1_000.0
    synced: bool = False

    def advance(self, seconds: float) -> None:
        """Time passes normally: both clocks move together."""
        self.wall += seconds
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Someone sets the wall clock: only it moves."""
        self.wall += seconds

    def clock(self, mode: str = "ntp", **kwargs: float) -> TrustedClock:
        return TrustedClock(
            mode,  # type: ignore[arg-type]
            wall=lambda: self.wall,
            mono=lambda: self.mono,
            synced=lambda: self.synced,
            **kwargs,
        )


@pytest.fixture
def t() -> FakeTime:
    return FakeTime()


# -- the floor ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ntp", "system"])
def test_boot_at_1970_is_untrusted_even_when_synced(t: FakeTime, mode: str) -> None:
    t.wall = 12.0  # a Pi without RTC, seconds after boot
    t.synced = True
    ok, why = t.clock(mode).trusted()
    assert not ok
    assert "1970-01-01T00:00:12Z" in why
    assert "before the last time known good" in why


def test_build_floor_is_a_sane_release_date() -> None:
    assert rfc3339(BUILD_FLOOR) == "2026-11-01T00:00:00.000Z"


def test_persisted_time_raises_the_floor(t: FakeTime) -> None:
    t.synced = True
    clock = t.clock("ntp")
    assert clock.trusted() == (True, "")
    # The last trusted time saved before a shutdown: the box was off for a week and booted
    # with the fake-hwclock time, i.e. a week behind reality, but NTP is not yet involved.
    last_good = NOW + 10.0
    clock.raise_floor(last_good)
    assert clock.floor == last_good
    ok, why = clock.trusted()
    assert not ok
    assert str(rfc3339(last_good, timespec="seconds")) in why
    t.advance(11.0)
    assert clock.trusted() == (True, "")


def test_raise_floor_never_lowers_and_ignores_nan(t: FakeTime) -> None:
    clock = t.clock("system")
    clock.raise_floor(BUILD_FLOOR - DAY)
    clock.raise_floor(float("nan"))
    assert clock.floor == BUILD_FLOOR


def test_floor_boundary_is_inclusive(t: FakeTime) -> None:
    t.wall = BUILD_FLOOR
    assert t.clock("system").trusted() == (True, "")
    t.wall = BUILD_FLOOR - 0.001
    assert t.clock("system").trusted()[0] is False


# -- modes ------------------------------------------------------------------------------------


def test_ntp_mode_waits_for_sync(t: FakeTime) -> None:
    clock = t.clock("ntp")
    ok, why = clock.trusted()
    assert not ok
    assert "waiting for NTP synchronization" in why
    t.synced = True
    assert clock.trusted() == (True, "")
    t.synced = False  # the daemon lost its servers long enough for the kernel to say so
    assert clock.trusted()[0] is False


def test_system_mode_trusts_the_clock_above_the_floor(t: FakeTime) -> None:
    clock = t.clock("system")
    assert clock.trusted() == (True, "")
    assert clock.status()["synced"] is False  # reported, but not required


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'ntp' or 'system'"):
        TrustedClock("gps")  # type: ignore[arg-type]


def test_a_failing_sync_probe_means_unsynchronized(t: FakeTime) -> None:
    def broken() -> bool:
        raise OSError("adjtimex not permitted")

    clock = TrustedClock("ntp", wall=lambda: t.wall, mono=lambda: t.mono, synced=broken)
    assert clock.trusted()[0] is False


# -- jumps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "shown"), [(-3_600.0, "-3600 s"), (DAY, "+86400 s")], ids=["back-1h", "forward-1d"]
)
def test_jump_without_sync_is_untrusted_until_synced_again(
    t: FakeTime, step: float, shown: str
) -> None:
    t.synced = True
    clock = t.clock("ntp")
    assert clock.trusted() == (True, "")
    t.advance(1.0)
    clock.now()
    # `date -s`: the kernel marks itself unsynchronized and the wall clock moves alone.
    t.synced = False
    t.step_wall(step)
    clock.now()  # the jump is noticed on any reading, not only by trusted()
    ok, why = clock.trusted()
    assert not ok
    assert f"jumped by {shown}" in why
    assert "waiting for NTP synchronization to confirm it" in why
    assert clock.status()["jump"] is not None
    t.advance(5.0)
    assert clock.trusted()[0] is False  # still waiting
    t.synced = True
    assert clock.trusted() == (True, "")
    assert clock.status()["jump"] is None


def test_ntp_step_while_synchronized_is_accepted(t: FakeTime) -> None:
    t.synced = True
    clock = t.clock("ntp")
    clock.trusted()
    t.step_wall(-40.0)  # the daemon stepped the clock; the kernel stays synchronized
    assert clock.trusted() == (True, "")
    assert clock.status()["jump"] is None


def test_slewing_and_small_steps_are_not_jumps(t: FakeTime) -> None:
    t.synced = True
    clock = t.clock("ntp")
    clock.trusted()
    for _ in range(100):
        t.advance(1.0)
        t.step_wall(0.0005)  # 500 ppm, NTP's maximum slew
        clock.now()
    t.synced = False
    t.step_wall(JUMP_THRESHOLD_S - 0.1)
    clock.now()
    assert clock.status()["jump"] is None


def test_system_mode_reports_a_jump_but_only_the_floor_decides(t: FakeTime) -> None:
    clock = t.clock("system")
    assert clock.trusted() == (True, "")
    t.step_wall(-3_600.0)
    assert clock.trusted() == (True, "")
    assert "jumped by -3600 s" in clock.status()["jump"]
    t.step_wall(-(NOW - BUILD_FLOOR))  # now a month and an hour back: below the floor
    assert clock.trusted()[0] is False


def test_the_first_reading_is_never_a_jump(t: FakeTime) -> None:
    t.mono = 5.0  # just booted
    t.synced = True
    assert t.clock("ntp").trusted() == (True, "")


# -- status and helpers ---------------------------------------------------------------------


def test_status_shape(t: FakeTime) -> None:
    status = t.clock("ntp").status()
    assert set(status) == {"mode", "trusted", "why", "now", "floor", "synced", "jump"}
    assert status["mode"] == "ntp"
    assert status["trusted"] is False
    assert status["why"].startswith("waiting for NTP")
    assert status["now"] == rfc3339(NOW, timespec="seconds")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["floor"])
    assert status["synced"] is False
    assert status["jump"] is None


def test_status_survives_an_absurd_wall_clock() -> None:
    clock = TrustedClock("system", wall=lambda: 1e300, mono=lambda: 0.0, synced=lambda: False)
    assert clock.status()["now"] == "1e+300"


def test_rfc3339() -> None:
    assert rfc3339(None) is None
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(BUILD_FLOOR + 1.5, timespec="seconds") == "2026-11-01T00:00:01Z"
    assert rfc3339(float("nan")) == "nan"


def test_kernel_synchronized_returns_a_bool_here() -> None:
    # This machine's kernel reports TIME_ERROR (no NTP daemon); any box gives a bool.
    assert isinstance(kernel_synchronized(), bool)


def test_kernel_synchronized_reads_adjtimex(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    flag.touch()  # present, but adjtimex answers and is authoritative
    assert kernel_synchronized(lambda: (0, 0), str(flag)) is True  # TIME_OK
    assert kernel_synchronized(lambda: (5, 0), str(flag)) is False  # TIME_ERROR
    assert kernel_synchronized(lambda: (0, 0x0040), str(flag)) is False  # STA_UNSYNC


def test_kernel_synchronized_falls_back_to_the_timesyncd_flag(tmp_path: Path) -> None:
    def unavailable() -> tuple[int, int]:
        raise OSError(1, "Operation not permitted")

    flag = tmp_path / "synchronized"
    assert kernel_synchronized(unavailable, str(flag)) is False
    flag.touch()
    assert kernel_synchronized(unavailable, str(flag)) is True
