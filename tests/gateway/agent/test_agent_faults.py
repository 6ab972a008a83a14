"""The agent as a real process, under kill -9, restarts, and a dying or frozen broker.

Invariants, not "did not crash": a command is actuated at most once however often it
is delivered and whenever the agent dies; no door stays unlocked longer than its
``dur`` plus a stated tolerance once the agent is back; the agent reconnects by itself
and carries on.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.site import MODBUS_UNITS, PREFIX, AgentProcess, SimSite
from drivers.lockboard.frames import OpenRequest
from drivers.modbus.frames import COIL_ON

pytestmark = pytest.mark.simulator_only

#: After the agent is back, how long a door that should be locked may stay unlocked:
#: start-up schedules the recorded relock at once; the bus needs a few ms; 1.5 s leaves
#: room for a loaded CI machine.
RELOCK_TOLERANCE_S = 1.5


@pytest.fixture
def broker_options() -> dict[str, Any]:
    """The shared ``broker`` fixture, with persistence (restarts keep sessions)."""
    return {"persistence": True}


@pytest.fixture
def agent(site: SimSite) -> Iterator[AgentProcess]:
    proc = AgentProcess(site)
    try:
        yield proc
    finally:
        proc.kill()


def results_for(client: Client, jti: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in client.messages(f"{PREFIX}/cmd/result")
            if json.loads(m.payload).get("jti") == jti]


def assert_done(site: SimSite, client: Client, cmd: str, unit: str) -> None:
    """Send one signed command through ``client``: its result must come within 10 s, done."""
    jti, token = site.signer.command(cmd, unit)
    client.publish(f"{PREFIX}/cmd", token)
    [res] = client.expect(f"{PREFIX}/cmd/result", 10,
                          where=lambda m: json.loads(m.payload)["jti"] == jti)
    assert json.loads(res.payload)["status"] == "done"


def wait_results(clients: list[Client], jti: str, count: int, timeout: float = 10) -> list[
        dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [r for c in clients for r in results_for(c, jti)]
        if len(got) >= count:
            return got
        time.sleep(0.02)
    raise AssertionError(f"expected {count} results for {jti}, got "
                         f"{[r for c in clients for r in results_for(c, jti)]}")


def test_one_command_five_deliveries_around_restarts_one_actuation(
        site: SimSite, broker: Broker, agent: AgentProcess) -> None:
    agent.start()
    client = site.client()
    clients = [client]
    jti, token = site.signer.command("unlock", "unit_b201", ttl=300)

    def opens() -> int:
        return sum(isinstance(r, OpenRequest) and r.lock == 1 for r in site.lockers.sim.requests)

    def deliver(n: int) -> None:
        clients[-1].publish(f"{PREFIX}/cmd", token, qos=1)
        wait_results(clients, jti, n)

    deliver(1)
    deliver(2)
    agent.stop()          # a clean restart
    agent.start()
    deliver(3)
    agent.kill()          # kill -9 and back
    agent.start()
    deliver(4)
    broker.kill()         # the broker dies (kill -9) and comes back
    broker.restart()
    agent.wait_ready()
    clients.append(site.client())
    deliver(5)
    got = wait_results(clients, jti, 5)
    assert len(got) == 5
    assert [r["duplicate"] for r in got] == [False, True, True, True, True]
    assert {r["status"] for r in got} == {"done"}
    assert opens() == 1, "the command was actuated more than once"
    for c in clients:
        c.close()


class CoilWatch:
    """Samples the Modbus simulator's coils; records every unlocked interval per unit."""

    def __init__(self, site: SimSite) -> None:
        self.site = site
        self.intervals: list[tuple[str, float, float]] = []
        self._open: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for unit in MODBUS_UNITS:
                on = self.site.coil(unit)
                if on and unit not in self._open:
                    self._open[unit] = now
                elif not on and unit in self._open:
                    self.intervals.append((unit, self._open.pop(unit), now))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        now = time.monotonic()
        for unit, since in self._open.items():
            self.intervals.append((unit, since, now))


