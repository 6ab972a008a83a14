"""Health telemetry (gateway/ops/telemetry.py): the probes, the rendering, the verdict and the
textfile.

The Prometheus text read back by a strict parser of the exposition format
(tests/support/telemetry.py) and compared with the status it renders; the textfile watched
by a reader while it is rewritten; the CPU temperature read from a fake sysfs tree.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.ops.telemetry import (
    cpu_temperature,
    disk_usage,
    host_status,
    render_prometheus,
    write_textfile,
)
from tests.support.telemetry import (
    check_matches,
    has,
    parse_exposition,
    value,
)

# --------------------------------------------------------------------------- probes


def fake_sysfs(root: Path, zones: dict[str, str | None]) -> Path:
    """``thermal_zone<N>/temp`` files under ``root``; ``None`` makes ``temp`` unreadable."""
    for zone, text in zones.items():
        directory = root / zone
        directory.mkdir(parents=True)
        (directory / "type").write_text("cpu-thermal\n")
        if text is None:
            (directory / "temp").mkdir()  # reading it fails (EISDIR), like a sensor off
        else:
            (directory / "temp").write_text(text)
    return root


def test_cpu_temperature_is_the_hottest_readable_zone(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "thermal", {
        "thermal_zone0": "45123\n",
        "thermal_zone1": "61550\n",
        "thermal_zone2": None,            # unreadable: skipped
        "thermal_zone3": "garbage\n",     # not a number: skipped
        "thermal_zone4": "-273150\n",     # a placeholder, not a temperature: skipped
        "cooling_device0": "200000\n",    # not a thermal zone
    })
    assert cpu_temperature(root) == 61.5  # 61.55 rounded to 0.1 °C
    assert host_status(tmp_path / "gateway.db", thermal_root=root)["cpu_temp_c"] == 61.5


def test_cpu_temperature_is_none_where_nothing_is_readable(tmp_path: Path) -> None:
    assert cpu_temperature(tmp_path / "missing") is None
    assert cpu_temperature(fake_sysfs(tmp_path / "empty", {})) is None
    assert cpu_temperature(fake_sysfs(tmp_path / "off", {"thermal_zone0": None})) is None


def test_disk_usage_is_of_the_storage_filesystem_even_before_it_exists(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    usage = disk_usage(tmp_path / "not" / "yet")
    assert usage is not None
    assert usage["total_bytes"] == st.f_blocks * st.f_frsize
    assert 0 < usage["free_bytes"] <= usage["total_bytes"]
    host = host_status(tmp_path / "state" / "gateway.db")
    assert host["disk_path"] == str(tmp_path / "state")
    assert host["disk_total_bytes"] == usage["total_bytes"]
    assert host["rss_bytes"] is None or host["rss_bytes"] > 1024 * 1024  # a Python process
    assert host["load_1m"] is None or host["load_1m"] >= 0


# --------------------------------------------------------------------------- rendering

#: A status as ``Agent.status`` makes it, with the awkward cases.
STATUS: dict[str, Any] = {
    "online": True, "version": "1.2.3", "site": "site_x",
    "started_at": "2026-11-29T08:00:00.250Z", "uptime_s": 3600,
    "clock": {"trusted": False, "why": "not synchronized", "synced": False},
    "broker": {"connected": True, "connects": 2, "connect_failures": 5, "disconnects": 1,
               "liveness_failures": 0, "published": 40, "inbound_dropped": 0,
               "reconnect_delays": [0.5, 1.2], "last_disconnect_reason": "keepalive"},
    "controllers": [
        {"name": "bus1", "online": True, "detail": "ok", "last_error": None,
         "last_ok_age_s": 0.4, "consecutive_failures": 0},
        {"name": 'odd "name"\\\nx', "online": False, "detail": "timeout",
         "last_error": 'no reply "from" board\n', "last_ok_age_s": 3725.0,
         "consecutive_failures": 7},
    ],
    "outbox": {"pending": 3, "oldest_age_s": 12.5, "dead": 1, "drain": "backing off",
               "resumes_in_s": 4.0, "last_error": "no_answer", "attempts": 9, "delivered": 5,
               "dead_lettered": 1, "events_refused": 0,
               "last_post_at": "2026-11-29T08:58:00.125Z", "last_post_age_s": 120.0},
    "commands": {"received": 10, "rejected": 3, "executed": 7, "duplicates": 0,
                 "refused_again": 0, "shed": 0,
                 "rejected_by_reason": {"expired": 2, "bad_signature": 1}},
    "host": {"disk_path": "/var/lib/stora-gateway", "disk_free_bytes": 7_500_000_000,
             "disk_total_bytes": 31_000_000_000, "cpu_temp_c": 48.3, "load_1m": 0.21,
             "rss_bytes": 41_000_000},
}


def test_prometheus_text_parses_strictly_and_says_what_the_status_says() -> None:
    text = render_prometheus(STATUS)
    samples, types = parse_exposition(text)
    check_matches(samples, STATUS)
    # Names, label values and types that a scrape config or alert would rely on.
    assert value(samples, "controller_online", controller='odd "name"\\\nx') == 0
    assert r'controller="odd \"name\"\\\nx"' in text  # escaped, on one line
    assert value(samples, "commands_rejected_by_reason_total", reason="expired") == 2
    assert value(samples, "outbox_last_delivery_timestamp_seconds") == 1795942680.125
    assert value(samples, "start_time_seconds") == 1795939200.25
    assert value(samples, "cpu_temperature_celsius") == 48.3
    assert value(samples, "load1") == 0.21
    assert types["stora_gateway_outbox_pending"] == "gauge"
    assert types["stora_gateway_outbox_dead_letters"] == "gauge"  # a retry lowers it
    assert types["stora_gateway_outbox_delivered_total"] == "counter"
    assert types["stora_gateway_disk_free_bytes"] == "gauge"
    # Error texts stay in the JSON: unbounded label values would grow the series forever.
    assert "no reply" not in text
    assert "keepalive" not in text


def test_unknown_values_are_left_out_not_written_as_zero() -> None:
    status = json.loads(json.dumps(STATUS))
    status["host"].update(cpu_temp_c=None, load_1m=None, rss_bytes=None)
    status["outbox"].update(pending=0, oldest_age_s=None, last_post_at=None)
    samples, _ = parse_exposition(render_prometheus(status))
    check_matches(samples, status)
    for name in ("cpu_temperature_celsius", "load1", "resident_memory_bytes",
                 "outbox_last_delivery_timestamp_seconds"):
        assert not has(samples, name), name
    assert value(samples, "outbox_oldest_age_seconds") == 0  # nothing waits: age 0
    # The minimal birth (a probe failed) still renders.
    minimal, _ = parse_exposition(render_prometheus({"online": True, "version": "1"}))
    assert value(minimal, "online") == 1


def test_the_status_table_shows_the_new_fields_readably() -> None:
    from gateway.cli.render import render_status

    text = render_status(STATUS)
    sections = {part.split("\n", 1)[0]: part for part in text.strip().split("\n\n")}
    assert list(sections)[:7] == ["agent", "broker", "outbox", "controllers", "clock", "host",
                                  "commands"]
    assert re.search(r"disk_free_bytes\s+7\.0 GiB", sections["host"])
    assert re.search(r"disk_total_bytes\s+28\.9 GiB", sections["host"])
    assert re.search(r"cpu_temp_c\s+48\.3 °C", sections["host"])
    assert re.search(r"rss_bytes\s+39\.1 MiB", sections["host"])
    assert re.search(r"last_post_at\s+2026-11-29T08:58:00\.125Z", sections["outbox"])
    assert re.search(r"last_post_age_s\s+2 min", sections["outbox"])
    assert re.search(r"oldest_age_s\s+12 s", sections["outbox"])
    assert re.search(r"dead\s+1\n", sections["outbox"])
    assert re.search(r"uptime_s\s+60 min", sections["agent"])
    assert "consecutive_failures" in sections["controllers"]
    rows = sections["controllers"].splitlines()
    assert len(rows) == 5  # title, header, rule, two controllers: a newline stays escaped
    assert re.search(r'odd "name"\\\\x0ax +no +timeout +no reply "from" board\\x0a +62 min +7$',
                     rows[4])
    assert re.search(r"timeout\s+no reply", sections["controllers"])  # the last error
    no_temp = render_status({**STATUS, "host": {**STATUS["host"], "cpu_temp_c": None}})
    assert re.search(r"cpu_temp_c\s+-\n", no_temp)


def test_the_verdict_metric_is_a_state_set() -> None:
    samples, types = parse_exposition(render_prometheus({**STATUS, "verdict": "down"}))
    assert types["stora_gateway_verdict"] == "gauge"
    assert [value(samples, "verdict", verdict=v) for v in ("ok", "degraded", "down")] == [
        0, 0, 1]
    assert not has(parse_exposition(render_prometheus(STATUS))[0], "verdict")  # none given


# --------------------------------------------------------------------------- the verdict

#: A status with nothing wrong, to break one part at a time.
WELL: dict[str, Any] = {
    "online": True, "version": "1.2.3",
    "clock": {"trusted": True, "why": ""},
    "broker": {"connected": True, "publish_oversize": 0, "last_connect_error": None},
    "controllers": [{"name": "bus1", "online": True, "last_error": None}],
    "outbox": {"pending": 0, "oldest_age_s": None, "dead": 0, "drain": "ok",
               "last_error": None, "events_refused": 0,
               "token": {"state": "ok", "failing_for_s": None, "last_error": None}},
    "storage": {"ephemeral": False, "read_only": False},
    "host": {"disk_free_bytes": 7_500_000_000},
    "commands": {"received": 0, "trusted_keys": ["relay-2026", "relay-2027"]},
}


def broken(section: str, **values: Any) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(json.dumps(WELL))
    status[section].update(values)
    return status


@pytest.mark.parametrize(("status", "verdict", "code", "words"), [
    (WELL, "ok", None, ""),
    ({"online": True, "version": "1"}, "ok", None, ""),  # a minimal birth is no alarm
    (broken("clock", trusted=False, why="not synchronized"), "down", "clock_untrusted",
     "clock untrusted, every command is refused clock_untrusted: not synchronized"),
    (broken("broker", connected=False, last_connect_error="connection refused"), "down",
     "broker_disconnected", "MQTT broker not connected, no command can arrive: connection "
     "refused"),
    (broken("broker", publish_oversize=2), "degraded", "publish_oversize",
     "2 messages too large for the broker not published"),
    (broken("outbox", drain="paused: auth", last_error="auth: 401 unauthorized"), "degraded",
     "stora_refusing", "Stora refuses the gateway's events, delivery paused: auth: auth: 401"),
    (broken("outbox", drain="paused: config"), "degraded", "stora_refusing",
     "delivery paused: config"),
    (broken("outbox", token={"state": "failing", "failing_for_s": 61.2,
                             "last_error": "no answer"}),
     "degraded", "token_failing", "Stora token refresh failing for 61 s: no answer"),
    (broken("outbox", dead=3, newest_dead={"reason": "422 invalid_content: bad"}), "degraded",
     "dead_letters", "3 Timeline Events refused by Stora and dead-lettered, newest: 422 "
     "invalid_content: bad (stora-gateway outbox --dead)"),
    (broken("outbox", pending=1, oldest_age_s=1800.0, drain="backing off",
            last_error="no_answer"), "degraded", "outbox_stalled",
     "1 Timeline Event waiting, the oldest for 30 min: no_answer"),
    (broken("outbox", pending=1, oldest_age_s=600.0, drain="backing off"), "ok", None, ""),
    (broken("outbox", events_refused=1), "degraded", "storage", "1 Timeline Event lost"),
    (broken("outbox", error="database is locked"), "degraded", "storage",
     "the outbox cannot be read: database is locked"),
    (broken("storage", ephemeral=True), "degraded", "storage", "temporary in-memory"),
    (broken("storage", read_only=True), "degraded", "storage", "read-only"),
    (broken("host", disk_free_bytes=50 * 1024 * 1024), "degraded", "disk_low",
     "disk nearly full: 50 MiB free"),
    (broken("commands", trusted_keys=["relay-2026", "selftest"]), "degraded",
     "commissioning_key_trusted", "the self-test key (kid selftest) is trusted; remove it "
     "from [commands] trusted_keys after commissioning"),
])
def test_each_rule_gives_its_verdict_and_reason(status: dict[str, Any], verdict: str,
                                                code: str | None, words: str) -> None:
    from gateway.ops.health import assess

    found = assess(status)
    assert found.verdict == verdict
    assert [r.code for r in found.reasons] == ([code] if code else [])
    assert words in found.headline
    assert found.headline.startswith(verdict.upper())


def test_offline_controllers_are_counted_and_down_reasons_come_first() -> None:
    from gateway.ops.health import REASON_MAX_CHARS, assess

    status = broken("clock", trusted=False, why="before the build date")
    status["controllers"] = [{"name": f"bus{i}", "online": False, "last_error": "x" * 500}
                             for i in range(7)] + [{"name": "lockers", "online": True}]
    found = assess(status)
    assert found.verdict == "down"
    assert [r.code for r in found.reasons] == ["clock_untrusted", "controllers_offline"]
    offline = found.reasons[1].text
    assert offline.startswith("7 controllers offline: bus0 (xxx")
    assert len(offline) <= REASON_MAX_CHARS  # capped: the retained status stays small
    two = [{"name": "bus1", "online": False, "last_error": "no reply"},
           {"name": "lockers", "online": True, "last_error": None}]
    one = assess({**WELL, "controllers": two})
    assert one.headline == "DEGRADED: 1 controller offline: bus1 (no reply)"
    # Every controller offline: no lock can be driven, so no command can be executed.
    every = assess({**WELL, "controllers": two[:1]})
    assert every.headline == ("DOWN: every controller offline, no lock can be driven: "
                              "bus1 (no reply)")


def test_monotonic_instants_become_rfc3339_and_durations_say_their_unit() -> None:
    from gateway.ops.telemetry import broker_status, schedule_status

    broker = broker_status({"connected": True, "last_connect_at": 990.0,
                            "last_disconnect_at": None, "reconnect_delays": [0.512, 1.25],
                            "connects": 1}, mono_now=1000.0, wall_now=1_795_942_680.0)
    assert broker == {"connected": True, "last_connect_at": "2026-11-29T08:57:50.000Z",
                      "last_disconnect_at": None, "reconnect_delays_s": [0.51, 1.25],
                      "connects": 1}
    schedule = schedule_status({"running": True, "jobs": {"units.reconcile": {
        "runs": 3, "last_run_s_ago": 2.0}, "store.prune": {"runs": 0, "last_run_s_ago": None}},
        "last_jump_s": None}, wall_now=1_795_942_680.0)
    assert schedule["jobs"] == {
        "units.reconcile": {"runs": 3, "last_run_at": "2026-11-29T08:57:58.000Z"},
        "store.prune": {"runs": 0, "last_run_at": None}}
    assert schedule_status(None, wall_now=0.0) is None


def test_refusal_text_keeps_what_names_the_fault() -> None:
    from gateway.outbox.policy import MAX_NOTE_CHARS, refusal_text

    text = refusal_text({"status": 422, "code": "invalid_content",
                         "message": "the request body is invalid",
                         "details": [{"pointer": "/site/id", "message": "must start with site_"},
                                     {"pointer": "", "message": "second"}],
                         "request_id": "req_1"})
    assert text == ("422 invalid_content: the request body is invalid (/site/id: must start "
                    "with site_; -: second) [request req_1]")
    long = refusal_text({"status": 422, "code": "c", "message": "m" * 5000, "details": []})
    assert len(long) <= MAX_NOTE_CHARS
    assert long.endswith("chars)")  # the cut is said


# --------------------------------------------------------------------------- the textfile


def test_textfile_is_replaced_atomically_never_seen_half_written(tmp_path: Path) -> None:
    target = tmp_path / "gateway.prom"
    # Big enough that a plain open-and-write would be caught half-way many times over.
    versions = [render_prometheus(STATUS) * 40, render_prometheus({**STATUS, "uptime_s": 1}) * 60]
    seen: set[str] = set()
    torn: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                text = target.read_text()
            except FileNotFoundError:
                continue  # before the first write
            if text not in versions:
                torn.append(len(text))
            seen.add(text)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(300):
            write_textfile(target, versions[n % 2])
    finally:
        stop.set()
        thread.join()
    assert not torn, f"a reader saw {len(torn)} partial files"
    assert len(seen) == 2  # it did see both versions come and go
    assert [p.name for p in tmp_path.iterdir()] == ["gateway.prom"]  # no temporary left
    assert target.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "gateway.prom"
    write_textfile(target, "# HELP x y\n")
    with pytest.raises(UnicodeEncodeError):
        write_textfile(target, "a lone surrogate \ud800 cannot be written\n")
    assert target.read_text() == "# HELP x y\n"
    assert [p.name for p in tmp_path.iterdir()] == ["gateway.prom"]
    with pytest.raises(FileNotFoundError):
        write_textfile(tmp_path / "no-such-dir" / "gateway.prom", "x\n")
