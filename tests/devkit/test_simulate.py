"""``stora-gateway simulate DRIVER``: a simulator standalone, as an installer rehearses.

Each test runs ``simulate`` as a real process, points the gateway's own CLI (another
real process, direct mode) at what it printed, and ends it with Ctrl-C as a person
would: exit 0, and the pseudo-terminal's link removed.  The config tables ``simulate``
prints are used as printed, so a snippet that does not load fails here.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.demo_site import write_demo_config
from devkit.harness.osdp import write_scbk
from devkit.mosquitto import Broker
from gateway.cli.main import main
from tests.support.cli_process import CliProcess, first, run_cli

pytestmark = pytest.mark.simulator_only


def private_dir(tmp_path: Path) -> Path:
    """A directory only this user may write to, as drivers/ports.py wants for a port."""
    directory = tmp_path / "sim"
    directory.mkdir(mode=0o700)
    return directory


def site_config(tmp_path: Path, tables: str, *, mqtt_port: int | None = None) -> Path:
    """The demo's config with its controllers and locks replaced by ``tables``."""
    config = write_demo_config(tmp_path, "/dev/null", "/dev/null", mqtt_port=mqtt_port)
    head = config.read_text().split("[[controllers]]", 1)[0]
    config.write_text(head + tables)
    return config


def serving(sim: CliProcess) -> dict[str, Any]:
    """The first line of ``simulate --json``: what it serves and its config tables."""
    return sim.wait_json(lambda d: d.get("event") == "serving")


def change(sim: CliProcess, point: str, state: str) -> dict[str, Any]:
    """Wait for the line saying the simulated ``point`` went to ``state``."""
    return sim.wait_json(lambda d: d.get("event") == "change" and d.get("point") == point
                         and d.get("state") == state)