def test_kill9_at_random_points_during_100_unlocks(site: SimSite, agent: AgentProcess) -> None:
    rng = random.Random(20261129)
    board = site.modbus.board(1)
    writes_on: list[int] = []
    handle = board.handle

    def counting(request: Any) -> Any:
        if getattr(request, "function_code", None) == 5 and getattr(request, "value",
                                                                     None) == COIL_ON:
            writes_on.append(request.address)
        return handle(request)

    board.handle = counting  # type: ignore[method-assign]
    ready_at = [agent.start()]
    client = site.client()
    watch = CoilWatch(site)
    sent: list[tuple[str, bytes, float]] = []  # (jti, token, dur)
    timeline: list[tuple[str, float, float]] = []  # (unit, sent at, dur)
    units = list(MODBUS_UNITS)
    for _ in range(100):
        unit = rng.choice(units)
        dur = rng.choice([1, 2])
        jti, token = site.signer.command("unlock", unit, dur=dur, ttl=300)
        sent.append((jti, token, dur))
        timeline.append((unit, time.monotonic(), dur))
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        time.sleep(rng.uniform(0.0, 0.08))  # die anywhere: before, during, after the write
        agent.kill()
        ready_at.append(agent.start())
    # Let the broker hand over what it queued for the dead agent (its session outlives a
    # kill -9), and every relock (dur ≤ 2 s) play out, before counting.
    time.sleep(4.0)
    actuated = len(writes_on)
    # Every command delivered again, now that the agent stays up: none may run twice,
    # and each must be answered as a duplicate.
    client.clear()
    for _, token, _ in sent:
        client.publish(f"{PREFIX}/cmd", token, qos=1)
    replies = client.expect(f"{PREFIX}/cmd/result", 30, count=len(sent))
    time.sleep(1.0)
    watch.stop()
    replayed = [json.loads(m.payload) for m in replies]
    assert all(r["duplicate"] for r in replayed), [r for r in replayed if not r["duplicate"]]
    assert len(writes_on) == actuated, "a replayed command was actuated again"
    assert actuated <= len(sent)
    # No door unlocked longer than its time once the agent is back.  An unlock runs when
    # it is sent, or (the agent died first) when the next agent picks it up from the
    # broker; a later unlock of the same unit extends the time.  So a door must be
    # locked again by: the latest (agent back after sending + dur) of that unit's unlocks
    # sent before the door locked, or the agent's return, plus the tolerance.
    def back_after(t: float) -> float:
        return next((r for r in ready_at if r >= t), ready_at[-1])

    worst = 0.0
    for unit, start, end in watch.intervals:
        due = max([back_after(start)] + [back_after(ts) + d
                                         for u, ts, d in timeline if u == unit and ts <= end])
        worst = max(worst, end - due)
        assert end <= due + RELOCK_TOLERANCE_S, (unit, end - start, end - due)
    assert not any(site.coil(u) for u in units), "a door was left unlocked"
    print(f"kill -9 x100: {actuated} actuations for {len(sent)} commands, "
          f"{len(watch.intervals)} unlocked intervals, worst overrun past dur/agent-back "
          f"{worst:.2f} s (tolerance {RELOCK_TOLERANCE_S} s)")
    client.close()


def test_broker_kill_and_freeze_the_agent_recovers_by_itself(
        site: SimSite, broker: Broker, agent: AgentProcess) -> None:
    agent.start()
    # kill -9 of the broker, restarted a moment later
    broker.kill()
    killed = time.monotonic()
    time.sleep(0.5)
    broker.restart()
    back = agent.wait_ready(timeout=40)
    reconnect_s = back - killed - 0.5
    # The agent republishes every unit right after it reconnects; a client subscribing
    # in the middle of that gets some of them live (retain flag clear).  What matters is
    # that a client arriving afterwards finds them all retained.
    time.sleep(1.0)
    late = Client(broker)
    states = late.expect(f"{PREFIX}/units/#", 10, count=len(site.extra) or 5)
    assert all(m.retain for m in states)
    assert_done(site, late, "unlock", "unit_b202")
    late.close()
    # a frozen broker (half-open link): SIGSTOP, then SIGCONT
    from gateway.ops.control import ControlClient

    before = ControlClient(site.socket_path).call("status")["broker"]["liveness_failures"]
    broker.stop()
    frozen = time.monotonic()
    detected = None
    while time.monotonic() - frozen < 30:
        status = ControlClient(site.socket_path).call("status")["broker"]
        if status["liveness_failures"] > before or not status["connected"]:
            detected = time.monotonic() - frozen
            break
        time.sleep(0.1)
    broker.cont()
    assert detected is not None, "a frozen broker was not noticed within 30 s"
    recovered = agent.wait_ready(timeout=40) - frozen
    after = Client(broker)
    assert_done(site, after, "lock", "unit_a101")
    after.close()
    print(f"broker kill -9: agent reconnected {reconnect_s:.2f} s after the broker was back; "
          f"frozen broker (keepalive 5 s): detected after {detected:.2f} s, "
          f"recovered {recovered:.2f} s after the freeze")
