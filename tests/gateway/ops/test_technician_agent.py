"""Technician actions through a running agent (a real subprocess, a real Mosquitto, the
simulators on ptys), and Ctrl-C on the real CLI in both modes (issue 12 item 5).

The doors are watched on the simulators themselves (:mod:`tests.support.sampler`), so
"no lock is unlocked after the interrupt" is about the hardware, not the report.
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import Callable, Iterator

import pytest

from devkit.site import LOCKBOARD_UNITS, MODBUS_UNITS, PREFIX, AgentProcess, SimSite
from devkit.testing import returns_within, wait_for
from gateway.cli.main import main
from tests.support.cli_process import CliProcess
from tests.support.sampler import Sampler

pytestmark = pytest.mark.simulator_only

#: Seconds each lock is held in these tests: long enough to press Ctrl-C in the middle
#: of the second lock's hold, short enough for a quick suite.
HOLD_S = 2.0
#: After the CLI has exited, how long the doors are still watched: an agent that went
#: on testing would open the next lock within milliseconds of relocking the last one.
AFTER_S = 2.5


@pytest.fixture
def agent(site: SimSite) -> Iterator[AgentProcess]:
    process = AgentProcess(site)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def doors(site: SimSite) -> dict[str, Callable[[], bool]]:
    """Every lock of the site: is it physically unlocked now?"""
    board = site.modbus.board(1)
    probes: dict[str, Callable[[], bool]] = {
        ref: functools.partial(board.coil, ch) for ref, ch, _ in MODBUS_UNITS.values()}
    for ref, ch in LOCKBOARD_UNITS.values():
        probes[ref] = functools.partial(site.lockers.sim.is_unlocked, 0, ch + 1)
    return probes


def run(site: SimSite, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([*argv, "--config", str(site.config_path)], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def interrupt_test_all(site: SimSite) -> tuple[int, str, str, Sampler, float]:
    """`test --all` as a subprocess, Ctrl-C in the middle of the second lock's hold;
    the exit status, stdout, stderr, the door watch and when the interrupt was sent."""
    with Sampler(doors(site)) as watch, CliProcess(
            "test", "--all", "--seconds", str(HOLD_S), "--config", str(site.config_path),
    ) as proc:
        wait_for(lambda: watch.on_now("A-102"), 30, "the second lock is unlocked")
        time.sleep(HOLD_S / 4)  # well inside its hold
        interrupted_at = time.monotonic()
        code = proc.interrupt(timeout=30)  # a real Ctrl-C: SIGINT to the CLI's process
        time.sleep(AFTER_S)
    return code, "\n".join(proc.lines) + "\n", proc.stderr, watch, interrupted_at


def check_interrupted(code: int, out: str, err: str, watch: Sampler,
                      interrupted_at: float) -> None:
    assert code == 130, (out, err)
    # Nothing was opened after the interrupt, and the lock under test was relocked.
    assert watch.opened_after(interrupted_at) == []
    (a102,) = watch.intervals("A-102")
    assert a102.off_at is not None
    assert a102.at_least_s < HOLD_S  # cut short, not held out
    assert not any(watch.on_now(name) for name in doors_names())
    # What ran and what was cancelled, in the table and as progress.
    rows = {line.split()[1]: line for line in out.splitlines()
            if line.startswith("unit_")}
    assert "PASS" in rows["A-101"]
    assert "FAIL" in rows["A-102"]
    assert "interrupted" in rows["A-102"]
    for ref in ("A-103", "B-201", "B-202"):
        assert "cancelled" in rows[ref]
    assert "1 passed, 1 failed, 3 cancelled (interrupted" in out
    assert "[1/5] A-101 (unit_a101): PASS" in err
    assert "[5/5] B-202 (unit_b202): cancelled, not started" in err


def doors_names() -> list[str]:
    return [ref for ref, _, _ in MODBUS_UNITS.values()] + \
        [ref for ref, _ in LOCKBOARD_UNITS.values()]


def test_ctrl_c_on_test_all_through_the_agent_opens_no_more_doors(
    site: SimSite, agent: AgentProcess,
) -> None:
    """Found in the field: Ctrl-C on `test --all` left the agent opening more doors."""
    code, out, err, watch, at = interrupt_test_all(site)
    check_interrupted(code, out, err, watch, at)
    assert "cancelled before they started (A-103, B-201, B-202)" in agent.log()


def test_ctrl_c_on_test_all_in_direct_mode_opens_no_more_doors(site: SimSite) -> None:
    code, out, err, watch, at = interrupt_test_all(site)
    check_interrupted(code, out, err, watch, at)


def test_test_through_the_agent_holds_the_coil_and_shows_progress(
    site: SimSite, agent: AgentProcess,
) -> None:
    board = site.modbus.board(1)
    with Sampler({"A-101": lambda: board.coil(0)}) as watch:
        status, out, err = run(site, "test", "A-101", "A-102", "--seconds", "2")
    assert status == 0, out + err
    (held,) = watch.intervals("A-101")
    assert held.at_least_s >= 2.0
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert progress[0].startswith("[1/2] A-101 (unit_a101): PASS — held 2.0 s")
    assert progress[1].startswith("[2/2] A-102 (unit_a102): PASS")
    assert "2 passed, 0 failed" in out


def test_scan_with_the_agent_running_lists_the_board(
    site: SimSite, agent: AgentProcess,
) -> None:
    status, out, err = run(site, "scan", "bus1", "--addresses", "1-3")
    assert status == 0, err
    assert "Modbus relay board" in out
    assert err.splitlines()[0] == "[1/3] address 1: Modbus relay board"
    status, out, _ = run(site, "scan", "lockers", "--addresses", "0-1", "--json")
    assert status == 0
    report = json.loads(out)
    assert report["through_agent"] is True
    assert [f["address"] for f in report["found"]] == [0]
    # The agent kept its port and its doors all along.
    status, out, _ = run(site, "locks", "--json")
    assert status == 0
    assert all(r["error"] is None for r in json.loads(out))


def test_an_unknown_unit_through_the_agent_lists_near_matches(
    site: SimSite, agent: AgentProcess,
) -> None:
    status, out, err = run(site, "lock", "a102")
    assert (status, out) == (2, "")
    assert "did you mean A-102 (unit_a102)" in err


def test_stopping_the_agent_stops_a_remote_locks_test_and_leaves_every_door_locked(
    site: SimSite, agent: AgentProcess,
) -> None:
    """Found in review: a ``locks.test`` management request runs on a call no client can
    cancel, so SIGTERM waited out every lock's hold (30 s each here, 5 locks) past
    systemd's stop timeout, whose SIGKILL would leave a relay energized.  Now the lock
    under test is relocked at once, no other is opened, and the request is answered."""
    client = site.client()
    client.subscribe(f"{PREFIX}/mgmt/result")
    jti, token = site.signer.command("locks.test", args={"all": True, "seconds": 30})
    with Sampler(doors(site)) as watch:
        client.publish(f"{PREFIX}/mgmt", token, qos=1)
        wait_for(lambda: watch.on_now("A-101"), 30, "the first lock is unlocked")
        stopping_at = time.monotonic()
        # SIGTERM, as systemd sends it; back well before the 30 s hold, let alone five.
        code = returns_within(15, agent.stop, "the agent's stop")
        time.sleep(AFTER_S)
    assert code == 0, agent.log()
    assert watch.opened_after(stopping_at) == []
    (a101,) = watch.intervals("A-101")
    assert a101.off_at is not None
    assert a101.off_at - stopping_at < 15  # relocked at the stop, not after the 30 s hold
    assert not any(watch.on_now(name) for name in doors_names())
    assert "interrupted (the agent is stopping)" in agent.log()
    answers = [json.loads(m.payload) for m in client.messages(f"{PREFIX}/mgmt/result")]
    (report,) = [a["result"] for a in answers if a.get("jti") == jti]
    assert report["interrupted"] is True
    assert [r["reference"] for r in report["results"]] == ["A-101"]
    assert [c["reference"] for c in report["cancelled"]] == ["A-102", "A-103", "B-201",
                                                            "B-202"]