def locks(config: Path) -> dict[str, dict[str, Any]]:
    """``stora-gateway locks --json`` (direct mode: no agent runs), by reference."""
    done = run_cli("locks", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    return {row["reference"]: row for row in json.loads(done.stdout)}


def test_simulate_modbus_serves_locks(tmp_path: Path) -> None:
    """The acceptance: ``simulate modbus --port X`` serves ``locks`` and ``unlock``."""
    port = private_dir(tmp_path) / "ttyRS485"
    with CliProcess("simulate", "modbus", "--port", str(port), "--coils", "4", "--inputs",
                    "4", "--door-open", "1", "--json") as sim:
        served = serving(sim)
        assert served["port"] == str(port)
        assert os.readlink(port) == served["device"]
        assert served["faults"] == ["door on input 1 open"]
        config = site_config(tmp_path, served["config"] + (
            '\n[[locks]]\nunit = "unit_a102"\nreference = "A-102"\ncontroller = "sim-modbus"\n'
            "channel = 1\ndoor_input = 1\n"))
        rows = locks(config)
        assert (rows["A-101"]["locked"], rows["A-101"]["door"]) == (True, "closed")
        assert (rows["A-102"]["locked"], rows["A-102"]["door"]) == (True, "open")

        done = run_cli("unlock", "A-101", "--seconds", "1", "--json", "--config", str(config))
        assert done.returncode == 0, done.stderr
        on, off = change(sim, "relay 0", "on"), change(sim, "relay 0", "off")
        assert on["at"] <= off["at"]  # RFC 3339 UTC strings sort by time
        assert sim.interrupt() == 0
    assert first(sim.json_lines(), event="stopped", removed=True) is not None
    assert not os.path.lexists(port)
    assert "Traceback" not in sim.stderr


def test_simulate_prints_a_readable_banner_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = private_dir(tmp_path) / "ttyLB"
    with CliProcess("simulate", "lockboard", "--port", str(port), "--locks", "4") as sim:
        sim.wait_for(lambda line: line == "Ctrl-C to stop.")
        assert sim.interrupt() == 0
    text = "\n".join(sim.lines)
    assert "simulating a lock board (board 0, 4 locks" in text
    assert f'port = "{port}"' in text
    assert f"stopped; {port} removed" in text
    assert not os.path.lexists(port)


def test_fault_switches_reach_the_gateway(tmp_path: Path) -> None:
    """A jammed latch (lockboard ``--jam``) fails the technician's ``test``; a stuck relay
    (modbus ``--stuck-relay``) fails an ``unlock``: the faults are the simulators'."""
    directory = private_dir(tmp_path)
    with CliProcess("simulate", "lockboard", "--port", str(directory / "ttyLB"), "--locks",
                    "4", "--hold", "1", "--jam", "1", "--json") as lockers, \
            CliProcess("simulate", "modbus", "--port", str(directory / "ttyMB"), "--coils",
                       "2", "--inputs", "0", "--stuck-relay", "0", "--json") as relays:
        tables = serving(lockers)["config"] + (
            '\n[[locks]]\nunit = "unit_b202"\nreference = "B-202"\n'
            'controller = "sim-lockers"\nchannel = 1\n\n') + serving(relays)["config"]
        config = site_config(tmp_path, tables)
        ok = run_cli("test", "B-201", "--seconds", "1", "--relock-timeout", "3", "--json",
                     "--config", str(config))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        jammed = run_cli("test", "B-202", "--seconds", "1", "--relock-timeout", "3",
                         "--json", "--config", str(config))
        assert jammed.returncode == 1, jammed.stdout + jammed.stderr
        stuck = run_cli("unlock", "A-101", "--seconds", "1", "--config", str(config))
        assert stuck.returncode == 1, stuck.stdout + stuck.stderr
        assert "Traceback" not in stuck.stderr
        assert lockers.interrupt() == 0
        assert relays.interrupt() == 0


def test_osdp_pd_with_secure_channel(tmp_path: Path) -> None:
    """libosdp's PD on a pty, with the controller's own key file: ``locks`` reads it."""
    port = private_dir(tmp_path) / "ttyOSDP"
    scbk = write_scbk(tmp_path / "pd.scbk", os.urandom(16))
    with CliProcess("simulate", "osdp", "--port", str(port), "--address", "3",
                    "--scbk-file", str(scbk), "--door-open", "0", "--json") as sim:
        served = serving(sim)
        assert f'scbk_file = "{scbk}"' in served["config"]
        rows = locks(site_config(tmp_path, served["config"]))
        assert rows["D-1"]["locked"] is True
        assert rows["D-1"]["door"] == "open"
        assert sim.interrupt() == 0
    assert not os.path.lexists(port)


def test_tasmota_device_on_a_broker_serves_the_gateway(tmp_path: Path) -> None:
    with Broker(tmp_path / "broker") as broker, \
            CliProcess("simulate", "tasmota", "--host", broker.host, "--port",
                       str(broker.port), "--topic", "gate_relay", "--json") as sim:
        served = serving(sim)
        assert served["broker"] == f"{broker.host}:{broker.port}"
        site = tmp_path / "site"
        site.mkdir()
        config = site_config(site, served["config"], mqtt_port=broker.port)
        assert locks(config)["G-1"]["locked"] is True
        done = run_cli("unlock", "G-1", "--seconds", "1", "--config", str(config))
        assert done.returncode == 0, done.stderr
        change(sim, "POWER1", "ON")
        change(sim, "POWER1", "OFF")
        assert sim.interrupt() == 0


def test_zigbee2mqtt_bridge_logs_in_with_its_own_account(tmp_path: Path) -> None:
    """On a broker with accounts the bridge uses the account it is given."""
    secret = tmp_path / "z2m-password"
    secret.write_text("bridge-secret\n")
    secret.chmod(0o600)
    with Broker(tmp_path / "broker", users={"zigbee2mqtt": "bridge-secret",
                                           "tester": "t"}) as broker, \
            CliProcess("simulate", "zigbee2mqtt", "--host", broker.host, "--port",
                       str(broker.port), "--username", "zigbee2mqtt", "--password-file",
                       str(secret), "--device", "site/A-101", "--json") as sim, \
            Client(broker, username="tester", password="t") as client:
        served = serving(sim)
        assert served["account"] == "zigbee2mqtt"
        state = client.expect("zigbee2mqtt/bridge/state")[0]
        assert json.loads(state.payload) == {"state": "online"}
        client.publish("zigbee2mqtt/site/A-101/set", b'{"state":"UNLOCK"}')
        change(sim, "lock site/A-101", "unlocked")
        assert sim.interrupt() == 0


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: d.chmod(0o777), "may be written by anyone"),
    (lambda d: (d / "ttyX").write_text("keep me"), "never replaces a file"),
    (lambda d: (d / "ttyX").symlink_to("/etc/passwd"), "only replaces a link to a "
                                                        "pseudo-terminal"),
])
def test_a_port_path_the_gateway_would_refuse_is_refused(tmp_path: Path, setup: Any,
                                                         message: str) -> None:
    directory = private_dir(tmp_path)
    setup(directory)
    before = {p.name: p.is_symlink() or p.read_text() for p in directory.iterdir()}
    out, err = io.StringIO(), io.StringIO()
    status = main(["simulate", "modbus", "--port", str(directory / "ttyX")], out=out, err=err)
    assert status == 2
    assert message in err.getvalue()
    assert err.getvalue().count("\n") == 1
    assert {p.name: p.is_symlink() or p.read_text() for p in directory.iterdir()} == before


def test_a_leftover_link_of_a_killed_simulator_is_replaced(tmp_path: Path) -> None:
    port = private_dir(tmp_path) / "ttyMB"
    port.symlink_to("/dev/pts/4095")  # what `kill -9` of a simulator leaves behind
    with CliProcess("simulate", "modbus", "--port", str(port), "--json") as sim:
        device = serving(sim)["device"]
        assert os.readlink(port) == device != "/dev/pts/4095"
        assert sim.interrupt() == 0
    assert not os.path.lexists(port)


def test_bad_options_are_one_line_exit_2(tmp_path: Path) -> None:
    port = str(private_dir(tmp_path) / "ttyMB")
    for argv, message in (
        (["simulate"], "DRIVER"),
        (["simulate", "modbus", "--port", port, "--stuck-relay", "9"], "--stuck-relay 9"),
        (["simulate", "osdp", "--port", port], "--scbk-file"),
        (["simulate", "zigbee2mqtt", "--jam", "nope"], "--jam nope"),
    ):
        out, err = io.StringIO(), io.StringIO()
        assert main(argv, out=out, err=err) == 2, argv
        assert message in err.getvalue(), (argv, err.getvalue())
    assert not os.path.lexists(port)
