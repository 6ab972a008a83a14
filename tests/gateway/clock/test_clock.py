"""The trusted-clock rule (gateway/clock.py), with injected wall, monotonic and sync probes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devkit.testing import DAY, NOW, FakeTime, MemoryMeta
from gateway.clock import (
    BUILD_FLOOR,
    FLOOR_KEY,
    FLOOR_MARGIN_S,
    JUMP_THRESHOLD_S,
    PROVEN_KEY,
    RESET_NOTE_KEY,
    SERVER_TIME_TOLERANCE_S,
    STEP_ALARM_S,
    ClockMode,
    TrustedClock,
    kernel_synchronized,
    reset_stored_floor,
    rfc3339,
    stored_floor,
)


@pytest.fixture
def t() -> FakeTime:
    return FakeTime()


# -- the floor ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ntp", "system"])
def test_boot_at_1970_is_untrusted_even_when_synced(t: FakeTime, mode: ClockMode) -> None:
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
    assert set(status) == {"mode", "trusted", "why", "now", "floor", "proven", "synced",
                           "jump"}
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


# -- the bounded floor (issue 11 item 7) ------------------------------------------------------


class Alarms(list[tuple[str, str]]):
    """Collects the clock's alarms."""

    def __call__(self, kind: str, detail: str) -> None:
        self.append((kind, detail))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self]


def loaded(t: FakeTime, store: MemoryMeta, mode: ClockMode = "ntp") -> tuple[TrustedClock, Alarms]:
    alarms = Alarms()
    clock = t.clock(mode, alarm=alarms)
    alarms.extend(clock.load_floor(store))
    return clock, alarms


def test_saved_floor_is_the_wall_time_bounded_by_the_proven_time(t: FakeTime) -> None:
    store = MemoryMeta()
    t.synced = True
    t.wall = BUILD_FLOOR + 2 * FLOOR_MARGIN_S  # installed soon after the build
    clock, _ = loaded(t, store)
    clock.save_floor()
    assert float(store.values[PROVEN_KEY]) == BUILD_FLOOR
    assert float(store.values[FLOOR_KEY]) == BUILD_FLOOR + FLOOR_MARGIN_S
    t.advance(3 * FLOOR_MARGIN_S)
    clock.save_floor()
    assert float(store.values[PROVEN_KEY]) == BUILD_FLOOR + 3 * FLOOR_MARGIN_S
    assert float(store.values[FLOOR_KEY]) == BUILD_FLOOR + 4 * FLOOR_MARGIN_S
    # NTP steps the clock back (it ran ahead): within the bound, saved as it reads.
    t.step_wall(-2.5 * FLOOR_MARGIN_S)
    clock.save_floor()
    assert float(store.values[FLOOR_KEY]) == t.wall
    assert clock.proven() == BUILD_FLOOR + 3 * FLOOR_MARGIN_S


def test_untrusted_saves_the_proven_time_but_not_the_floor(t: FakeTime) -> None:
    store = MemoryMeta()
    clock, _ = loaded(t, store)  # ntp mode, kernel unsynchronized
    t.advance(100)
    clock.save_floor()
    assert float(store.values[PROVEN_KEY]) == BUILD_FLOOR + 100
    assert FLOOR_KEY not in store.values


def test_a_floor_within_the_margin_is_kept_and_one_beyond_it_dropped(t: FakeTime) -> None:
    proven = BUILD_FLOOR + 10 * DAY
    kept, alarms = loaded(t, MemoryMeta(**{PROVEN_KEY: repr(proven),
                                           FLOOR_KEY: repr(proven + FLOOR_MARGIN_S)}))
    assert kept.floor == proven + FLOOR_MARGIN_S
    assert alarms == []
    store = MemoryMeta(**{PROVEN_KEY: repr(proven), FLOOR_KEY: repr(proven + FLOOR_MARGIN_S + 1)})
    dropped, alarms = loaded(t, store)
    assert dropped.floor == proven
    assert alarms.kinds() == ["clock_floor_invalid"]
    assert float(store.values[FLOOR_KEY]) == proven  # rewritten, so said once


@pytest.mark.parametrize("proven", ["garbage", "nan", "-1", "1e999"])
def test_an_unreadable_proven_time_counts_from_the_build_floor(t: FakeTime, proven: str) -> None:
    clock, alarms = loaded(t, MemoryMeta(**{PROVEN_KEY: proven}))
    assert clock.proven() == BUILD_FLOOR
    assert clock.floor == BUILD_FLOOR
    assert alarms == []


def test_an_older_build_floor_in_the_store_is_overtaken_by_this_release(t: FakeTime) -> None:
    clock, _ = loaded(t, MemoryMeta(**{PROVEN_KEY: repr(BUILD_FLOOR - 100 * DAY)}))
    assert clock.proven() == BUILD_FLOOR


