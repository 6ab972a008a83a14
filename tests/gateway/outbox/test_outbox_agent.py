"""The outbox through the CLI (direct mode: no agent running) and through the agent: wiring,
status, the control socket, storage faults, and a kill mid-drain.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import Sandbox, max_in_window
from devkit.site import RunningAgent
from devkit.testing import AgentToml, wait_for
from gateway.cli.main import main
from gateway.outbox.timeline import external_id_for
from gateway.store import Store
from tests.support import outbox as support
from tests.support.outbox import PER_MIN, PER_S, STATIC, Rig, record
from tests.support.store import tmpfs

# The fake clock and a limited sandbox (test_outbox_kill.py keeps the root ones).
clock = pytest.fixture(support.clock)
sandbox_options = pytest.fixture(support.sandbox_options)


# -- the CLI (direct mode: no agent running) ------------------------------------------------
def write_config(tmp: Path) -> Path:
    return AgentToml(
        tmp,
        site={"id": "site_test", "app_name": "TestGate"},
        stora={"base_url": "http://127.0.0.1:9/2025-09", "auth": "static",
               "token_file": tmp / "token", "timeline_source_id": "tsrc_test"},
        storage={"path": tmp / "gateway.db"},
        control={"socket": tmp / "no-agent.sock"},
        controllers=[{"name": "bus1", "driver": "modbus", "port": "/dev/ttyUSB9", "address": 1}],
        locks=[{"unit": "unit_a101", "reference": "A-101", "controller": "bus1", "channel": 0}],
        token=STATIC,
    ).write()


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_outbox_lists_and_retries_directly(rig: Rig) -> None:
    ids = rig.add(4)
    rig.sandbox.reject_external_ids([ids[1]])
    rig.drain(stop_when=lambda: rig.delivered() >= 2)
    rig.store.close()
    config = write_config(rig.tmp)
    code, out, err = cli("outbox", "--config", str(config), "--json")
    assert (code, err) == (0, "")
    listing = json.loads(out)
    assert listing["summary"]["pending"] == 1
    assert listing["summary"]["dead"] == 1
    assert listing["summary"]["drain"] == "agent not running"
    assert [(e["state"], e["external_id"]) for e in listing["events"]] == [
        ("pending", ids[3]), ("dead", ids[1])]
    code, out, _ = cli("outbox", "--dead", "--config", str(config))
    assert code == 0
    assert "pending 1" in out
    assert "dead 1" in out
    assert "422 invalid_content" in out
    assert "/external/id" in out
    dead_seq = next(e["seq"] for e in listing["events"] if e["state"] == "dead")
    code, _, err = cli("outbox", "retry", str(dead_seq + 100), "--config", str(config))
    assert code == 1
    assert "no dead-lettered event" in err
    code, _, err = cli("outbox", "retry", "--config", str(config))
    assert code == 2
    code, out, _ = cli("outbox", "retry", str(dead_seq), "--config", str(config), "--json")
    assert (code, json.loads(out)) == (0, {"retried": [dead_seq]})
    rig.sandbox.reject_external_ids([])
    rig.open()
    assert rig.store.event_count("dead") == 0
    rig.drain()
    rig.assert_exactly_once(ids)
    code, out, _ = cli("outbox", "retry", "--all-dead", "--config", str(config))
    assert (code, out) == (0, "no dead-lettered events\n")


# -- the agent: wiring, status, control socket, storage faults ------------------------------
@pytest.mark.simulator_only
def test_agent_delivers_dead_letters_and_retries_through_the_control_socket(
        tmp_path: Path, broker: Any) -> None:
    from devkit.site import PREFIX, SITE, STORA_TOKEN, make_site
    from gateway.ops.control import ControlClient, ControlError

    with Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        try:
            watcher = site.client()
            with RunningAgent(site.config_path) as agent:
                jti, token = site.signer.command("unlock", "unit_a101", dur=1)
                unlocked = external_id_for(SITE, jti, "unlocked")
                sandbox.reject_external_ids([unlocked])
                watcher.publish(f"{PREFIX}/cmd", token, qos=1)
                # The unlock is refused (422) and dead-lettered; its relock is delivered.
                wait_for(lambda: agent.store.event_count("dead") == 1
                         and agent.store.event_count("pending") == 0
                         and len(sandbox.events()) == 1)
                [alarm] = watcher.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
                    m.payload)["kind"] == "timeline_dead_letter")
                assert json.loads(alarm.payload)["unit"] == "unit_a101"
                status = ControlClient(site.socket_path, timeout=5).call("status")["outbox"]
                assert (status["pending"], status["dead"], status["drain"]) == (0, 1, "ok")
                code, out, _ = cli("outbox", "--dead", "--json", "--config",
                                   str(site.config_path))
                assert code == 0
                listing = json.loads(out)
                assert listing["summary"]["drain"] == "ok"  # the agent answered
                [dead] = listing["events"]
                assert dead["external_id"] == unlocked
                assert dead["error"]["code"] == "invalid_content"
                control = ControlClient(site.socket_path, timeout=5)
                with pytest.raises(ControlError, match="no dead-lettered event") as info:
                    control.call("outbox.retry", seq=dead["seq"] + 99)
                assert info.value.status == 1
                with pytest.raises(ControlError, match="needs an event id") as info:
                    control.call("outbox.retry", seq="all")
                assert info.value.status == 2
                sandbox.reject_external_ids([])
                code, out, _ = cli("outbox", "retry", "--all-dead", "--json", "--config",
                                   str(site.config_path))
                assert (code, json.loads(out)) == (0, {"retried": [dead["seq"]]})
                wait_for(lambda: sandbox.count_by_external_id().get(unlocked) == 1)
                wait_for(lambda: agent.store.event_count("delivered") == 2)
            counts = sandbox.count_by_external_id()
            assert sorted(counts.values()) == [1, 1]
            assert 429 not in [r.status for r in sandbox.requests]
        finally:
            site.close()


def corrupt_freelist(db: Path) -> None:
    """Damage the header's freelist count: quick_check fails, the tables stay readable."""
    data = bytearray(db.read_bytes())
    data[36:40] = (3).to_bytes(4, "big")
    db.write_bytes(bytes(data))


