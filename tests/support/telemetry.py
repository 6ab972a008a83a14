"""A strict parser of the Prometheus exposition format, for the health telemetry tests
(tests/gateway/ops/test_telemetry_*.py), and the check that the text says what the status says.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"

_HELP = re.compile(rf"# HELP ({_NAME}) (.*)")

_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")

_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")

_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')

_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|Inf|NaN)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _labels(text: str, line: str) -> frozenset[tuple[str, str]]:
    pairs: dict[str, str] = {}
    at = 0
    while at < len(text):
        match = _PAIR.match(text, at)
        assert match, f"bad labels in {line!r}"
        name, raw, _ = match.groups()
        assert name not in pairs, f"label {name} twice in {line!r}"
        pairs[name] = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], raw)
        at = match.end()
    return frozenset(pairs.items())


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples and types from Prometheus text format 0.0.4, asserting every rule we rely on.

    One HELP and one TYPE per family, both before its samples; a family's samples
    together; no sample twice; label values escaped (only ``\\\\``, ``\\"``, ``\\n``);
    numbers Go can parse; counters named ``*_total`` and never negative; a final newline.
    """
    assert text.endswith("\n")
    assert "\r" not in text
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    done: set[str] = set()
    current: str | None = None
    for line in text.splitlines():
        assert line, "blank line"
        if line.startswith("#"):
            if m := _HELP.fullmatch(line):
                assert m[1] not in helps, f"second HELP for {m[1]}"
                helps.add(m[1])
            elif m := _TYPE.fullmatch(line):
                assert m[1] not in types, f"second TYPE for {m[1]}"
                assert m[1] in helps, f"TYPE before HELP for {m[1]}"
                types[m[1]] = m[2]
            else:
                raise AssertionError(f"unexpected comment {line!r}")
            if current is not None and current != m[1]:
                done.add(current)
            current = m[1]
            assert current not in done, f"{current} split"
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m[1], m[2] or "", m[3]
        assert name == current, f"{name} outside its family"
        assert name in types, f"{name} has no TYPE"
        assert _VALUE.fullmatch(value), f"bad value in {line!r}"
        key = (name, _labels(labels, line))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    for name, kind in types.items():
        assert name.startswith("stora_gateway_"), name
        assert (kind == "counter") == name.endswith("_total"), f"{name} is a {kind}"
        if kind == "counter":
            assert all(v >= 0 for (n, _), v in samples.items() if n == name), name
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"stora_gateway_{name}", frozenset(labels.items()))]


def has(samples: Samples, name: str) -> bool:
    return any(n == f"stora_gateway_{name}" for n, _ in samples)


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def check_matches(samples: Samples, status: dict[str, Any]) -> None:
    """Every metric says what the JSON status says."""
    assert value(samples, "info", version=status["version"], site=status["site"]) == 1
    assert value(samples, "uptime_seconds") == status["uptime_s"]
    assert value(samples, "start_time_seconds") == pytest.approx(epoch(status["started_at"]))
    assert value(samples, "clock_trusted") == status["clock"]["trusted"]
    assert value(samples, "broker_connected") == status["broker"]["connected"]
    assert value(samples, "broker_connects_total") == status["broker"]["connects"]
    for c in status["controllers"]:
        assert value(samples, "controller_online", controller=c["name"]) == c["online"]
        assert value(samples, "controller_consecutive_failures",
                     controller=c["name"]) == c["consecutive_failures"]
    outbox = status["outbox"]
    assert value(samples, "outbox_pending") == outbox["pending"]
    assert value(samples, "outbox_oldest_age_seconds") == (outbox["oldest_age_s"] or 0)
    assert value(samples, "outbox_dead_letters") == outbox["dead"]
    assert value(samples, "outbox_drain_state", state=outbox["drain"]) == 1
    if outbox["last_post_at"] is None:
        assert not has(samples, "outbox_last_delivery_timestamp_seconds")
    else:
        assert value(samples, "outbox_last_delivery_timestamp_seconds") == pytest.approx(
            epoch(outbox["last_post_at"]), abs=1e-3)
    for key in ("received", "executed", "rejected"):
        assert value(samples, f"commands_{key}_total") == status["commands"][key]
    host = status["host"]
    assert value(samples, "disk_free_bytes") == host["disk_free_bytes"]
    assert value(samples, "disk_size_bytes") == host["disk_total_bytes"]
    if host["cpu_temp_c"] is None:
        assert not has(samples, "cpu_temperature_celsius")
    else:
        assert value(samples, "cpu_temperature_celsius") == host["cpu_temp_c"]
