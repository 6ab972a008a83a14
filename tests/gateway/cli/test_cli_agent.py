"""The technician CLI through a running agent's control socket, and the fall back to
direct mode when no agent answers."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devkit.demo_site import write_demo_config
from devkit.sims.lockboard import start_lockboard_sim
from devkit.sims.modbus import ModbusSimBus
from gateway.cli.main import main
from gateway.ops.control import ControlDenied, ControlError, ControlServer, Peer

LOCK_KEYS = ["unit", "reference", "controller", "locked", "door", "lockout", "error"]
OUTCOME_KEYS = ["unit", "reference", "action", "status", "detail", "elapsed_ms", "state",
                "door"]
TEST_KEYS = ["unit", "reference", "passed", "unlock_ms", "held_ms", "relock_ms", "detail"]


def outcome(action: str, status: str = "done", **extra: Any) -> dict[str, Any]:
    """An outcome as the agent sends it: keys in its own order, one extra."""
    state = "unlocked" if action == "unlock" else "locked"
    base = {"door": "closed", "state": state, "elapsed_ms": 41.26, "detail": "confirmed",
            "status": status, "action": action, "reference": "A-101", "unit": "unit_a101",
            "attempts": 1}
    return {**base, **extra}


@dataclass
class FakeAgent:
    """Answers like the agent would; records what the CLI asked."""

    calls: list[tuple[str, dict[str, Any], Peer]] = field(default_factory=list)
    lockout: set[str] = field(default_factory=set)

    def handle(self, method: str, params: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        self.calls.append((method, dict(params), peer))
        if method == "status":
            return {"online": True, "version": "0.1.0", "site": "site_demo",
                    "broker": {"connected": True, "reconnects": 0},
                    "clock": {"trusted": True, "why": "ntp synchronized"},
                    "controllers": [{"name": "bus1", "online": True, "detail": None},
                                    {"name": "lockers", "online": False,
                                     "detail": "no reply"}],
                    "outbox": {"pending": 2, "oldest_age_s": 13, "dead": 0}}
        if method == "locks":
            return {"locks": [
                {"lockout": False, "unit": "unit_a101", "reference": "A-101",
                 "controller": "bus1", "locked": True, "door": "closed", "error": None},
                {"unit": "unit_a102", "reference": "A-102", "controller": "bus1",
                 "locked": None, "door": "unknown", "lockout": True, "error": None},
            ]}
        if method in ("unlock", "lock") and params["unit"] not in ("A-101", "unit_a101"):
            raise ControlError(f"unknown unit {params['unit']!r}", 2)
        if method == "unlock":
            if "unit_a101" in self.lockout and not params["force"]:
                raise ControlError("A-101 is in lockout (overlocked): use --force --reason "
                                   "TEXT", 1)
            return {"outcomes": [outcome("unlock")]}
        if method == "lock":
            return {"outcome": outcome("lock", "not_confirmed", state="unlocked",
                                       detail="still unlocked")}
        if method == "test":
            return {"passed": False, "results": [
                {"unit": "unit_a101", "reference": "A-101", "passed": True,
                 "unlock_ms": 40.04, "relock_ms": 38.96, "detail": "ok"},
                {"unit": "unit_b202", "reference": "B-202", "passed": False,
                 "unlock_ms": 51.0, "relock_ms": None, "detail": "jammed"},
            ]}
        if method == "deny":
            raise ControlDenied("permission denied: run as root or a member of group x")
        raise ControlError(f"unknown request {method!r}", 2)


@dataclass
class AgentSite:
    config: Path
    socket: Path
    agent: FakeAgent

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main([*argv, "--config", str(self.config)], out=out, err=err)
        return status, out.getvalue(), err.getvalue()

    def only_call(self) -> tuple[str, dict[str, Any]]:
        ((method, params, _),) = self.agent.calls
        return method, params


def config_with_socket(directory: Path, modbus: Path, lockers: Path) -> tuple[Path, Path]:
    config = write_demo_config(directory, modbus, lockers)
    sock = directory / "run" / "control.sock"
    # The demo config has its own socket in its directory; point it at ours.
    text = config.read_text().replace("pulse = true", "pulse = false")
    text = text.replace(f'socket = "{directory / "control.sock"}"', f'socket = "{sock}"')
    config.write_text(text)
    return config, sock


@pytest.fixture
def site(tmp_path: Path) -> Iterator[AgentSite]:
    # Serial ports that do not exist: had the CLI gone direct, it would have failed.
    config, sock = config_with_socket(tmp_path, Path("/dev/ttyNOSUCH-A"),
                                      Path("/dev/ttyNOSUCH-B"))
    agent = FakeAgent()
    with ControlServer(sock, agent):
        yield AgentSite(config, sock, agent)


# -- through the agent --------------------------------------------------------------------
def test_locks_json_has_the_direct_mode_shape_with_real_lockouts(site: AgentSite) -> None:
    status, out, err = site.run("locks", "--json")
    assert (status, err) == (0, "")
    rows = json.loads(out)
    assert [list(r) for r in rows] == [LOCK_KEYS, LOCK_KEYS]
    assert [r["lockout"] for r in rows] == [False, True]
    assert site.only_call() == ("locks", {})


def test_locks_table_shows_lockouts_without_the_direct_mode_note(site: AgentSite) -> None:
    status, out, _ = site.run("locks")
    assert status == 0
    a101, a102 = (line.split() for line in out.splitlines()[2:4])
    assert a101 == ["unit_a101", "A-101", "bus1", "locked", "closed", "no", "-"]
    assert a102 == ["unit_a102", "A-102", "bus1", "unknown", "unknown", "yes", "-"]
    assert "direct mode" not in out


def test_unlock_goes_through_the_agent_which_owns_the_relock(
    site: AgentSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    status, out, _ = site.run("unlock", "A-101", "--seconds", "5", "--json")
    assert status == 0
    (only,) = json.loads(out)  # no relock from the CLI: the agent's timer does it
    assert list(only) == OUTCOME_KEYS
    assert (only["action"], only["status"], only["elapsed_ms"]) == ("unlock", "done", 41.3)
    method, params = site.only_call()
    assert method == "unlock"
    assert params["unit"] == "A-101"
    assert params["seconds"] == 5
    assert isinstance(params["seconds"], int)  # whole seconds travel as an integer
    assert (params["force"], params["reason"]) == (False, None)
    assert params["actor"].startswith("technician ")
    assert f"(uid {os.getuid()})" in params["actor"]


def test_unlock_text_says_who_relocks(site: AgentSite) -> None:
    status, out, _ = site.run("unlock", "unit_a101")
    assert status == 0
    assert "A-101 (unit_a101): unlock confirmed in 41 ms" in out
    assert "the agent relocks it after its unlock time" in out
    assert site.only_call()[1]["seconds"] is None


def test_unlock_of_a_unit_in_lockout_is_refused_with_the_agent_s_words(
    site: AgentSite,
) -> None:
    site.agent.lockout.add("unit_a101")
    status, out, err = site.run("unlock", "A-101")
    assert status == 1
    assert out == ""
    assert err == ("stora-gateway: A-101 is in lockout (overlocked): use --force --reason "
                   "TEXT\n")


def test_forced_unlock_passes_force_and_reason(site: AgentSite) -> None:
    site.agent.lockout.add("unit_a101")
    status, _, _ = site.run("unlock", "A-101", "--force", "--reason", "tenant paid at desk",
                            "--seconds", "2.5")
    assert status == 0
    params = site.only_call()[1]
    assert (params["force"], params["reason"], params["seconds"]) == (
        True, "tenant paid at desk", 2.5)


def test_force_without_reason_never_reaches_the_agent(site: AgentSite) -> None:
    assert site.run("unlock", "A-101", "--force")[0] == 2
    assert site.run("unlock", "A-101", "--seconds", "0")[0] == 2
    assert site.agent.calls == []


def test_an_unknown_unit_is_the_agent_s_usage_error(site: AgentSite) -> None:
    status, out, err = site.run("lock", "Z-999")
    assert (status, out) == (2, "")
    assert err == "stora-gateway: unknown unit 'Z-999'\n"


def test_lock_prints_the_outcome_and_fails_when_not_confirmed(site: AgentSite) -> None:
    status, out, _ = site.run("lock", "A-101", "--json")
    assert status == 1
    result = json.loads(out)
    assert list(result) == OUTCOME_KEYS
    assert result["status"] == "not_confirmed"
    method, params = site.only_call()
    assert method == "lock"
    assert set(params) == {"unit", "actor"}
    status, out, _ = site.run("lock", "A-101")
    assert "A-101 (unit_a101): lock not confirmed in 41 ms — lock unlocked" in out


def test_test_json_has_the_direct_mode_shape(site: AgentSite) -> None:
    status, out, _ = site.run("test", "--all", "--json", "--seconds", "2",
                              "--relock-timeout", "4")
    assert status == 1
    report = json.loads(out)
    assert list(report) == ["passed", "interrupted", "results", "cancelled"]
    assert report["passed"] is False
    assert (report["interrupted"], report["cancelled"]) == (False, [])
    assert [list(r) for r in report["results"]] == [TEST_KEYS, TEST_KEYS]
    assert report["results"][0]["relock_ms"] == 39.0
    method, params = site.only_call()
    assert method == "test"
    assert params == {"units": [], "all": True, "seconds": 2.0, "relock_timeout": 4.0,
                      "actor": params["actor"]}


def test_test_table_through_the_agent(site: AgentSite) -> None:
    status, out, _ = site.run("test", "A-101", "B-202")
    assert status == 1
    assert "1 passed, 1 failed" in out
    assert "PASS" in out
    assert "FAIL" in out
    assert site.only_call()[1]["units"] == ["A-101", "B-202"]
    assert site.only_call()[1]["all"] is False


def test_status_json_is_the_agent_s_answer_as_is(site: AgentSite) -> None:
    status, out, _ = site.run("status", "--json")
    assert status == 3  # lockers offline: DEGRADED, judged by the CLI (no verdict sent)
    assert json.loads(out) == site.agent.handle("status", {}, Peer(0, 0, 0, ()))
    assert site.agent.calls[0][0] == "status"


def test_status_text_has_the_verdict_then_readable_sections(site: AgentSite) -> None:
    status, out, _ = site.run("status")
    assert status == 3
    assert out.splitlines()[0] == "DEGRADED: 1 controller offline: lockers (no reply)"
    assert "controllers 1 of 2 offline: lockers: no reply\n" in out
    status, out, _ = site.run("status", "--verbose")
    assert status == 3
    sections = [line for line in out.split("\n\n", 2)[2].splitlines()
                if line and not line.startswith(" ")]
    assert sections == ["agent", "broker", "outbox", "controllers", "clock"]
    assert "  online   yes" in out
    assert "  oldest_age_s  13" in out
    assert "lockers  no" in out


def test_a_refused_caller_gets_one_line_and_exit_2(
    site: AgentSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import main as cli

    monkeypatch.setattr(cli, "AGENT_READ_S", 5.0)
    original = site.agent.handle

    def deny(method: str, params: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        return original("deny", params, peer)

    monkeypatch.setattr(site.agent, "handle", deny)
    for argv in (["locks"], ["status"], ["lock", "A-101"]):
        status, out, err = site.run(*argv)
        assert (status, out) == (2, ""), argv
        assert err == ("stora-gateway: permission denied: run as root or a member of "
                       "group x\n")


@pytest.mark.skipif(os.getuid() != 0, reason="sudo only counts for root")
def test_actor_names_the_person_behind_sudo(
    site: AgentSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    site.run("lock", "A-101")
    assert site.only_call()[1]["actor"] == "technician alice (uid 0, via sudo)"


# -- no agent -----------------------------------------------------------------------------
@dataclass
class SimSite:
    config: Path
    socket: Path
    modbus: ModbusSimBus

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main([*argv, "--config", str(self.config)], out=out, err=err)
        return status, out.getvalue(), err.getvalue()


@pytest.fixture
def sim_site(tmp_path: Path) -> Iterator[SimSite]:
    modbus = ModbusSimBus(tmp_path / "ttyA", slaves=(1,), coils=4, inputs=4)
    lockers = start_lockboard_sim(tmp_path / "ttyB", (0,), 8, hold_s=0.5)
    config, sock = config_with_socket(tmp_path, modbus.path, lockers.port.path)
    try:
        yield SimSite(config, sock, modbus)
    finally:
        modbus.close()
        lockers.close()


@pytest.mark.simulator_only
def test_status_without_an_agent_is_down_exit_4(sim_site: SimSite) -> None:
    status, out, err = sim_site.run("status")
    assert (status, err) == (4, "")
    assert out.startswith(f"DOWN: the agent is not running (no control socket at "
                          f"{sim_site.socket}): remote commands are not executed")


@pytest.mark.simulator_only
def test_locks_without_an_agent_goes_direct_silently(sim_site: SimSite) -> None:
    status, out, err = sim_site.run("locks", "--json")
    assert (status, err) == (0, "")
    rows = json.loads(out)
    assert [list(r) for r in rows] == [LOCK_KEYS] * 5
    assert all(r["lockout"] is None for r in rows)  # direct mode: the agent's to know
    assert rows[0]["locked"] is True  # really read from the simulator


@pytest.mark.simulator_only
def test_a_stale_socket_file_also_means_direct_mode(sim_site: SimSite) -> None:
    sim_site.socket.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sim_site.socket))  # bound, never listening: a killed agent's file
    status, out, _ = sim_site.run("lock", "A-101", "--json")
    assert status == 0
    assert json.loads(out)["status"] == "done"
    assert sim_site.modbus.board(1).coil(0) is False
    status, out, _ = sim_site.run("status")
    assert status == 4
    assert "DOWN: the agent is not running (nothing listens on" in out


@pytest.mark.simulator_only
def test_direct_unlock_still_relocks_itself(sim_site: SimSite) -> None:
    status, out, _ = sim_site.run("unlock", "A-101", "--seconds", "0.2", "--json")
    assert status == 0
    assert [o["action"] for o in json.loads(out)] == ["unlock", "lock"]
    assert [list(o) for o in json.loads(out)] == [OUTCOME_KEYS, OUTCOME_KEYS]


# -- run ----------------------------------------------------------------------------------
def test_run_hands_the_config_to_the_agent(
    site: AgentSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Any, bool]] = []

    def run_agent(config: Any, *, debug: bool = False) -> int:
        seen.append((config, debug))
        return 0

    fake = types.ModuleType("gateway.agent")
    fake.run_agent = run_agent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.agent", fake)
    status, _, _ = site.run("run", "--debug")
    assert status == 0
    ((config, debug),) = seen
    assert config.path == site.config
    assert debug is True


def test_run_with_a_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", "--config", str(tmp_path / "none.toml")], out=out, err=err) == 2
    assert "none.toml" in err.getvalue()
