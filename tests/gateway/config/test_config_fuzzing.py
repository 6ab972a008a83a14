"""The configuration loader under fuzzing: arbitrary documents, wrong values in a valid file,
text and bytes raise only ConfigError.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import (
    load_config,
    parse_config,
)
from gateway.errors import ConfigError
from tests.support.config import (
    RAW_KEY_B64,
    VALID_TOML,
    write_config,
)

# --------------------------------------------------------------------------- fuzzing

SECTIONS = ["site", "mqtt", "commands", "stora", "storage", "control", "controllers", "locks"]

KEYS = sorted({
    "id", "app_name", "host", "port", "topic_prefix", "client_id", "tls", "ca_file",
    "trusted_keys", "auth", "token_file", "name", "driver", "address", "channels",
    "inputs", "unit", "reference", "controller", "channel", "door_input", "device",
    "energize_to", "unlock_seconds", "path", "socket", "baudrate", "relay-2026",
})


primitives = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-3, max_value=300)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["modbus", "lockboard", "zigbee2mqtt", "tasmota", "osdp", "unit_a",
                      "bus1", "lock", "/dev/ttyUSB0", "", "static", RAW_KEY_B64, "a/b"])
    | st.datetimes()
)


values = st.recursive(
    primitives,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


documents = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8), values, max_size=8)


def assert_only_config_error(call: Callable[[], object]) -> None:
    """Run ``call``: it may succeed, or raise ConfigError with a one-line message."""
    error: ConfigError | None = None
    try:
        call()
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert len(str(error).splitlines()) == 1, str(error)
        assert str(error).startswith(error.file)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_arbitrary_documents_raise_only_config_error(document: dict[str, Any]) -> None:
    assert_only_config_error(lambda: parse_config(document, "fuzz.toml", Path("/nonexistent")))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (dict keys and list indices) into a parsed TOML document."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


VALID_PATHS = _paths(tomllib.loads(VALID_TOML))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(target=st.sampled_from(VALID_PATHS), new=values | st.just(...))
def test_one_wrong_value_in_a_valid_file_raises_only_config_error(
    tmp_path: Path, target: tuple[Any, ...], new: Any
) -> None:
    """Replace (or, with ``...``, delete) one value of the valid config, anywhere."""
    write_config(tmp_path)
    data = tomllib.loads(VALID_TOML)
    parent = data
    for step in target[:-1]:
        parent = parent[step]
    if new is ...:
        del parent[target[-1]]
    else:
        parent[target[-1]] = new
    assert_only_config_error(lambda: parse_config(data, "mutated.toml", tmp_path))


toml_ish = st.lists(
    st.sampled_from([
        "[site]", "[mqtt]", "[[controllers]]", "[[locks]]", "[commands.trusted_keys]",
        'id = "s"', "id = 1", 'app_name = "A"', "port = 70000", "port = true",
        'driver = "modbus"', 'name = "b"', "channel = 3", "x = [1, [2, [3]]]",
        "a.b.c = 1", "t = 1979-05-27T07:32:00Z", 'k = """', "= 1", "[", '"\\u0000" = 1',
        f'relay = "{RAW_KEY_B64}"',
    ])
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
    max_size=15,
).map("\n".join)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=toml_ish)
def test_arbitrary_text_files_raise_only_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    assert_only_config_error(lambda: load_config(path))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    assert_only_config_error(lambda: load_config(path))
