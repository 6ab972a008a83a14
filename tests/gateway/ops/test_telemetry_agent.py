"""Health telemetry through the agent (``Agent.publish_telemetry``).

The retained ``P/S/status`` on a real Mosquitto, read by a subscriber that connects
afterwards; the Prometheus textfile read back by a strict parser of the exposition format
(tests/support/telemetry.py) and compared with that same status.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.site import PREFIX, RunningAgent, SimSite, make_site
from devkit.testing import wait_for
from gateway import __version__
from tests.support.telemetry import (
    Samples,
    check_matches,
    epoch,
    parse_exposition,
    value,
)

# --------------------------------------------------------------------------- the agent


def with_telemetry(site: SimSite, textfile: Path) -> None:
    site.config_path.write_text(site.config_path.read_text() + "\n[telemetry]\ninterval_s = 5\n"
                                f'prometheus_textfile = "{textfile}"\n')


@pytest.fixture
def site(tmp_path: Path, broker: Broker) -> Iterator[SimSite]:
    s = make_site(tmp_path, broker)
    with_telemetry(s, tmp_path / "prom" / "gateway.prom")
    (tmp_path / "prom").mkdir()
    try:
        yield s
    finally:
        s.close()


def retained_status(broker: Broker) -> dict[str, Any]:
    """What a subscriber that connects now gets on ``P/S/status``: the retained message."""
    with Client(broker) as late:
        late.subscribe(f"{PREFIX}/status")
        [message] = late.expect(f"{PREFIX}/status", 5)
        assert message.retain
        return dict(json.loads(message.payload))


def textfile_samples(site: SimSite) -> Samples:
    samples, _ = parse_exposition((site.directory / "prom" / "gateway.prom").read_text())
    return samples


@pytest.mark.simulator_only
def test_retained_status_and_textfile_report_queue_and_controller_health(
        site: SimSite, broker: Broker) -> None:
    client = site.client()
    with RunningAgent(site.config_path) as agent:
        wait_for(lambda: all(c["online"] for c in agent.status()["controllers"]), 15.0)
        agent.publish_telemetry()
        before = retained_status(broker)
        assert list(before)[:2] == ["online", "version"]  # contract §4
        assert (before["online"], before["version"]) == (True, __version__)
        assert before["outbox"]["pending"] == 0
        assert before["outbox"]["oldest_age_s"] is None
        check_matches(textfile_samples(site), before)

        # Stora is down (nothing listens at its URL): the unlock's event waits.
        jti, token = site.signer.command("unlock", "unit_a101", dur=1)
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        client.expect(f"{PREFIX}/cmd/result", 5,
                      where=lambda m: json.loads(m.payload)["jti"] == jti)
        time.sleep(1.1)  # the oldest event ages
        agent.publish_telemetry()
        status = retained_status(broker)
        assert list(status)[:2] == ["online", "version"]
        assert status["uptime_s"] >= 1
        assert abs(epoch(status["started_at"]) - agent.started_at) < 1
        assert status["broker"]["connected"] is True
        assert status["clock"]["trusted"] is True
        outbox = status["outbox"]
        assert outbox["pending"] == agent.store.event_count("pending") >= 1
        assert 1.0 <= outbox["oldest_age_s"] < 30
        assert (outbox["dead"], outbox["last_post_at"], outbox["last_post_age_s"]) == (0, None,
                                                                                       None)
        assert outbox["drain"] in ("ok", "backing off")
        assert status["commands"]["executed"] == 1
        assert {c["name"]: (c["online"], c["last_error"]) for c in status["controllers"]} == {
            "bus1": (True, None), "lockers": (True, None)}
        host = status["host"]
        st = os.statvfs(site.directory)
        assert host["disk_total_bytes"] == st.f_blocks * st.f_frsize
        assert 0 < host["disk_free_bytes"] <= host["disk_total_bytes"]
        temp = host["cpu_temp_c"]
        assert temp is None or (isinstance(temp, float) and -40 <= temp <= 150)
        samples = textfile_samples(site)
        check_matches(samples, status)
        assert value(samples, "outbox_pending") >= 1

        # The Modbus board stops answering: after a reconciliation, bus1 is offline
        # with its last error, in the retained status and in the textfile alike.
        site.modbus.faults.ignore_requests = True
        wait_for(lambda: not agent.status()["controllers"][0]["online"], 15.0)
        agent.publish_telemetry()
        status = retained_status(broker)
        bus1, lockers = status["controllers"]
        assert (bus1["name"], bus1["online"]) == ("bus1", False)
        assert isinstance(bus1["last_error"], str)
        assert bus1["last_error"]
        assert bus1["consecutive_failures"] >= 1
        assert bus1["last_ok_age_s"] is None or 0 <= bus1["last_ok_age_s"] < 60
        assert 0 <= lockers["last_ok_age_s"] < 30
        assert lockers["online"] is True
        samples = textfile_samples(site)
        check_matches(samples, status)
        assert value(samples, "controller_online", controller="bus1") == 0
        assert value(samples, "controller_online", controller="lockers") == 1

        # The CLI: --json is the status itself; the table shows the new fields.
        from gateway.cli.main import main

        # bus1 offline: DEGRADED, exit 3 (gateway/cli/status.py), in the status too.
        assert (status["verdict"], [r["code"] for r in status["reasons"]]) == (
            "degraded", ["controllers_offline"])
        assert value(samples, "verdict", verdict="degraded") == 1
        assert value(samples, "verdict", verdict="ok") == 0
        out = io.StringIO()
        assert main(["status", "--json", "--config", str(site.config_path)], out=out) == 3
        answer = json.loads(out.getvalue())
        assert list(answer) == list(status)
        assert answer["outbox"]["pending"] == status["outbox"]["pending"]
        assert answer["host"]["disk_total_bytes"] == host["disk_total_bytes"]
        out = io.StringIO()
        assert main(["status", "--verbose", "--config", str(site.config_path)], out=out) == 3
        assert out.getvalue().startswith("DEGRADED: 1 controller offline: bus1 (")
        assert re.search(r"^host +disk [\d.]+ [KMG]iB free of ", out.getvalue(), re.M)
        assert re.search(r"disk_free_bytes\s+[\d.]+ [KMG]iB", out.getvalue())
        assert re.search(r"last_post_at\s+-", out.getvalue())


@pytest.mark.simulator_only
def test_last_successful_post_is_reported_and_survives_a_restart(
        tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
    try:
        client = site.client()
        started = time.time()
        with RunningAgent(site.config_path) as agent:
            assert agent.status()["outbox"]["last_post_at"] is None
            _, token = site.signer.command("lock", "unit_a101")
            client.publish(f"{PREFIX}/cmd", token, qos=1)
            wait_for(lambda: agent.store.event_count("delivered") == 1, 15.0)
            agent.publish_telemetry()
            outbox = retained_status(broker)["outbox"]
            assert started <= epoch(outbox["last_post_at"]) <= time.time()
            assert 0 <= outbox["last_post_age_s"] < 15
            assert (outbox["pending"], outbox["delivered"]) == (0, 1)
        # A new agent process has delivered nothing yet; the database still knows.
        with RunningAgent(site.config_path) as again:
            wait_for(lambda: again.status()["outbox"]["drain"] == "ok", 15.0)
            after = again.status()["outbox"]
            assert after["last_post_at"] == outbox["last_post_at"]
            assert after["delivered"] == 0
    finally:
        site.close()


@pytest.mark.simulator_only
def test_textfile_is_written_while_the_broker_is_unreachable_and_a_bad_path_never_raises(
        site: SimSite, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.agent import Agent
    from gateway.config import TelemetryConfig, load_config

    agent = Agent(load_config(site.config_path))  # never started: no broker link
    try:
        agent.publish_telemetry()
        samples = textfile_samples(site)
        assert value(samples, "broker_connected") == 0
        assert value(samples, "online") == 1
        assert value(samples, "outbox_drain_state", state="not started") == 1
        missing = site.directory / "gone" / "gateway.prom"
        agent.config = dataclasses.replace(
            agent.config, telemetry=TelemetryConfig(prometheus_textfile=missing))
        with caplog.at_level(logging.WARNING, logger="gateway.agent"):
            agent.publish_telemetry()
        assert f"cannot write the Prometheus textfile {missing}" in caplog.text
        assert not missing.parent.exists()
        # A database that fails does not take the report down with it.
        agent.store.close()
        status = agent.status()
        assert (status["online"], status["version"]) == (True, __version__)
        assert "closed" in status["outbox"]["error"]
        assert status["host"]["disk_free_bytes"] > 0
    finally:
        agent.site.close()
        agent.store.close()
    assert not math.isnan(value(samples, "uptime_seconds"))
