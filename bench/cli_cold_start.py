"""CLI cold start, as a ratio to a bare ``python -c pass`` measured in the same run.

Three commands, each started as a fresh process N times (median, then the ratio):

* ``python -c pass``: the interpreter alone, the baseline;
* ``stora-gateway --help``: argument parsing only; no driver library may load;
* ``stora-gateway locks --json`` on a 16-lock config (one 16-relay Modbus board on a
  simulator over a pty): config, pyserial, pymodbus and one bus round trip.

Target: each <= 10x the baseline (heavy imports deferred into the commands that need
them).  Run: ``.venv/bin/python bench/cli_cold_start.py [--runs 20]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devkit.demo_site import write_demo_config
from devkit.sims.modbus import ModbusSimBus


def sixteen_lock_config(directory: Path, port: Path) -> Path:
    """The demo config with its bus1 board widened to 16 relays carrying 16 locks."""
    config = write_demo_config(directory, port, port)
    head = config.read_text().split("[[controllers]]", 1)[0]
    locks = "".join(
        f'[[locks]]\nunit = "unit_{i:02d}"\nreference = "A-{100 + i}"\ncontroller = "bus1"\n'
        f"channel = {i}\n\n"
        for i in range(16)
    )
    config.write_text(
        head
        + f'[[controllers]]\nname = "bus1"\ndriver = "modbus"\nport = "{port}"\n'
        "address = 1\nchannels = 16\ninputs = 0\n\n"
        + locks
    )
    return config


def median_s(argv: list[str], runs: int, check: bool = True) -> float:
    """Median wall time of ``runs`` fresh processes."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        if check and done.returncode != 0:
            raise SystemExit(f"{argv}: exit {done.returncode}: {done.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    """Run the three commands and print their ratios to the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    cli = [sys.executable, "-m", "gateway.cli"]
    with tempfile.TemporaryDirectory() as tmp, \
            ModbusSimBus(Path(tmp) / "tty", slaves=(1,), coils=16, inputs=0) as sim:
        config = str(sixteen_lock_config(Path(tmp), sim.path))
        rows = json.loads(subprocess.run([*cli, "locks", "--json", "--config", config],
                                         capture_output=True, text=True, check=True).stdout)
        if len(rows) != 16 or not all(r["locked"] is True for r in rows):
            raise SystemExit(f"locks --json did not read 16 locked locks: {rows}")
        base = median_s([sys.executable, "-c", "pass"], runs)
        helped = median_s([*cli, "--help"], runs)
        locks = median_s([*cli, "locks", "--json", "--config", config], runs)
    print(f"CLI cold start, median of {runs} fresh processes each")
    print(f"python -c pass           {base * 1e3:7.1f} ms   1.0x (baseline)")
    for label, value in (("stora-gateway --help", helped), ("locks --json (16 locks)", locks)):
        print(f"{label:<24} {value * 1e3:7.1f} ms  {value / base:4.1f}x  (target <= 10x)")


if __name__ == "__main__":
    main()
