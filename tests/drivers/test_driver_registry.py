"""The driver registry (drivers/registry.py), the drivers' settings and the health tracker.

The config loader records a driver's settings by field name into ``ControllerConfig``
and the hardware builder reads them back the same way, so the names must match; the
registry must stay light for every CLI command that reads the config.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from devkit.testing.clock import FakeClock
from drivers.base import Health
from drivers.errors import NoReplyError, UnsupportedError
from drivers.health import HealthTracker
from drivers.registry import DRIVERS, all_controller_keys, driver_spec, registry
from gateway.config import ControllerConfig, known_keys

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = registry()


def test_every_driver_is_registered_under_its_name() -> None:
    assert DRIVERS == ("lockboard", "modbus", "osdp", "tasmota", "zigbee2mqtt")
    for name in DRIVERS:
        spec = driver_spec(name)
        assert spec is not None
        assert spec.name == name
    assert driver_spec("modbuss") is None


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_settings_fields_are_controller_config_fields(name: str) -> None:
    """The by-name seam between a driver's settings and the gateway's record of them."""
    spec = REGISTRY[name]
    record = {f.name for f in fields(ControllerConfig)}
    assert {f.name for f in fields(spec.settings)} <= record


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_settings_round_trip_through_the_config_record(name: str) -> None:
    spec = REGISTRY[name]
    config = ControllerConfig(name="c", driver=name, port="/dev/ttyUSB0", baudrate=9600,
                              address=1, channels=2, inputs=1, topic="t")
    settings = spec.settings.from_fields(lambda field: getattr(config, field))
    values: dict[str, Any] = settings.values()
    rebuilt = ControllerConfig(name="c", driver=name, **values)
    for key in settings.values():
        assert getattr(rebuilt, key) == getattr(config, key)


def test_known_keys_are_the_drivers_keys() -> None:
    keys = known_keys()
    for name, spec in REGISTRY.items():
        assert keys[f"controllers.{name}"] == spec.keys
    assert frozenset().union(*(s.keys for s in REGISTRY.values())) == all_controller_keys()


def test_only_serial_drivers_scan_and_have_addresses() -> None:
    assert {n for n, s in REGISTRY.items() if s.serial} == {"lockboard", "modbus", "osdp"}
    assert {n for n, s in REGISTRY.items() if s.scan is not None} == {"lockboard", "modbus"}
    assert [n for n, s in REGISTRY.items() if s.locks_by_device] == ["zigbee2mqtt"]


def test_reading_the_registry_loads_no_driver_library() -> None:
    """Every CLI command reads the config: the registry must not load pymodbus or paho."""
    code = ("import sys, drivers.registry, gateway.config\n"
            "print(','.join(m for m in ('pymodbus', 'paho', 'serial', 'osdp')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == ""



_SETTINGS_LOADED = (
    "import sys\n"
    "from gateway.config import load_config\n"
    "from tests.support.config import VALID_TOML, write_config\n"
    "from pathlib import Path\n"
    "text = VALID_TOML.replace('pulse = true', 'pulse = true' + sys.argv[2])\n"
    "try:\n"
    "    load_config(write_config(Path(sys.argv[1]), text))\n"
    "except Exception as exc:\n"
    "    print(exc, file=sys.stderr)\n"
    "print(','.join(sorted(m.split('.')[1] for m in sys.modules\n"
    "                      if m.count('.') == 2 and m.startswith('drivers.')\n"
    "                      and m.endswith('.settings'))))\n"
)


def _settings_loaded(tmp_path: Path, extra: str = "") -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", _SETTINGS_LOADED, str(tmp_path), extra],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.strip(), done.stderr


def test_a_config_loads_the_settings_of_its_own_drivers_only(tmp_path: Path) -> None:
    """A site's agent holds its own drivers' settings, not all five (a Pi's memory)."""
    loaded, errors = _settings_loaded(tmp_path)
    assert errors == ""
    assert loaded == "lockboard,modbus"  # the example config's two drivers


def test_a_key_from_another_driver_still_names_that_mistake(tmp_path: Path) -> None:
    """The one path that needs every driver's keys loads them, and only then."""
    loaded, errors = _settings_loaded(tmp_path, '\nbase_topic = "z"')
    assert "controllers[0].base_topic: key not valid for driver modbus" in errors
    assert loaded == "lockboard,modbus,osdp,tasmota,zigbee2mqtt"

# --------------------------------------------------------------------------- health


def test_health_tracker_counts_failures_and_clears_on_success() -> None:
    clock = FakeClock(100.0)
    h = HealthTracker(clock)
    assert h.health(False, "not yet contacted") == Health(False, "not yet contacted")
    for _ in range(2):
        with pytest.raises(NoReplyError), h.track():
            raise NoReplyError("silent")
    assert (h.failures, h.last_error, h.last_ok_at) == (2, "silent", None)
    clock.now = 105.0
    with h.track():
        pass
    assert h.health(True, "ok") == Health(True, "ok", None, 105.0, 0)


def test_a_refusal_is_an_answer() -> None:
    """A TechnicianError proves the device is there: no failure, but its reason stays."""
    clock = FakeClock(100.0)
    h = HealthTracker(clock)
    h.failed("silent")
    with pytest.raises(UnsupportedError), h.track():
        raise UnsupportedError("no such channel")
    assert (h.failures, h.last_error, h.last_ok_at) == (0, "no such channel", 100.0)
    h.failed("gone")
    h.cleared()
    assert (h.failures, h.last_error, h.last_ok_at) == (0, None, 100.0)
