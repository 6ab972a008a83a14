"""The dev kit's test hooks of the agent: ``Agent(faults=…)``, ``restart_min_uptime_s``,
and ``python -m devkit.agent`` that runs the agent with them (devkit/faults.py,
devkit/agent.py).  The subprocess tests that use them are in tests/gateway/schedule/test_schedule.py
(faults) and tests/gateway/intake/test_mgmt.py (the restart guard)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devkit.faults import FAULTS, parse_fault
from devkit.mosquitto import Broker
from devkit.site import ROOT, RunningAgent, make_site
from gateway.agent import Agent
from gateway.intake.mgmt import RESTART_MIN_UPTIME_S


def test_a_fault_is_a_name_and_a_delay() -> None:
    assert (parse_fault("wedge-units").name, parse_fault("wedge-units").delay_s) == (
        "wedge-units", 1.0)
    assert parse_fault("stop-link@2.5").delay_s == 2.5
    assert set(FAULTS) == {"wedge-units", "stop-link", "stop-scheduler"}


@pytest.mark.parametrize("spec", ["wedge", "stop-link@-1", "stop-link@soon", ""])
def test_a_typo_in_a_fault_fails_loudly(spec: str) -> None:
    with pytest.raises(ValueError, match="fault"):
        parse_fault(spec)


def test_the_start_hook_gets_the_started_agent_and_the_guard_its_value(
        tmp_path: Path) -> None:
    seen: list[Agent] = []
    with Broker(tmp_path / "broker") as broker:
        site = make_site(tmp_path, broker)
        try:
            with RunningAgent(site.config_path, faults=seen.append,
                              restart_min_uptime_s=0.0) as agent:
                assert seen == [agent]
                assert agent.scheduler is not None  # the hook runs once it all started
                assert agent.mgmt.restart_min_uptime_s == 0.0
            with RunningAgent(site.config_path) as agent:
                assert agent.mgmt.restart_min_uptime_s == RESTART_MIN_UPTIME_S
        finally:
            site.close()


def test_devkit_agent_refuses_an_unknown_fault_before_anything_starts(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "devkit.agent", "--fault", "wedge",
                           "--config", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2
    assert "unknown fault 'wedge'" in done.stderr
    assert done.stderr.count("\n") == 1


def test_devkit_agent_reports_a_bad_config_like_run(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "devkit.agent",
                           "--config", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2
    assert "none.toml" in done.stderr
    assert "Traceback" not in done.stderr
