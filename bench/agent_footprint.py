"""The agent's memory after 10,000 commands on 64 locks, and its idle CPU after them.

The agent runs as a real subprocess (``stora-gateway run``) against a real Mosquitto and
one simulated Modbus RTU bus (a pty, in this process) carrying 4 relay boards of 16
coils and 16 inputs: 64 locks, each with its door contact.  ``--commands`` (10,000)
signed commands are published (QoS 1) with up to ``--window`` (32) awaiting their
result, round-robin over the 64 locks, ``unlock`` (dur 2 s) and ``lock`` in turn per
lock; every result must be ``done``.

Then, from /proc/<agent pid>:

* memory: VmRSS after the load and VmHWM (the peak, start-up included); target: both
  <= 50 MB;
* idle CPU: utime + stime of all the agent's threads over ``--idle`` (60) seconds once
  the load is over (after a settle of 5 s for the last relock timers), as a share of one
  core; target <= 1 %.  Idle is not zero: every 5 s the agent reads all four boards back
  and records and publishes each unit's state, and it echoes a liveness token through
  the broker every keepalive / 2 (15 s here); the unit-state messages published during
  the window are counted to show it.

The agent gets the environment the shipped systemd unit gives it
(deploy/systemd/stora-gateway.service: ``MALLOC_ARENA_MAX=2``), since that is how it
runs on a site; ``--bare-env`` leaves it out, for comparison.

Run: ``PYTHONPATH=. .venv/bin/python bench/agent_footprint.py [--commands 10000 --idle 60]``
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque

from _site import (
    CMD_TOPIC,
    PREFIX,
    RESULT_TOPIC,
    BenchSite,
    cpu_seconds,
    proc_status,
    threads_of,
)

TARGET_RSS_MB = 50.0
#: What deploy/systemd/stora-gateway.service sets with Environment=.
UNIT_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2"}
TARGET_IDLE_CPU = 0.01
UNITS_TOPIC = f"{PREFIX}/units/#"


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--bare-env", action="store_true",
                        help="without the systemd unit's Environment= (MALLOC_ARENA_MAX=2)")
    args = parser.parse_args()
    if args.bare_env:
        os.environ.pop("MALLOC_ARENA_MAX", None)
    else:
        os.environ.update(UNIT_ENVIRONMENT)  # inherited by the agent subprocess
    print(f"agent environment: {'bare' if args.bare_env else UNIT_ENVIRONMENT}")
    with BenchSite(boards=4, coils=16, inputs=16) as site:
        publisher = site.publisher()
        recorder = site.recorder([RESULT_TOPIC, UNITS_TOPIC], "footprint")
        pid = site.pid
        started_mem = proc_status(pid)
        pending: deque[str] = deque()
        jtis: list[str] = []
        series: list[tuple[int, int]] = []  # (commands sent, VmRSS kB)
        began = time.monotonic()
        for i in range(args.commands):
            if i % 2000 == 0:
                series.append((i, proc_status(pid)["VmRSS"]))
            unit = site.units[i % len(site.units)]
            unlock = (i // len(site.units)) % 2 == 0
            jti, token = site.signer.command("unlock" if unlock else "lock", unit.unit,
                                             dur=2 if unlock else None, actor="bench")
            while len(pending) >= args.window:
                oldest = pending[0]
                if recorder.wait_result(oldest, timeout=30) is None:
                    raise SystemExit(f"no result for command {oldest}\n{site.agent_log()}")
                pending.popleft()
            publisher.publish(CMD_TOPIC, token, qos=1)
            pending.append(jti)
            jtis.append(jti)
        if not recorder.wait_until(lambda: all(j in recorder.results for j in pending), 60):
            raise SystemExit(f"results missing at the end\n{site.agent_log()}")
        load_s = time.monotonic() - began
        bad = [recorder.results[j][1] for j in jtis if recorder.results[j][1]["status"] != "done"]
        if bad:
            raise SystemExit(f"{len(bad)} commands not done, e.g. {bad[0]}")
        time.sleep(5.0)  # the last relock timers (dur 2 s) and their writes
        loaded = proc_status(pid)
        status = site.status()
        units_before = recorder.count(f"{PREFIX}/units/")
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        units_after = recorder.count(f"{PREFIX}/units/")
        idle = proc_status(pid)
        threads = threads_of(pid)
    rss_mb, hwm_mb = loaded["VmRSS"] / 1024, loaded["VmHWM"] / 1024
    share = (cpu1 - cpu0) / (wall1 - wall0)
    print(f"64 locks (4 Modbus boards x 16 on one simulated bus); agent subprocess pid {pid}, "
          f"{threads} threads")
    print(f"load: {args.commands:,} commands in {load_s:.1f} s ({args.commands / load_s:.0f}/s, "
          f"window {args.window}), all done; agent counters {status['commands']}, "
          f"coil writes {site.watch.count:,}, outbox pending {status['outbox']['pending']:,}")
    print(f"memory at start:      VmRSS {started_mem['VmRSS'] / 1024:6.1f} MB, "
          f"VmHWM {started_mem['VmHWM'] / 1024:6.1f} MB")
    print("VmRSS during the load: " + ", ".join(f"{n:,}: {kb / 1024:.1f} MB"
                                                for n, kb in series))
    print(f"after the load:       VmRSS {rss_mb:6.1f} MB, VmHWM {hwm_mb:6.1f} MB "
          f"(target <= {TARGET_RSS_MB:.0f} MB: "
          f"{'met' if max(rss_mb, hwm_mb) <= TARGET_RSS_MB else 'MISSED'}); of the VmRSS, "
          f"RssAnon {loaded['RssAnon'] / 1024:.1f} MB (private heap) and RssFile "
          f"{loaded['RssFile'] / 1024:.1f} MB (mapped files: the interpreter, libcrypto, …)")
    print(f"after the idle window: VmRSS {idle['VmRSS'] / 1024:6.1f} MB")
    print(f"idle CPU: {cpu1 - cpu0:.2f} s of CPU in {wall1 - wall0:.1f} s = {share * 100:.2f} % "
          f"of a core (target <= 1 %: {'met' if share <= TARGET_IDLE_CPU else 'MISSED'}); "
          f"unit-state messages published meanwhile: {units_after - units_before}")


if __name__ == "__main__":
    main()