@pytest.mark.simulator_only
@pytest.mark.parametrize(("damage", "said"), [
    (corrupt_freelist, "3 undelivered Timeline Event(s) lost"),
    (lambda db: db.write_bytes(bytes(db.stat().st_size)),
     "an unknown number of undelivered Timeline Event(s) lost"),
])
def test_a_corrupt_database_at_start_is_quarantined_and_the_loss_counted(
        tmp_path: Path, broker: Any, damage: Callable[[Path], None], said: str) -> None:
    from devkit.site import PREFIX, make_site

    site = make_site(tmp_path, broker)
    try:
        db = tmp_path / "state" / "gateway.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        with Store(db) as store:
            for n in range(3):
                with store.transaction() as tx:
                    tx.add_event(record(n))
        damage(db)
        watcher = site.client()
        with RunningAgent(site.config_path) as agent:
            [alarm] = watcher.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
                m.payload)["kind"] == "storage_corrupt")
            assert said in json.loads(alarm.payload)["detail"]
            assert agent.store.event_count() == 0  # started empty
            assert list(db.parent.glob("gateway.db.bad-*"))
            jti, token = site.signer.command("lock", "unit_a101")  # locks keep working
            watcher.publish(f"{PREFIX}/cmd", token, qos=1)
            [res] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            assert json.loads(res.payload)["status"] == "done"
    finally:
        site.close()