def test_a_store_that_cannot_be_read_is_not_fatal(t: FakeTime) -> None:
    class Broken(MemoryMeta):
        def meta(self, key: str) -> str | None:
            from gateway.store import StoreError

            raise StoreError("state database x.db: disk I/O error while reading meta")

    clock, alarms = loaded(t, Broken())
    assert clock.floor == BUILD_FLOOR
    assert alarms == []


def test_a_large_step_forward_of_a_trusted_clock_is_one_alarm(t: FakeTime) -> None:
    t.synced = True
    clock, alarms = loaded(t, MemoryMeta())
    assert clock.trusted() == (True, "")
    t.step_wall(STEP_ALARM_S - 1)  # large, but below the alarm
    clock.now()
    t.step_wall(-3_600.0)  # back: the floor's business, not this alarm's
    clock.now()
    assert alarms == []
    t.step_wall(10 * 365 * DAY)  # NTP says so and the kernel stays synchronized
    assert clock.trusted() == (True, "")
    clock.now()
    t.advance(1)
    clock.trusted()
    [(kind, detail)] = alarms
    assert kind == "clock_step"
    assert "forward by 3650 days" in detail
    assert "(synchronized)" in detail


def test_the_first_sync_after_boot_is_not_a_step_alarm(t: FakeTime) -> None:
    # Booted with the time fake-hwclock saved a week ago; NTP then steps it forward.
    t.wall = NOW - 7 * DAY
    clock, alarms = loaded(t, MemoryMeta())
    assert clock.trusted()[0] is False
    t.step_wall(7 * DAY)
    t.synced = True
    assert clock.trusted() == (True, "")
    assert alarms == []


def test_a_failing_alarm_callback_does_not_break_the_clock(t: FakeTime) -> None:
    def broken(kind: str, detail: str) -> None:
        raise RuntimeError("broker gone")

    clock = t.clock("system", alarm=broken)
    clock.trusted()
    t.step_wall(2 * STEP_ALARM_S)
    assert clock.trusted() == (True, "")


def behind_floor(t: FakeTime, by: float = 300.0) -> tuple[TrustedClock, Alarms, MemoryMeta]:
    """A clock whose wall reads ``by`` seconds before a valid saved floor."""
    floor = NOW + by
    store = MemoryMeta(**{PROVEN_KEY: repr(NOW - 100), FLOOR_KEY: repr(floor)})
    t.synced = True
    clock, alarms = loaded(t, store)
    assert clock.floor == floor
    assert clock.below_floor()
    return clock, alarms, store


def test_a_server_date_that_agrees_lowers_the_floor(t: FakeTime) -> None:
    clock, alarms, store = behind_floor(t)
    assert clock.trusted()[0] is False
    clock.observe_server_time(t.wall + SERVER_TIME_TOLERANCE_S - 1)
    assert clock.floor == t.wall
    assert float(store.values[FLOOR_KEY]) == t.wall
    assert clock.trusted() == (True, "")
    assert alarms.kinds() == ["clock_floor_lowered"]
    assert "a server's Date" in alarms[0][1]
    # Nothing left to correct: later dates change nothing.
    clock.observe_server_time(t.wall - 60)
    assert alarms.kinds() == ["clock_floor_lowered"]


@pytest.mark.parametrize("server", [NOW + SERVER_TIME_TOLERANCE_S + 1, NOW + 300,
                                    float("nan"), float("inf"), "garbage", None])
def test_a_server_date_that_disagrees_or_is_junk_changes_nothing(t: FakeTime,
                                                                  server: object) -> None:
    clock, alarms, store = behind_floor(t)
    before = dict(store.values)
    clock.observe_server_time(server)  # type: ignore[arg-type]
    assert clock.floor == NOW + 300
    assert store.values == before
    assert alarms == []


def test_a_server_date_never_lowers_the_floor_below_the_proven_time(t: FakeTime) -> None:
    # The box has run for longer than the wall clock admits: the proven time is later.
    t.synced = True
    store = MemoryMeta(**{PROVEN_KEY: repr(NOW + 100), FLOOR_KEY: repr(NOW + 200)})
    clock, alarms = loaded(t, store)
    clock.observe_server_time(t.wall)
    assert clock.floor == NOW + 200
    assert alarms == []
    t.step_wall(150)  # NTP moves the wall clock past the proven time, not the floor
    clock.observe_server_time(t.wall)
    assert clock.floor == t.wall
    assert clock.trusted() == (True, "")


def test_only_the_floor_is_corrected_never_the_sync_rule(t: FakeTime) -> None:
    clock, _, _ = behind_floor(t)
    t.synced = False
    clock.observe_server_time(t.wall)
    ok, why = clock.trusted()
    assert not ok
    assert "waiting for NTP synchronization" in why


