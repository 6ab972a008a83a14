"""Webhook intake throughput: signed ``unit.updated`` deliveries accepted durably per
second, next to a raw SQLite commit loop on the same disk.

**A (intake)**: the relay's app on uvicorn (one process, the SQLite default: WAL,
``synchronous=FULL``, every transaction ``BEGIN IMMEDIATE``), ``--clients`` threads
posting signed deliveries over HTTP keep-alive connections, each a new event for one of
``--units`` units of a registered site, so every one writes its dedupe row, the unit's
state and a signed lockout or clear (a command row) in one transaction before its 200.
The rate is 200s per second of wall time.

**B (raw)**: one ``INSERT`` of a delivery-sized row plus ``COMMIT`` per event, plain
``sqlite3``, WAL, ``synchronous=FULL``, in the same directory: the floor any durable
intake pays on this disk.

Rounds alternate A, B (``--rounds``, ``--per-round`` events each, after a warm-up of
each), so both see the same disk and machine load; printed: each side's rate over its
rounds and the median of per-pair ratios.

Run: ``PYTHONPATH=. .venv/bin/python bench/relay_webhook_intake.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import secrets
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from relay.operators import StoraSite
from relay.stora import TokenSet
from relay.webhooks import sign
from sitelink.payloads import rfc3339
from tests.support.relay import RelayServer, relay_on_disk

SITE = "site_bench"


def intake_round(url: str, key: str, secret: str, events: int, clients: int, units: int,
                 start_ms: int) -> float:
    """Seconds to have ``events`` deliveries accepted by ``clients`` threads."""
    per_client = events // clients
    failures: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(per_client):
                n = index * per_client + i
                body = json.dumps({"event": {
                    "id": "evt_" + secrets.token_hex(8), "type": "unit.updated",
                    "data": {"unit": {"id": f"unit_{n % units}",
                                      "status": "overlocked" if n % 2 else "occupied",
                                      "site": {"id": SITE},
                                      "updated_at": rfc3339((start_ms + n) / 1000)}}}}).encode()
                answer = http.post(f"/webhooks/stora/{key}", content=body, headers={
                    "X-Stora-Signature": sign(secret, int(time.time()), body)})
                if answer.status_code != 200:
                    failures.append(answer.text)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} deliveries refused, e.g. {failures[0]}")
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
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        relay = relay_on_disk(directory / "relay")
        services = relay.services()
        op = services.operators.connect(TokenSet("at", "rt", 7200, "", 0),
                                        [StoraSite(SITE, "Bench")])
        secret = secrets.token_hex(32)
        services.operators.set_webhook(op, "we_bench", secret)
        services.sites.add(SITE, op)
        key = services.operators.webhook_key(op)
        a: list[float] = []
        b: list[float] = []
        with RelayServer(services) as server:
            start = 1_780_000_000_000
            intake_round(server.url, key, secret, 100, args.clients, args.units, start)
            raw_round(directory / "raw.db", 100)
            for r in range(args.rounds):
                start += 1_000_000
                a.append(intake_round(server.url, key, secret, args.per_round, args.clients,
                                      args.units, start + r))
                b.append(raw_round(directory / "raw.db", args.per_round))
        services.close()
    n = args.per_round * args.rounds
    rate_a, rate_b = n / sum(a), n / sum(b)
    ratio = statistics.median(bs / as_ for as_, bs in zip(a, b, strict=True))
    print(f"webhook intake (HTTP, {args.clients} clients, one relay process on SQLite): "
          f"{rate_a:,.0f} events/s accepted durably "
          f"(rounds {args.per_round / max(a):,.0f}-{args.per_round / min(a):,.0f}/s)")
    print(f"raw SQLite commit loop (same disk):                              "
          f"{rate_b:,.0f} commits/s (rounds {args.per_round / max(b):,.0f}-"
          f"{args.per_round / min(b):,.0f}/s)")
    print(f"intake / raw: {rate_a / rate_b:.2f} (median of per-pair ratios {ratio:.2f})")


if __name__ == "__main__":
    main()