@pytest.fixture
def small_state_fs(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/state`` (the site's database directory) on a 1 MiB tmpfs; needs root."""
    yield from tmpfs(tmp_path / "state", "1m", "disk-full agent test skipped")


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; return it (delete it to free space)."""
    import os

    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.simulator_only
def test_disk_full_locks_keep_working_and_events_are_refused_loudly(
        tmp_path: Path, broker: Any, small_state_fs: Path) -> None:
    from devkit.site import PREFIX, make_site
    from gateway.ops.control import ControlClient

    site = make_site(tmp_path, broker)
    try:
        watcher = site.client()

        def result(jti: str) -> dict[str, Any]:
            [msg] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            return dict(json.loads(msg.payload))

        with RunningAgent(site.config_path) as agent:
            j1, t1 = site.signer.command("unlock", "unit_a101", dur=2)
            j2, t2 = site.signer.command("unlock", "unit_a102", dur=60)
            watcher.publish(f"{PREFIX}/cmd", t1, qos=1)
            watcher.publish(f"{PREFIX}/cmd", t2, qos=1)
            assert result(j1)["status"] == result(j2)["status"] == "done"
            assert site.coil("unit_a101")
            assert site.coil("unit_a102")
            filler = fill(small_state_fs)
            # A lockout cannot be recorded, but the door is locked all the same.
            j3, t3 = site.signer.command("lockout", "unit_a102", ver=1)
            watcher.publish(f"{PREFIX}/cmd", t3, qos=1)
            assert result(j3)["status"] == "failed"
            wait_for(lambda: not site.coil("unit_a102"), 5)
            # The relock timer fires on a full disk: locked, its event refused.
            wait_for(lambda: not site.coil("unit_a101"), 5)
            wait_for(lambda: agent.store.events_refused >= 1, 5)
            alarms = [json.loads(m.payload) for m in watcher.messages(f"{PREFIX}/alarm")]
            full = [a for a in alarms if a["kind"] == "storage_full"]
            assert full
            assert "Timeline Event(s) refused so far" in full[0]["detail"]
            status = ControlClient(site.socket_path, timeout=5).call("status")
            assert status["outbox"]["events_refused"] >= 1  # the agent is alive and says so
            # Space freed: everything works again, without a restart.
            filler.unlink()
            j4, t4 = site.signer.command("lock", "unit_a103")
            watcher.publish(f"{PREFIX}/cmd", t4, qos=1)
            assert result(j4)["status"] == "done"
            assert any(e.external_id == external_id_for("site_test", j4, "locked")
                       for e in agent.store.events(limit=1000))
    finally:
        site.close()


@pytest.mark.simulator_only
def test_read_only_storage_at_start_runs_on_memory_with_an_alarm(
        tmp_path: Path, broker: Any, small_state_fs: Path) -> None:
    import subprocess

    from devkit.site import PREFIX, make_site

    site = make_site(tmp_path, broker)
    try:
        Store(small_state_fs / "gateway.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(small_state_fs)], check=True)
        watcher = site.client()
        with RunningAgent(site.config_path) as agent:  # no crash, no crash loop
            [alarm] = watcher.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
                m.payload)["kind"] == "storage_unavailable")
            detail = json.loads(alarm.payload)["detail"]
            assert "read-only" in detail
            assert "NOT kept across a restart" in detail
            assert agent.store.ephemeral
            jti, token = site.signer.command("unlock", "unit_a101", dur=1)
            watcher.publish(f"{PREFIX}/cmd", token, qos=1)  # locks keep working
            [res] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            assert json.loads(res.payload)["status"] == "done"
            wait_for(lambda: not site.coil("unit_a101"), 5)  # and relock
    finally:
        site.close()


@pytest.mark.simulator_only
def test_agent_process_killed_mid_drain_delivers_each_event_once(
        tmp_path: Path, broker: Any) -> None:
    """The harness the kill -9 x300 test builds on: a real agent, a real sandbox."""
    import sqlite3

    from devkit.site import PREFIX, SITE, STORA_TOKEN, AgentProcess, make_site

    with Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        agent = AgentProcess(site)
        try:
            watcher = site.client()
            expected = []
            agent.start()
            for round_ in range(2):
                for unit in ("unit_a101", "unit_a102", "unit_b201"):
                    jti, token = site.signer.command("lock", unit)
                    watcher.publish(f"{PREFIX}/cmd", token, qos=1)
                    watcher.expect(f"{PREFIX}/cmd/result", 10, where=lambda m, j=jti: json.loads(
                        m.payload)["jti"] == j)
                    expected.append(external_id_for(SITE, jti, "locked"))
                if round_ == 0:
                    agent.kill()  # kill -9, whatever the drainer was doing
                    agent.start()
            wait_for(lambda: set(expected) <= set(sandbox.count_by_external_id()), 15)
            agent.stop()
            counts = sandbox.count_by_external_id()
            assert [counts[e] for e in expected] == [1] * len(expected)
            assert max(counts.values()) == 1
            times = sandbox.request_times()
            assert max_in_window(times, 1.0) <= PER_S
            assert max_in_window(times, 60.0) <= PER_MIN
            conn = sqlite3.connect(tmp_path / "state" / "gateway.db")
            try:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                pending = conn.execute(
                    "SELECT count(*) FROM events WHERE state = 'pending'").fetchone()[0]
                assert pending == 0
            finally:
                conn.close()
        finally:
            agent.kill()
            site.close()
