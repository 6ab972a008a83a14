"""Webhook intake throughput: signed ``unit.updated`` deliveries accepted durably per
second, next to a raw SQLite commit loop on the same disk.

**A (intake)**: ``stora-relay run --config …`` as its own process (``bench/_relay.py``:
its own interpreter and GIL, so the posting threads here do not slow it; one process on
the SQLite default: WAL, ``synchronous=FULL``, every transaction ``BEGIN IMMEDIATE``) on
a real Mosquitto, with ``--clients`` threads posting signed deliveries over HTTP
keep-alive connections.  Each client owns its share of ``--units`` units of a
registered site and flips each one's lockout (``overlocked`` / ``occupied``, a newer
``updated_at`` each time), so every delivery writes its dedupe row, the unit's state and
a signed lockout or clear (a command row) in one transaction before its 200, and every
answer must be 200 ``command``.  The relay does all of its work meanwhile, as in
service: its MQTT link publishes each command (QoS 1) and records the result of a fake
gateway (``_relay.Gateway``, answering ``done`` at once, so nothing is re-published), in
transactions of their own on the same database.  The rate is 200s per second of wall
time.

**B (raw)**: one ``INSERT`` of a delivery-sized row plus ``COMMIT`` per event, plain
``sqlite3``, WAL, ``synchronous=FULL``, in the same directory: the floor any durable
intake pays on this disk.

Rounds alternate A, B (``--rounds``, ``--per-round`` events each, after a warm-up of
each), so both see the same disk and machine load; printed: each side's rate over its
rounds and the median of per-pair ratios.

Kept short for a shared machine: the defaults take ~20-40 s plus ~3 s to start the
relay (well under 2 minutes).

Run: ``PYTHONPATH=. .venv/bin/python bench/relay_webhook_intake.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _relay import FAKE_SITE, RelayBench, webhook_body


def intake_round(bench: RelayBench, events: int, clients: int, lockouts: list[bool],
                 ver_ms: int) -> float:
    """Seconds to have ``events`` deliveries accepted by ``clients`` threads.

    ``lockouts[u]`` is unit ``u``'s lockout, flipped by each event for it; client ``c``
    owns the units ``u`` with ``u % clients == c``, so each unit's events go in order.
    """
    per_client = events // clients
    failures: list[str] = []

    def client(index: int) -> None:
        owned = range(index, len(lockouts), clients)
        with httpx.Client(base_url=bench.url, timeout=30) as http:
            for i in range(per_client):
                unit = owned[i % len(owned)]
                lockouts[unit] = not lockouts[unit]
                body = webhook_body(f"unit_{unit:03d}",
                                    "overlocked" if lockouts[unit] else "occupied", FAKE_SITE,
                                    ver_ms + index * per_client + i,
                                    "evt_" + secrets.token_hex(8))
                answer = http.post(bench.webhook_path(), content=body,
                                   headers={"X-Stora-Signature": bench.sign(body)})
                if answer.status_code != 200 or answer.json().get("outcome") != "command":
                    failures.append(f"{answer.status_code} {answer.text}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} deliveries not taken as commands, e.g. "
                         f"{failures[0]}\n{bench.log()}")
    return elapsed


def raw_round(path: Path, events: int) -> float:
    """Seconds for ``events`` single-row commits, plain sqlite3."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS d (id INTEGER PRIMARY KEY, event TEXT, "
                 "body TEXT, at REAL)")
    body = "x" * 400
    began = time.perf_counter()
    for _ in range(events):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO d (event, body, at) VALUES (?, ?, ?)",
                     ("evt_" + secrets.token_hex(8), body, time.time()))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return elapsed


def main() -> None:
    """Run both sides and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--units", type=int, default=50)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if args.units < args.clients:
        raise SystemExit("--units must be at least --clients")
    lockouts = [False] * args.units
    a: list[float] = []
    b: list[float] = []
    parent = Path(args.dir) if args.dir else None
    with RelayBench(sites=(FAKE_SITE,), parent=parent) as bench, \
            tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        gateway = bench.gateway((FAKE_SITE,))
        raw = Path(tmp) / "raw.db"
        ver_ms = int(time.time() * 1000) - 3_600_000
        intake_round(bench, 100, args.clients, lockouts, ver_ms)
        raw_round(raw, 100)
        for _ in range(args.rounds):
            ver_ms += 100_000
            a.append(intake_round(bench, args.per_round, args.clients, lockouts, ver_ms))
            b.append(raw_round(raw, args.per_round))
        commands = gateway.count
    n = args.per_round * args.rounds
    rate_a, rate_b = n / sum(a), n / sum(b)
    ratio = statistics.median(bs / as_ for as_, bs in zip(a, b, strict=True))
    print(f"webhook intake (HTTP, {args.clients} clients, one relay process on SQLite): "
          f"{rate_a:,.0f} events/s accepted durably "
          f"(rounds {args.per_round / max(a):,.0f}-{args.per_round / min(a):,.0f}/s)")
    print(f"raw SQLite commit loop (same disk):                              "
          f"{rate_b:,.0f} commits/s (rounds {args.per_round / max(b):,.0f}-"
          f"{args.per_round / min(b):,.0f}/s)")
    print(f"intake / raw: {rate_a / rate_b:.2f} (median of per-pair ratios {ratio:.2f}); "
          f"{commands} commands reached the fake gateway")


if __name__ == "__main__":
    main()
