"""Webhook to command: from Stora's POST of a ``unit.updated`` to the lockout (or clear)
arriving at the site's gateway, next to the plain MQTT round trip on the same broker.

The relay runs as its own process (``stora-relay run --config …``, ``bench/_relay.py``:
its own interpreter and GIL, as in service; one process on the SQLite default, WAL,
``synchronous=FULL``) on a real Mosquitto.  The benchmark's process holds the HTTP
client and a fake gateway (``_relay.Gateway``: a paho client subscribed to
``stora-gw/site_fake/cmd`` that timestamps each arrival and answers ``done`` at once, so
no command is left to be re-published).  Both ends are read from ``time.perf_counter``
in this process.

One sample: a signed delivery (``X-Stora-Signature``) whose unit changes lockout (the
units of ``--units`` take turns; each unit alternates ``overlocked`` / ``occupied``
with a newer ``updated_at``, so every event makes a command).  Measured from the moment
the POST is handed to httpx to:

* **POST -> 200**: the relay has the delivery on disk (dedupe row, unit state and the
  signed command in one transaction) and answered;
* **POST -> command at gateway**: the first arrival of the command whose ``unit`` and
  ``ver`` are the event's, on ``P/S/cmd``.  The path: HTTP, HMAC check, the transaction
  (fsync), ``notify`` -> the MQTT link's publisher, its outbox transaction (what is due),
  PUBLISH QoS 1 -> broker -> gateway.

Events go one at a time (the next once the previous command arrived), so each sees an
idle relay; a plain MQTT round trip (QoS 1, a publisher in this process to an echo
client and back, ``_relay.Echo``) is taken after each, so both see the same machine.
Every delivery must be answered 200 ``command`` and every command must arrive.

Kept short for a shared machine: 1,000 events take ~10-30 s plus ~3 s to start the
relay (well under 2 minutes).

Run: ``PYTHONPATH=. .venv/bin/python bench/relay_webhook_latency.py [--events 1000]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx
from _relay import FAKE_SITE, RelayBench, webhook_body
from _site import ms, percentile


def row(name: str, samples: list[float]) -> str:
    """One line of the table: p50, p99, max."""
    return (f"{name:32} {ms(statistics.median(samples))} {ms(percentile(samples, 99))} "
            f"{ms(max(samples))}")


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--units", type=int, default=20)
    parser.add_argument("--probe", action="append", default=None, metavar="OPTION",
                        help="diagnostics: start the relay through bench/_relay.py with "
                        "this probe (bench/_relay_trace.py); not the benchmark's figures")
    args = parser.parse_args()
    total = args.warmup + args.events
    units = [f"unit_{n:03d}" for n in range(args.units)]
    posted: list[float] = []
    arrived: list[float] = []
    rtts: list[float] = []
    with RelayBench(sites=(FAKE_SITE,), probes=args.probe) as bench:
        gateway = bench.gateway((FAKE_SITE,))
        rtt = bench.round_trip()
        base_ms = int(time.time() * 1000) - 3_600_000  # ver: an hour ago, then 1 ms apart
        began = time.perf_counter()
        with httpx.Client(base_url=bench.url, timeout=10) as http:
            for i in range(total):
                unit = units[i % len(units)]
                lockout = (i // len(units)) % 2 == 0
                ver = base_ms + i
                body = webhook_body(unit, "overlocked" if lockout else "occupied", FAKE_SITE,
                                    ver, f"evt_bench_{os.getpid()}_{i}")
                headers = {"X-Stora-Signature": bench.sign(body)}
                sent = time.perf_counter()
                answer = http.post(bench.webhook_path(), content=body, headers=headers)
                answered = time.perf_counter()
                outcome = answer.json().get("outcome") if answer.status_code == 200 else None
                if outcome != "command":
                    raise SystemExit(f"event {i}: {answer.status_code} {answer.text}\n"
                                     f"{bench.log()}")
                arrival = gateway.wait_ver(unit, ver, timeout=10)
                if arrival is None:
                    raise SystemExit(f"event {i}: no command for {unit} ver {ver}\n"
                                     f"{bench.log()}")
                round_trip = rtt.sample()
                if i >= args.warmup:
                    posted.append(answered - sent)
                    arrived.append(arrival.at - sent)
                    rtts.append(round_trip)
        elapsed = time.perf_counter() - began
        commands = gateway.count
    probes = f" with probes {' '.join(args.probe)}" if args.probe else ""
    print(f"stora-relay run{probes} (own process, SQLite), mosquitto, fake gateway answering done; "
          f"{args.events} webhook events one at a time over {args.units} units, each "
          f"changing its lockout (after {args.warmup} warm-up), a MQTT round trip after "
          f"each; {commands} command arrivals in all; {elapsed:.0f} s")
    print(f"{'':32} {'p50':>10} {'p99':>10} {'max':>10}")
    print(row("MQTT round trip (QoS 1)", rtts))
    print(row("webhook POST -> 200", posted))
    print(row("webhook POST -> command arrives", arrived))
    after = [a - p for a, p in zip(arrived, posted, strict=True)]
    print(row("  of which 200 -> command", after))


if __name__ == "__main__":
    main()
