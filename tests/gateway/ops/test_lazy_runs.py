"""What the agent keeps out of memory until a technician asks (issue 13: the agent's
footprint, bench/agent_footprint.py).

The operations service's lazy seam (``TECHNICIAN_RUNS`` in gateway/ops/service.py)
loads the technician's ``test``/``scan``/``locks`` code (gateway/ops/runs.py,
gateway/ops/technician.py) on the first such request, and ``difflib`` is imported only
to suggest a near match for a name not found (the config's keys and drivers, a unit).
Checked on a real agent subprocess: with ``PYTHONVERBOSE`` its log names every module
it loads, when it loads it (``-X importtime`` would miss those loaded through
:func:`importlib.import_module`, as the seam's are).
"""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Iterator

import pytest

from devkit.site import PREFIX, AgentProcess, SimSite
from gateway.cli.main import main
from gateway.ops import runs
from gateway.ops.control import ControlClient, ControlError
from gateway.ops.service import TECHNICIAN_RUNS

pytestmark = pytest.mark.simulator_only

#: Loaded only when a technician asks for ``test``, ``scan`` or ``locks``.
TECHNICIAN_MODULES = ("gateway.ops.runs", "gateway.ops.technician")


def test_the_seam_names_the_technician_runs() -> None:
    module, _, name = TECHNICIAN_RUNS.partition(":")
    assert getattr(importlib.import_module(module), name) is runs.TechnicianRuns


@pytest.fixture
def agent(site: SimSite) -> Iterator[AgentProcess]:
    process = AgentProcess(site, env={"PYTHONVERBOSE": "1"})
    process.start()
    try:
        yield process
    finally:
        process.stop()


def imported(agent: AgentProcess) -> set[str]:
    """Every module the agent has loaded so far (``python -v`` lines of its log)."""
    text = agent.log_path.read_text(errors="replace")
    return set(re.findall(r"^import '([\w.]+)' #", text, flags=re.MULTILINE))


def cli(site: SimSite, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([*argv, "--config", str(site.config_path)], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_the_agent_loads_the_technician_s_code_and_difflib_only_when_asked(
    site: SimSite, agent: AgentProcess,
) -> None:
    client = site.client()
    jti, token = site.signer.command("unlock", "unit_a101", dur=1)
    client.publish(f"{PREFIX}/cmd", token, qos=1)
    [message] = client.expect(f"{PREFIX}/cmd/result", 10,
                              where=lambda m: json.loads(m.payload).get("jti") == jti)
    assert json.loads(message.payload)["status"] == "done"
    status, out, err = cli(site, "status", "--json")
    # 3 is DEGRADED (a part still settling just after the start): what is checked here
    # is what the agent loaded, not its verdict.
    assert status in (0, 3), err
    assert json.loads(out)["commands"]["executed"] >= 1
    loaded = imported(agent)
    assert {"gateway.agent", "gateway.ops.service", "gateway.ops.lookup"} <= loaded  # it ran
    assert [m for m in (*TECHNICIAN_MODULES, "difflib") if m in loaded] == []

    status, out, err = cli(site, "locks", "--json")  # through the agent: loads the runs
    assert status == 0, err
    assert {row["unit"] for row in json.loads(out)} >= {"unit_a101", "unit_a102"}
    assert set(TECHNICIAN_MODULES) <= imported(agent)
    assert "difflib" not in imported(agent)

    # A typo sent to the agent itself (the CLI would catch it first): the near match
    # needs difflib.
    with pytest.raises(ControlError, match=r"did you mean A-102 \(unit_a102\)"):
        ControlClient(site.socket_path, timeout=30).call("lock", unit="a102")
    assert "difflib" in imported(agent)
