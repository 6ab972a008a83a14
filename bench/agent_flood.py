"""Legitimate-command latency while invalid messages flood the command topic.

Same site as bench/agent_latency.py (real Mosquitto, the agent as a real subprocess, a
simulated Modbus board with 16 locks on a pty in this process).  A second process, the
flooder, connects to the broker as another client and publishes invalid messages to
``P/S/cmd`` at ``--rate`` per second (10,000 by default) for ``--seconds`` (20), half
QoS 0 and half QoS 1, cycling through a pool of pre-made payloads in equal thirds:

* garbage: random bytes, empty, JSON that is not a token, dotted junk, 5 KiB blobs;
* bad signatures: forged with another key under the trusted kid, a valid token with a
  bit flipped in its signature, an unknown kid, ``alg`` none/HS256;
* expired: validly signed by the trusted key, expired five minutes ago (so each costs
  the agent a full Ed25519 verification).

The flooder speaks MQTT 3.1.1 over a raw socket with pre-encoded packets, so it can hold
the rate without needing the CPU the agent and the broker compete for.  Meanwhile
``--legit`` (200) signed commands are published (QoS 1) evenly over the flood, unlock
and lock alternating over the 16 locks; each one's latency is measured as in
bench/agent_latency.py (publish → the simulator receiving the coil write).

Reported: the achieved flood rate (sent by the flooder, and what reached the agent),
legitimate p50/p99 (target p99 <= 100 ms), the agent's peak RSS (VmHWM of the agent
subprocess, plus VmRSS sampled during the flood), the messages the link dropped
(``inbound_dropped`` of ``status``) and the broker dropped (``$SYS``), the agent's CPU
time, and every legitimate command lost or not ``done``.

``--acl`` is not the acceptance run: it repeats the flood against a broker with
passwords and an ACL under which only the relay's account may publish on ``P/S/cmd``,
the flooder logging in as another account, to show the deployment fix for what the
plain run finds.

Run: ``PYTHONPATH=. .venv/bin/python bench/agent_flood.py [--rate 10000 --seconds 20]
[--acl]``
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _site import (
    ACCOUNTS,
    CMD_TOPIC,
    RESULT_TOPIC,
    ROOT,
    BenchSite,
    Recorder,
    cpu_seconds,
    ms,
    percentile,
    proc_status,
)

from devkit.signer import CommandSigner, generate_keypair

TARGET_P99_S = 0.100
POOL = 3000
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"


# --------------------------------------------------------------------------- payloads


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _garbage(rng: random.Random, i: int) -> bytes:
    kind = i % 6
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return b"" if i % 12 == 1 else b" \n"
    if kind == 2:
        return json.dumps({"cmd": "unlock", "unit": "unit_100", "n": i}).encode()
    if kind == 3:
        return b".".join(_b64(rng.randbytes(rng.randrange(1, 60))) for _ in range(3))
    if kind == 4:
        return b"A" * 5000  # over the 4 KiB limit
    return b"eyJhbGciOiJFZERTQSJ9." + _b64(rng.randbytes(40)) + b".!!"


def _bad_signature(signer: CommandSigner, forger: CommandSigner, rng: random.Random,
                   i: int) -> bytes:
    kind = i % 4
    if kind == 0:  # a forged token under the trusted kid
        return forger.command("unlock", "unit_100")[1]
    if kind == 1:  # a valid token with one bit of its signature flipped
        token = bytearray(signer.command("unlock", "unit_101")[1])
        head, _, signature = bytes(token).rpartition(b".")
        raw = bytearray(base64.urlsafe_b64decode(signature + b"=="))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return head + b"." + _b64(bytes(raw))
    if kind == 2:  # a key the agent does not know
        return CommandSigner(forger._key, "evil-1", signer.site_id).command("unlock",
                                                                             "unit_102")[1]
    return signer.sign({"jti": f"x{i}", "aud": signer.site_id, "iat": int(time.time()),
                        "exp": int(time.time()) + 60, "cmd": "unlock", "unit": "unit_103"},
                       headers={"alg": "none" if i % 8 == 3 else "HS256"})


def make_forgeries(signer: CommandSigner, count: int, seed: int = 1) -> list[bytes]:
    """``count`` distinct forgeries that only the curve can refuse: the claims of a fresh
    unlock of a configured unit under the trusted kid, each with its own random
    64-byte signature, so no cache and no claim rule can stop one early."""
    rng = random.Random(seed)
    _, token = signer.command("unlock", "unit_100", ttl=300)
    head = token.rpartition(b".")[0]
    return [head + b"." + _b64(rng.randbytes(64)) for _ in range(count)]


def make_pool(signer: CommandSigner, count: int, seed: int = 1) -> list[bytes]:
    """``count`` invalid payloads: garbage, bad signatures and expired, in turn."""
    rng = random.Random(seed)
    forger = CommandSigner(generate_keypair()[0], signer.kid, signer.site_id)
    long_ago = int(time.time()) - 600
    pool = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            pool.append(_garbage(rng, i // 3))
        elif kind == 1:
            pool.append(_bad_signature(signer, forger, rng, i // 3))
        else:
            pool.append(signer.command("unlock", "unit_100", iat=long_ago, ttl=300)[1])
    return pool


# --------------------------------------------------------------------------- the flooder


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def flood_worker(host: str, port: int, topic: str, pool_path: Path, rate: float,
                 seconds: float, account: str | None) -> None:
    """Publish the pool round and round at ``rate`` per second; print a JSON summary.

    Raw MQTT 3.1.1 with pre-encoded packets, sent in batches every 2 ms.  A reader
    thread drains the broker's PUBACKs (4 bytes each) and counts them.
    """
    data = pool_path.read_bytes()
    payloads: list[bytes] = []
    at = 0
    while at < len(data):
        (size,) = struct.unpack_from(">I", data, at)
        payloads.append(data[at + 4:at + 4 + size])
        at += 4 + size
    topic_bytes = _string(topic.encode())
    packets: list[tuple[bytes, bytes, int]] = []  # (fixed header + topic, payload, qos)
    for i, payload in enumerate(payloads):
        qos = i % 2
        length = len(topic_bytes) + (2 if qos else 0) + len(payload)
        packets.append((bytes([0x30 | qos << 1]) + _varint(length) + topic_bytes, payload, qos))
    sock = socket.create_connection((host, port))
    flags = 0x02 if account is None else 0xC2  # clean session (+ user name, password)
    variable = _string(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 60)
    body = variable + _string(f"bench-flood-{os.getpid()}".encode())
    if account is not None:
        body += _string(account.encode()) + _string(ACCOUNTS[account].encode())
    sock.sendall(bytes([0x10]) + _varint(len(body)) + body)
    connack = sock.recv(4)
    if connack[:1] != b"\x20" or connack[3:4] != b"\x00":
        raise SystemExit(f"flooder: CONNACK refused: {connack!r}")
    received = [0]

    def drain() -> None:
        while chunk := sock.recv(65536):
            received[0] += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    sent = qos1 = nbytes = 0
    pid = 0
    started = time.monotonic()
    print(json.dumps({"started": started}), flush=True)
    end = started + seconds
    while (now := time.monotonic()) < end:
        due = min(int((now - started) * rate) - sent, 2000)
        batch = []
        for _ in range(max(due, 0)):
            head, payload, qos = packets[sent % len(packets)]
            if qos:
                pid = pid % 65535 + 1
                batch.append(head + struct.pack(">H", pid) + payload)
                qos1 += 1
            else:
                batch.append(head + payload)
            sent += 1
        if batch:
            chunk = b"".join(batch)
            sock.sendall(chunk)
            nbytes += len(chunk)
        time.sleep(0.002)
    elapsed = time.monotonic() - started
    print(json.dumps({"ended": time.monotonic()}), flush=True)
    time.sleep(1.0)  # let the last PUBACKs come in
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.shutdown(socket.SHUT_WR)
    reader.join(timeout=5)
    sock.close()
    print(json.dumps({"sent": sent, "qos1": qos1, "bytes": nbytes, "elapsed": elapsed,
                      "pubacks": received[0] // 4}), flush=True)


# --------------------------------------------------------------------------- the benchmark


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_kb = max(self.peak_kb, proc_status(self.pid).get("VmRSS", 0))

    def stop(self) -> int:
        """Stop sampling; the highest VmRSS seen, in kB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--legit", type=int, default=200)
    parser.add_argument("--acl", action="store_true",
                        help="broker ACL: only the relay may publish commands (the fix)")
    parser.add_argument("--forgeries", action="store_true",
                        help="worst case: every message a distinct well-formed forgery "
                             "(not the acceptance mix)")
    parser.add_argument("--flood-worker", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_worker:
        host, port, topic, pool, rate, seconds, account = args.flood_worker
        flood_worker(host, int(port), topic, Path(pool), float(rate), float(seconds),
                     None if account == "-" else account)
        return
    with BenchSite(boards=1, coils=16, inputs=16, broker_conf=["sys_interval 1"],
                   acl=args.acl) as site:
        if args.forgeries:
            print("--forgeries: every flood message is a distinct, fresh, well-formed "
                  "forgery, refused only by the signature check (NOT the acceptance mix)")
        if args.acl:
            print("--acl: broker ACL, the flooder logs in as 'intruder' (NOT the acceptance "
                  "run; it shows the proposed fix)")
        run(site, args.rate, args.seconds, args.legit, forgeries=args.forgeries)


def run(site: BenchSite, rate: float, seconds: float, legit: int, *,
        forgeries: bool = False) -> None:
    """The flood, the legitimate commands, and the report."""
    pool_path = site.directory / "flood.bin"
    pool = (make_forgeries(site.signer, int(rate * seconds) + 1) if forgeries
            else make_pool(site.signer, POOL))
    pool_path.write_bytes(b"".join(struct.pack(">I", len(p)) + p for p in pool))
    publisher = site.publisher()
    recorder = site.recorder([RESULT_TOPIC, SYS_DROPPED], "flood")
    before = site.status()
    pid = site.pid
    hwm_before = proc_status(pid)["VmHWM"]
    dropped_before = _sys_dropped(recorder, wait=3.0)
    worker = subprocess.Popen(
        [sys.executable, __file__, "--flood-worker", site.broker.host, str(site.broker.port),
         CMD_TOPIC, str(pool_path), str(rate), str(seconds), "intruder" if site.acl else "-"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert worker.stdout is not None
        started = float(json.loads(worker.stdout.readline())["started"])
        cpu_before, cpu_wall_before = cpu_seconds(pid), time.monotonic()
        sampler = RssSampler(pid)
        sent: list[tuple[str, Any, bool, float]] = []  # jti, unit, unlock?, published at
        span = seconds - 1.0
        for i in range(legit):
            unit = site.units[i % len(site.units)]
            unlock = (i // len(site.units)) % 2 == 0
            jti, token = site.signer.command("unlock" if unlock else "lock", unit.unit,
                                             dur=3600 if unlock else None, actor="bench")
            time.sleep(max(0.0, started + 0.5 + span * i / legit - time.monotonic()))
            at = time.perf_counter()
            publisher.publish(CMD_TOPIC, token, qos=1, timeout=30)
            sent.append((jti, unit, unlock, at))
        json.loads(worker.stdout.readline())  # {"ended": ...}: the flood is over
        peak_sampled = sampler.stop()
        hwm = proc_status(pid)["VmHWM"]
        cpu_flood = (cpu_seconds(pid) - cpu_before, time.monotonic() - cpu_wall_before)
        at_end = site.status()
        flood_out, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    flood = json.loads(flood_out.strip().splitlines()[-1])
    recorder.wait_until(lambda: all(jti in recorder.results for jti, *_ in sent), 20.0)
    after = site.status()
    dropped_after = _sys_dropped(recorder, wait=2.5)
    latencies, lost, not_done = [], [], []
    for jti, unit, unlock, at in sent:
        found = recorder.results.get(jti)
        if found is None:
            lost.append(jti)
            continue
        if found[1]["status"] != "done":
            not_done.append(f"{jti}: {found[1]['status']}/{found[1]['reason']}")
            continue
        written = site.watch.first(unit, unlock, at)
        if written is None:
            not_done.append(f"{jti}: done but no coil write seen")
            continue
        latencies.append(written - at)
    report(rate, seconds, legit, flood, (before, at_end, after), latencies, lost, not_done,
           (hwm_before, peak_sampled, hwm), cpu_flood, (dropped_before, dropped_after),
           site.watch.count)


def _sys_dropped(recorder: Recorder, wait: float) -> int | None:
    """The broker's ``$SYS`` dropped-publish counter, after its next update."""
    count = len(recorder.other.get(SYS_DROPPED, []))
    recorder.wait_until(lambda: len(recorder.other.get(SYS_DROPPED, [])) > count, wait)
    values = recorder.other.get(SYS_DROPPED, [])
    return int(values[-1][1]) if values else None


def report(rate: float, seconds: float, legit: int, flood: dict[str, Any],
           statuses: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
           latencies: list[float], lost: list[str], not_done: list[str],
           rss: tuple[int, int, int], cpu_flood: tuple[float, float],
           sys_dropped: tuple[int | None, int | None], writes: int) -> None:
    """Print the figures (statuses: before the flood, at its end, after the drain)."""
    before, at_end, after = statuses

    def delta(section: str, key: str, until: dict[str, Any] = after) -> int:
        return int(until[section][key]) - int(before[section][key])

    hwm_before, peak_sampled, hwm = rss
    achieved = flood["sent"] / flood["elapsed"]
    reached = delta("commands", "received")
    during = delta("commands", "received", at_end)
    link_dropped = delta("broker", "inbound_dropped")
    print(f"flood: asked {rate:,.0f}/s for {seconds:g} s; flooder sent {flood['sent']:,} "
          f"({flood['qos1']:,} QoS 1, {flood['bytes'] / 1e6:.1f} MB) in "
          f"{flood['elapsed']:.1f} s = {achieved:,.0f}/s; broker PUBACKs {flood['pubacks']:,}")
    print(f"agent: handled {reached:,} messages ({during:,} by the flood's end: "
          f"{during / cpu_flood[1]:,.0f}/s), rejected {delta('commands', 'rejected'):,}, executed "
          f"{delta('commands', 'executed')}; link inbound_dropped {link_dropped:,}, "
          f"inbox peak {after['broker']['inbound_queued_peak']}")
    print(f"agent shedding: {delta('commands', 'refused_again'):,} refused again from the "
          f"cache of refused payloads, {delta('commands', 'shed'):,} shed on their claims "
          f"before the signature check")
    b0, b1 = sys_dropped
    broker_dropped = "n/a" if b0 is None or b1 is None else f"{b1 - b0:,}"
    unaccounted = flood["sent"] + legit - reached - link_dropped
    print(f"broker: $SYS publish/messages/dropped during the run {broker_dropped}; sent but "
          f"never delivered to the agent (dropped by the broker or refused by its ACL): "
          f"{unaccounted:,}")
    print(f"agent CPU during the flood: {cpu_flood[0]:.1f} s in {cpu_flood[1]:.1f} s "
          f"({cpu_flood[0] / cpu_flood[1] * 100:.0f} % of a core)")
    print(f"agent memory: VmHWM before {hwm_before / 1024:.1f} MB, VmRSS peak sampled during "
          f"the flood {peak_sampled / 1024:.1f} MB, VmHWM after {hwm / 1024:.1f} MB")
    print(f"legitimate: {legit} sent, {len(latencies)} done with a coil write, "
          f"{len(lost)} LOST (no result at all), {len(not_done)} not done; coil writes {writes}")
    for line in not_done[:10]:
        print(f"  not done: {line}")
    if latencies:
        p50, p99 = statistics.median(latencies), percentile(latencies, 99)
        verdict = "met" if p99 <= TARGET_P99_S and not lost and not not_done else "MISSED"
        print(f"legitimate latency (publish -> coil write): p50 {ms(p50)}, p99 {ms(p99)}, "
              f"max {ms(max(latencies))}; target p99 <= 100 ms with none lost: {verdict}")
    else:
        print("legitimate latency: no command executed; target MISSED")


if __name__ == "__main__":
    main()
