"""Unlock → confirmed time per driver, on its simulator, p50 and p99 (issue 6).

Each driver is built exactly as the agent builds it (``gateway.units.hardware.build_site`` from
a config naming the conformance harness's controller, devkit/harness/*.py), and
timed from the ``unlock`` call to its return with ``confirmed=True`` (the driver's own
read-back or fresh state report).  Between cycles the lock is locked again (or, for a
latch that only the board re-engages, left to re-engage), outside the timing.  All
drivers run side by side in one run on the same machine; the MQTT ones talk to a real
Mosquitto on a free port, the serial ones to simulators on ptys.

What the figures include: the driver's protocol round trips and deliberate waits (for
example a serial inter-frame gap, a lock board's settle before its read-back, a device's
report delay modelled by its simulator).  They are software-and-simulator times: a real
Zigbee lock takes about a second to move its bolt, a real relay tens of milliseconds.

Run: ``PYTHONPATH=. .venv/bin/python bench/driver_confirm.py [--cycles 50] [--driver X]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from devkit import harness as _harness
from devkit import site as _site
from devkit.harness import Harness
from devkit.mosquitto import Broker
from devkit.signer import generate_keypair
from gateway.config import load_config
from gateway.units.hardware import build_site, point_of


def _config(directory: Path, broker: Broker, harness: Harness) -> Path:
    token = directory / "token"
    token.write_text(f"{_site.STORA_TOKEN}\n")
    token.chmod(0o600)
    path = directory / "gateway.toml"
    path.write_text(f"""\
[site]
id = "site_bench"
app_name = "Bench"

[mqtt]
host = "{broker.host}"
port = {broker.port}
client_id = "bench-drivers"

[commands]
trusted_keys = {{ bench = "{generate_keypair()[1]}" }}
clock = "system"

[stora]
base_url = "{_site.NO_STORA_URL}"
auth = "static"
token_file = "{token}"
timeline_source_id = "tsrc_bench"

[storage]
path = "{directory / 'gateway.db'}"

[control]
socket = "{directory / 'control.sock'}"

{harness.controller_toml("c1")}
[[locks]]
unit = "unit_bench"
reference = "BENCH"
controller = "c1"
unlock_seconds = 5
{harness.lock_keys(0)}
""")
    return path


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_driver(driver: str, cycles: int, root: Path, broker: Broker) -> dict[str, Any]:
    """``cycles`` timed unlocks of one driver; its figures."""
    directory = root / driver
    directory.mkdir()
    harness = _harness.make_harness(driver, directory, broker)
    try:
        config = load_config(_config(directory, broker, harness))
        site = build_site(config)
        try:
            lock = config.locks[0]
            controller = site.controller_for(lock)
            point = point_of(lock)
            controller.probe()
            times: list[float] = []
            unconfirmed = 0
            for _ in range(cycles):
                started = time.perf_counter()
                result = controller.unlock(point, 5.0)
                elapsed = time.perf_counter() - started
                if result.confirmed:
                    times.append(elapsed)
                else:
                    unconfirmed += 1
                if harness.unlock_only:
                    harness.drift(0, False)  # the latch re-engages (door pushed shut)
                else:
                    controller.lock(point)
        finally:
            site.close()
    finally:
        harness.close()
    return {"driver": driver, "cycles": cycles, "unconfirmed": unconfirmed,
            "p50_ms": _percentile(times, 0.5) * 1000 if times else None,
            "p99_ms": _percentile(times, 0.99) * 1000 if times else None,
            "mean_ms": statistics.fmean(times) * 1000 if times else None}


def main() -> None:
    """Run every driver (or one) and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--driver", action="append", choices=sorted(_harness.HARNESSES))
    args = parser.parse_args()
    drivers = args.driver or sorted(_harness.HARNESSES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stora-bench-drivers-") as tmp:
        root = Path(tmp)
        with Broker(root / "broker") as broker:
            for driver in drivers:
                try:
                    rows.append(bench_driver(driver, args.cycles, root, broker))
                except ModuleNotFoundError as exc:
                    rows.append({"driver": driver, "error": f"no harness ({exc.name})"})
    print(f"unlock -> confirmed, {args.cycles} cycles per driver, on simulators")
    print(f"{'driver':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'unconfirmed':>11}")
    for row in rows:
        if "error" in row:
            print(f"{row['driver']:<12} {row['error']}")
            continue
        print(f"{row['driver']:<12} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
              f"{row['mean_ms']:>8.1f} {row['unconfirmed']:>11}")


if __name__ == "__main__":
    main()
