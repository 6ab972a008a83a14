"""gateway/schedule.py: the job table, the clock-jump guards, the systemd watchdog.

Fast in-process tests with injected clocks first; then the agent as a subprocess with a
real AF_UNIX datagram socket as ``$NOTIFY_SOCKET``: READY=1, then WATCHDOG=1 at least
every WatchdogSec / 2, and no more pings once a vital part is broken on purpose (the
dev kit's fault hook: ``python -m devkit.agent --fault``, devkit/faults.py).  Wall-clock
jumps under libfaketime are in tests/gateway/clock/test_clock_jump.py.  Fault matrix rows #39 (clock
jumps) and #43 (misfires).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from devkit.mosquitto import Broker
from devkit.site import AgentProcess, make_site
from devkit.testing import FakeTime, wait_for
from gateway.schedule import (
    JOBS,
    MIN_WATCHDOG_S,
    JumpDetector,
    PoolProbe,
    SiteScheduler,
    Watchdog,
    inbound_progress,
    threads_alive,
    watchdog_period,
)
from gateway.schedule.scheduler import _IntervalTrigger
from gateway.units.executor import KeyedSerialExecutor

pytestmark = pytest.mark.timeout(60)


# ============================================================================ the table


def test_every_job_has_an_id_and_deliberate_misfire_settings() -> None:
    ids = [job.id for job in JOBS]
    assert len(ids) == len(set(ids))
    assert {"units.reconcile", "telemetry.publish", "clock.persist", "outbox.wake",
            "stora.token_refresh", "store.prune", "watchdog.heartbeat"} == set(ids)
    for job in JOBS:
        assert job.interval_s > 0
        assert job.coalesce is True, job.id  # no backlog is ever replayed as a burst
        assert job.max_instances == 1, job.id
        assert len(job.why) > 80, f"{job.id}: say why these values"
        grace = job.misfire_grace_time
        assert grace is None or (isinstance(grace, int) and grace > 0), job.id
    # The safety net is never skipped for being late.
    assert next(j for j in JOBS if j.id == "units.reconcile").misfire_grace_time is None


def test_the_scheduler_refuses_a_table_and_functions_that_do_not_match() -> None:
    jobs = {job.id: (lambda: None) for job in JOBS}
    with pytest.raises(ValueError, match="do not match"):
        SiteScheduler({**jobs, "extra.job": lambda: None})
    with pytest.raises(ValueError, match="do not match"):
        SiteScheduler({k: v for k, v in jobs.items() if k != "units.reconcile"})
    twice = (*JOBS, JOBS[0])
    with pytest.raises(ValueError, match="duplicate"):
        SiteScheduler(jobs, specs=twice)
    with pytest.raises(ValueError, match="unknown jobs"):
        SiteScheduler(jobs, intervals={"nope": 1.0})


# ==================================================================== jump detection


def test_the_jump_detector_sees_steps_and_ignores_slewing() -> None:
    clock = FakeTime(wall=1_800_000_000.0, mono=1000.0)
    detector = JumpDetector(wall=clock.wall_now, mono=clock.mono_now)
    # NTP slewing at its 500 ppm limit, read every 5 s for a day: never a jump.
    for _ in range(17_280):
        clock.advance(5.0)
        clock.step_wall(5.0 * 500e-6)
        assert detector.check() == 0.0
    clock.step_wall(86_400)  # a day forward
    assert detector.check() == pytest.approx(86_400)
    assert detector.check() == 0.0  # consumed: reported once
    clock.advance(3.0)
    clock.step_wall(-3_600)  # an hour back
    assert detector.check() == pytest.approx(-3_600)
    clock.step_wall(0.5)  # below the threshold
    assert detector.check() == 0.0
    assert detector.jumps == 2
    assert detector.last_step == pytest.approx(-3_600)


def count_run_times(trigger: IntervalTrigger, behind_s: float) -> int:
    """How many steps APScheduler's ``Job._get_run_times`` takes for a job whose next run
    time is ``behind_s`` in the past (its loop, with a safety cap)."""
    now = datetime.now(UTC)
    next_run: datetime | None = now - timedelta(seconds=behind_s)
    steps = 0
    while next_run is not None and next_run <= now and steps < 1_000_000:
        steps += 1
        next_run = trigger.get_next_fire_time(next_run, now)
    return steps


def test_a_job_far_behind_is_due_once_not_once_per_missed_interval() -> None:
    """After a forward jump APScheduler's own trigger steps through every missed interval
    (ten years of a 5 s job: 63 million steps, minutes of CPU on a Pi)."""
    ten_years = 10 * 365 * 86_400.0
    assert count_run_times(IntervalTrigger(seconds=5, timezone=UTC), 86_400) >= 17_280
    assert count_run_times(_IntervalTrigger(seconds=5, timezone=UTC), 86_400) <= 2
    started = time.process_time()
    assert count_run_times(_IntervalTrigger(seconds=5, timezone=UTC), ten_years) <= 2
    assert time.process_time() - started < 0.05
    # And on its grid: the next fire time is within one interval of now.
    trigger = _IntervalTrigger(seconds=5, timezone=UTC)
    now = datetime.now(UTC)
    nxt = trigger.get_next_fire_time(now - timedelta(seconds=ten_years), now)
    assert nxt is not None
    assert now <= nxt < now + timedelta(seconds=5)


def idle_jobs() -> dict[str, Callable[[], object]]:
    return {job.id: (lambda: None) for job in JOBS}


def test_rebase_moves_every_job_by_the_step() -> None:
    scheduler = SiteScheduler(idle_jobs(), intervals={job.id: 3600.0 for job in JOBS})
    scheduler.start()
    try:
        before = scheduler.next_run_times()
        assert scheduler.rebase(-3600.0) == len(JOBS)
        after = scheduler.next_run_times()
        for job_id, when in before.items():
            assert when is not None
            assert after[job_id] == when - timedelta(hours=1)
    finally:
        scheduler.stop()


def test_the_scheduler_loop_moves_jobs_and_calls_on_jump_when_the_wall_clock_steps() -> None:
    """The detector here reads a wall clock shifted by hand; the scheduler notices at its
    next pass (at most MAX_WAIT_S later, here sooner: a job is due every 0.1 s)."""
    offset = [0.0]
    detector = JumpDetector(wall=lambda: time.time() + offset[0])
    steps: list[float] = []
    runs = threading.Event()
    jobs = idle_jobs()
    jobs["units.reconcile"] = runs.set
    intervals = {job.id: 3600.0 for job in JOBS} | {"units.reconcile": 0.1}
    scheduler = SiteScheduler(jobs, intervals=intervals, detector=detector,
                              on_jump=steps.append)
    scheduler.start()
    try:
        assert runs.wait(5)
        offset[0] = 86_400.0
        wait_for(lambda: steps != [])
        assert steps == [pytest.approx(86_400, abs=1)]
        assert scheduler.stats()["clock_jumps"] == 1
        assert scheduler.stats()["last_jump_s"] == pytest.approx(86_400, abs=1)
        # Here only the detector's clock jumped, so the jobs it moved a day ahead are
        # a day ahead of APScheduler's clock: the second guard pulls them back in and
        # the schedule goes on (under a real jump: tests/gateway/clock/test_clock_jump.py).
        runs.clear()
        assert runs.wait(5)
    finally:
        scheduler.stop()


def test_a_job_found_more_than_an_interval_ahead_is_pulled_in() -> None:
    """The second guard: a step back that slipped past the detector (the clock stepped
    between its reading and APScheduler's) leaves jobs due an hour ahead; the next pass
    pulls every one of them in to at most one interval."""
    scheduler = SiteScheduler(idle_jobs(), intervals={job.id: 60.0 for job in JOBS})
    scheduler.start()
    try:
        later = datetime.now(UTC) + timedelta(hours=1)
        scheduler._scheduler.modify_job("clock.persist", next_run_time=later)  # wakes it
        wait_for(lambda: (when := scheduler.next_run_times()["clock.persist"]) is not None
                   and when <= datetime.now(UTC) + timedelta(seconds=61))
    finally:
        scheduler.stop()


# ============================================================ misfires and busy pools (#43)


def test_a_blocked_job_is_not_doubled_and_the_others_keep_running() -> None:
    """Fault matrix #43: a job stuck past its next run time is skipped, not run twice
    (max_instances 1); the pool still runs the other jobs; ``stalled`` says which one
    hangs; once it returns, it runs on its interval again."""
    release = threading.Event()
    entered = threading.Event()
    concurrent = [0, 0]  # now, peak
    lock = threading.Lock()

    def stuck() -> None:
        with lock:
            concurrent[0] += 1
            concurrent[1] = max(concurrent[1], concurrent[0])
        entered.set()
        release.wait(10)
        with lock:
            concurrent[0] -= 1

    jobs = idle_jobs()
    jobs["units.reconcile"] = stuck
    intervals = {job.id: 3600.0 for job in JOBS} | {"units.reconcile": 0.1,
                                                     "watchdog.heartbeat": 0.1}
    scheduler = SiteScheduler(jobs, intervals=intervals)
    scheduler.start()
    try:
        assert entered.wait(5)
        beats = scheduler.runs("watchdog.heartbeat")
        time.sleep(0.8)
        stats = scheduler.stats()["jobs"]
        assert stats["units.reconcile"]["skipped_busy"] >= 3
        assert stats["units.reconcile"]["running"] is True
        assert scheduler.runs("watchdog.heartbeat") >= beats + 3
        problem = scheduler.stalled("units.reconcile", 0.5)
        assert problem is not None
        assert "running for" in problem
        assert scheduler.stalled("watchdog.heartbeat", 0.5) is None
        release.set()
        done = scheduler.runs("units.reconcile")
        wait_for(lambda: scheduler.runs("units.reconcile") >= done + 3)
        assert concurrent[1] == 1
        assert scheduler.stalled("units.reconcile", 0.5) is None
        # Registered once per id, whatever happened.
        assert sorted(scheduler.next_run_times()) == sorted(job.id for job in JOBS)
    finally:
        release.set()
        scheduler.stop()
    assert not scheduler.running
    assert scheduler.stalled("watchdog.heartbeat", 60) == "the scheduler's thread is not running"


def test_a_failing_job_is_counted_and_runs_again() -> None:
    jobs = idle_jobs()
    jobs["units.reconcile"] = lambda: 1 / 0
    scheduler = SiteScheduler(jobs, intervals={"units.reconcile": 0.05})
    scheduler.start()
    try:
        wait_for(lambda: scheduler.runs("units.reconcile") >= 3)
        assert scheduler.stats()["jobs"]["units.reconcile"]["failures"] >= 3
    finally:
        scheduler.stop()


# =========================================================================== watchdog


def test_the_watchdog_period_comes_from_systemd_s_environment() -> None:
    assert watchdog_period({}) is None
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 30.0
    # Meant for another process (a parent that exec'd us keeps the variables).
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, pid=42) is None
    assert watchdog_period({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "1000"}) == MIN_WATCHDOG_S


def test_the_watchdog_pings_only_while_every_vital_part_is_alive() -> None:
    sent: list[str] = []
    broken: dict[str, str | None] = {"units": None}

    def explode() -> str | None:
        raise RuntimeError("cannot tell")

    dog = Watchdog(30.0, [("units", lambda: broken["units"])], sent.append)
    assert dog.interval_s == 10.0  # a third of WatchdogSec: well within half
    assert dog.tick() is True
    assert sent == ["WATCHDOG=1"]
    broken["units"] = "no worker free for 31 s"
    assert dog.tick() is False
    assert dog.tick() is False
    assert sent[1:] == ["STATUS=wedged: units: no worker free for 31 s"]
    broken["units"] = None
    assert dog.tick() is True
    assert sent[2:] == ["STATUS=running", "WATCHDOG=1"]
    dog.vitals.append(("probe", explode))
    assert dog.tick() is False  # a check that cannot tell is not "alive"
    assert "probe: check failed: RuntimeError" in sent[-1]
    assert (dog.pings, dog.withheld) == (2, 3)


def test_the_unit_pool_probe_fails_when_every_worker_is_stuck() -> None:
    executor = KeyedSerialExecutor(2, name="probe-test")
    now = [0.0]
    probe = PoolProbe(lambda fn: executor.submit("~probe", fn), stale_s=30.0,
                      mono=lambda: now[0])
    release = threading.Event()
    try:
        probe.probe()
        wait_for(lambda: probe.check() is None and probe._pending is not None
                   and probe._pending.done())
        for key in ("a", "b"):  # both workers held
            executor.submit(key, release.wait)
        time.sleep(0.05)
        probe.probe()
        now[0] = 29.0
        assert probe.check() is None
        now[0] = 31.0
        assert probe.check() == "no worker free for 31 s (all stuck?)"
        probe.probe()  # still waiting: no second probe queued
        assert executor.pending() == 1
        release.set()
        wait_for(lambda: probe.check() is None)
    finally:
        release.set()
        executor.shutdown()


def test_inbound_progress_and_thread_checks() -> None:
    now = [0.0]
    stats = {"handled": 5, "handler_errors": 0, "inbound_queued": 0}
    check = inbound_progress(lambda: stats, 30.0, mono=lambda: now[0])
    assert check() is None
    stats["inbound_queued"] = 3  # waiting, nothing handled...
    now[0] = 20.0
    assert check() is None
    now[0] = 51.0
    assert check() == "3 message(s) waiting and none handled for 51 s"
    stats["handled"] = 6  # progress
    assert check() is None
    stats["inbound_queued"] = 0
    now[0] = 500.0
    assert check() is None  # idle is not stuck

    done = threading.Thread(target=lambda: None, name="gone")
    done.start()
    done.join()
    assert threads_alive(lambda: [threading.current_thread()])() is None
    assert threads_alive(lambda: [done])() == "thread(s) gone ended"
    assert threads_alive(list)() == "not started"


# ================================================= the agent, systemd's notify socket


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, path
    finally:
        sock.close()


def receive(sock: socket.socket, until: float,
            stop: Callable[[str], bool] = lambda message: False) -> list[tuple[float, str]]:
    """Messages with the monotonic time they arrived, until ``until`` or one that
    ``stop`` accepts."""
    got = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        got.append((time.monotonic(), data.decode()))
        if stop(got[-1][1]):
            break
    return got


WATCHDOG_S = 2.0


@pytest.mark.parametrize(("fault", "part"), [("wedge-units", "unit workers"),
                                             ("stop-link", "mqtt link")])
def test_the_agent_pings_systemd_while_alive_and_stops_when_a_vital_part_breaks(
        tmp_path: Path, notify_socket: tuple[socket.socket, Path],
        monkeypatch: pytest.MonkeyPatch, fault: str, part: str) -> None:
    sock, path = notify_socket
    fault_after_s = 2.0
    with Broker(tmp_path / "broker") as broker:
        # Only now: mosquitto, built with systemd support, would say READY=1 too.
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        site = make_site(tmp_path, broker)
        agent = AgentProcess(site, fault=f"{fault}@{fault_after_s}")
        try:
            started = time.monotonic()
            agent.start(wait=False)
            # Healthy until the fault, wedged after it (within a third of the period to
            # ping plus one period to call a part stale); then silence for longer than
            # WatchdogSec, after which systemd would kill it.
            messages = receive(sock, started + fault_after_s + 5 * WATCHDOG_S,
                               stop=lambda m: m.startswith("STATUS=wedged"))
            messages += receive(sock, time.monotonic() + 1.25 * WATCHDOG_S)
            texts = [m for _, m in messages]
            assert texts, agent.log()
            assert texts[0] == "READY=1", agent.log()
            wedged = [t for t, m in messages if m.startswith("STATUS=wedged")]
            assert wedged, (texts, agent.log())
            assert part in next(m for m in texts if m.startswith("STATUS=wedged"))
            pings = [t for t, m in messages if m == "WATCHDOG=1"]
            before = [t for t in pings if t < wedged[0]]
            after = [t for t in pings if t > wedged[0]]
            assert len(before) >= 3, texts
            gaps = [b - a for a, b in itertools.pairwise(before)]
            assert max(gaps) <= WATCHDOG_S / 2, gaps
            assert after == []
            # systemd would have killed it: silence for more than WatchdogSec.
            assert time.monotonic() - wedged[0] > WATCHDOG_S
            print(f"\n{fault}: {len(before)} pings, largest gap {max(gaps):.2f} s; wedged "
                  f"{wedged[0] - started:.1f} s after start (fault at {fault_after_s} s); "
                  "then none")
        finally:
            code = agent.stop()
            site.close()
        assert code == 0, agent.log()
        assert f"TEST FAULT {fault} injected" in agent.log()


def test_without_watchdog_usec_the_agent_only_says_ready(
        tmp_path: Path, notify_socket: tuple[socket.socket, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    with Broker(tmp_path / "broker") as broker:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # after mosquitto's start (above)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        site = make_site(tmp_path, broker)
        agent = AgentProcess(site)
        try:
            agent.start()
            messages = [m for _, m in receive(sock, time.monotonic() + 1.0)]
        finally:
            code = agent.stop()
            site.close()
        messages += [m for _, m in receive(sock, time.monotonic() + 0.2)]
    assert code == 0
    assert messages == ["READY=1", "STOPPING=1"], agent.log()