def test_reset_floor_goes_back_to_the_build_floor_saved_and_alarmed(t: FakeTime) -> None:
    clock, alarms, store = behind_floor(t)
    result = clock.reset_floor("technician alice (uid 1000)\nforged line")
    assert clock.floor == BUILD_FLOOR
    assert float(store.values[FLOOR_KEY]) == BUILD_FLOOR
    assert result["saved"] is True
    assert result["previous"] == rfc3339(NOW + 300, timespec="seconds")
    assert result["clock"]["trusted"] is True
    [(kind, detail)] = alarms
    assert kind == "clock_floor_reset"
    assert "by technician alice (uid 1000)\\nforged line" in detail  # escaped, one line


def test_reset_floor_that_cannot_be_saved_says_so(t: FakeTime) -> None:
    clock, alarms, store = behind_floor(t)
    store.fail = True
    result = clock.reset_floor("relay")
    assert result["saved"] is False
    assert clock.trusted() == (True, "")  # for this run at least
    assert "could not be saved" in alarms[0][1]


def test_reset_on_the_database_is_reported_at_the_next_start(t: FakeTime) -> None:
    store = MemoryMeta(**{PROVEN_KEY: repr(NOW + DAY), FLOOR_KEY: repr(NOW + DAY)})
    shown = stored_floor(store, now=t.wall)
    assert shown["floor_ok"] is False
    assert shown["stored_floor_invalid"] is None
    done = reset_stored_floor(store, "technician bob (uid 1001)", now=t.wall)
    assert done["floor"] == rfc3339(BUILD_FLOOR, timespec="seconds")
    assert stored_floor(store, now=t.wall)["reset_pending"] is True
    clock, alarms = loaded(t, store)
    assert clock.floor == BUILD_FLOOR
    [(kind, detail)] = alarms
    assert kind == "clock_floor_reset"
    assert "by technician bob (uid 1001)" in detail
    assert "while the agent was stopped" in detail
    assert store.values[RESET_NOTE_KEY] == ""  # reported once
    assert loaded(t, store)[1] == []


def test_stored_floor_without_a_database(t: FakeTime) -> None:
    shown = stored_floor(None, now=t.wall)
    assert shown["floor"] == rfc3339(BUILD_FLOOR, timespec="seconds")
    assert shown["floor_ok"] is True


# -- found in review: the proven time must follow a confirmed clock -------------------------


def test_a_server_date_confirming_a_trusted_clock_lets_the_floor_follow_the_real_time(
        t: FakeTime) -> None:
    """Installed 30 days after its build, the box's run time alone proves only the build
    date: the floor would trail the real time by a month (or by every day the box was
    off), guarding against almost no step back.  An HTTPS Date that agrees with the
    trusted wall clock moves the proven time, and with it the saved floor, up to now."""
    store = MemoryMeta()
    t.synced = True
    clock, alarms = loaded(t, store)
    clock.save_floor()
    assert float(store.values[FLOOR_KEY]) == pytest.approx(BUILD_FLOOR + FLOOR_MARGIN_S)
    clock.observe_server_time(t.wall + 1)
    t.advance(60)
    clock.save_floor()
    assert float(store.values[FLOOR_KEY]) == t.wall
    assert float(store.values[PROVEN_KEY]) == pytest.approx(t.wall, abs=1)
    assert alarms == []
    # So a step back of a day, trusted by a forged NTP, is now refused by the floor.
    t.step_wall(-DAY)
    restarted, _ = loaded(t, store)
    assert restarted.trusted()[0] is False


def test_a_forged_step_forward_is_not_confirmed_by_the_server(t: FakeTime) -> None:
    store = MemoryMeta()
    t.synced = True
    clock, _ = loaded(t, store)
    clock.trusted()
    real = t.wall
    t.step_wall(3650 * DAY)  # forged NTP, "synchronized"
    clock.observe_server_time(real)  # Stora says otherwise
    assert clock.proven() < real
    clock.save_floor()
    assert float(store.values[FLOOR_KEY]) < real


def test_a_floor_from_an_earlier_version_that_the_clock_has_passed_is_kept_quietly(
        t: FakeTime) -> None:
    """Found in review: every upgraded site got a "forged clock step" alarm and lost its
    floor, because earlier versions saved no proven time beside it."""
    store = MemoryMeta(**{FLOOR_KEY: repr(t.wall - 120)})  # the last run's, no proven time
    t.synced = True
    clock, alarms = loaded(t, store)
    assert alarms == []
    assert clock.floor == t.wall - 120
    assert clock.proven() >= t.wall - 120
    # One still ahead of the wall clock is judged as before: dropped, with the alarm.
    ahead = MemoryMeta(**{FLOOR_KEY: repr(t.wall + 3650 * DAY)})
    _, alarms = loaded(t, ahead)
    assert alarms.kinds() == ["clock_floor_invalid"]
