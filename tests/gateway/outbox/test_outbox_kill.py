"""kill -9 at hundreds of random points while events are generated and drained (issue 4,
fault matrix #21).

The guarantee, counted at the server: every Timeline Event the store acknowledged as
committed reaches the sandbox exactly once (by ``external.id``), none arrives twice,
nothing is dead-lettered, and ``PRAGMA integrity_check`` says ``ok`` after every kill.

The child (tests/support/eventgen.py) runs the production event path: ``UnitManager``
executes lock and unlock commands in the store's real transactions (outcome, unit state
and Timeline Event together), relocks record their own events, ``recover_interrupted``
audits what a kill interrupted, and the real drainer posts over real HTTP to the sandbox
in this process, which survives the kills.  The harness counts an event as committed only
once the child has appended its id to the report file, after the transaction returned.
Each life is killed with ``SIGKILL`` after a random delay, from "before the store is even
open" to "well into generating and draining"; the child's phase bytes say where each kill
landed, and the test requires kills in the commits, the HTTP posts and the bookkeeping
after a post.  After each kill the database with its WAL is copied as the kill left it
(checking it in place would checkpoint the WAL and spare the next life its recovery) and
checked; the ids that life reported must be in it.  Each new life first re-runs the
command the last one may have been running, as a broker redelivers an unacknowledged
command.  A fifth of the lives meet a slow sandbox, so a kill can leave a request the
server is still processing when the next life sends the same key ("409 in progress").  A
last life only drains, then stops cleanly.  (This test found that the sandbox stored an
answer for a request whose body never arrived whole; it now ignores such a request, as a
real HTTP server does: ``test_sandbox_ignores_a_request_whose_body_was_cut``.)

``OUTBOX_KILLS`` (default 300) and ``OUTBOX_KILL_SEED`` (default random, printed) let a
soak run go further or replay a failure.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from devkit.sandbox import Sandbox, max_in_window
from devkit.signer import generate_keypair
from devkit.site import ROOT, STORA_TOKEN, write_agent_config
from tests.support.eventgen import PHASES, command_for

KILLS = int(os.environ.get("OUTBOX_KILLS", "300"))
#: Requests a second (and x60 a minute), the sandbox's and the client's alike: high
#: enough that the drain keeps up with the generator.
RATE = 2_000
#: When a life is killed: a share of the kills land 0-20 ms after the fork, while the store
#: opens and recovers; the others 0-100 ms after its drainer started, while it generates
#: and drains (building the HTTP client in between takes ~30 ms and touches nothing).
EARLY_KILLS, EARLY_S, STEADY_S = 0.15, 0.02, 0.1
#: A share of the lives meet a slow Stora (each request takes SLOW_S): a kill then leaves
#: a request the server is still processing when the next life sends the same key, which
#: must be answered "409 in progress" and retried, never dead-lettered.
SLOW_LIVES, SLOW_S = 0.2, 0.2
#: The generator's mean pause between commands (s): the drain, three fsyncs and one
#: POST an event, must keep up with it.
PAUSE_S = 0.004


class Zygote:
    """``python -m tests.support.eventgen``: forks the children, reaps them."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.eventgen"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self._call(None) == {"ready": True}

    def _call(self, request: dict[str, Any] | None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote died ({self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def spawn(self, spec: dict[str, Any]) -> int:
        return int(self._call({"op": "spawn", "spec": spec})["pid"])

    def reap(self, pid: int) -> dict[str, Any]:
        return self._call({"op": "reap", "pid": pid})

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@dataclass
class Harness:
    """The files a life shares with the test, and what the test learnt from them."""

    directory: Path
    db: Path
    report: Path = field(init=False)
    phases: Path = field(init=False)
    offset: int = 0
    #: external id -> the jti whose commit reported it, in report order.
    committed: dict[str, str] = field(default_factory=dict)
    how: collections.Counter[str] = field(default_factory=collections.Counter)
    odd_outcomes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.report = self.directory / "committed.txt"
        self.phases = self.directory / "phases"
        self.report.touch()

    def reset_phases(self) -> None:
        self.phases.write_bytes(b"--")

    def read_phases(self) -> str:
        return self.phases.read_bytes().decode()

    def wait_started(self, timeout: float = 10.0) -> float:
        """Until the life's drainer runs (its phase byte is set); the monotonic time."""
        deadline = time.monotonic() + timeout
        while self.read_phases()[1] == "-" and time.monotonic() < deadline:
            time.sleep(0.002)
        return time.monotonic()

    def new_reports(self) -> list[tuple[str, str, str]]:
        """Complete report lines appended since the last call: (id, jti, how)."""
        with self.report.open("rb") as fp:
            fp.seek(self.offset)
            data = fp.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        lines = []
        for raw in data[:end].decode().splitlines():
            ext, jti, how = raw.split(" ")
            if ext == "-":
                self.odd_outcomes.append(f"{jti}: {how}")
                continue
            self.committed.setdefault(ext, jti)
            self.how[how] += 1
            lines.append((ext, jti, how))
        return lines

    def check_copy(self, reported: list[str]) -> tuple[str, list[str]]:
        """integrity_check of the database as the kill left it, and the reported ids it
        lacks.  On a copy: a connection here would checkpoint the WAL when closed."""
        check = self.directory / "check"
        shutil.rmtree(check, ignore_errors=True)
        check.mkdir()
        for suffix in ("", "-wal"):
            source = Path(f"{self.db}{suffix}")
            if source.exists():
                shutil.copyfile(source, check / f"gateway.db{suffix}")
        conn = sqlite3.connect(check / "gateway.db")
        try:
            verdict = "\n".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
            present = ({r[0] for r in conn.execute("SELECT external_id FROM events")}
                       if "events" in tables else set())  # killed before the migration
        finally:
            conn.close()
        return verdict, [e for e in reported if e not in present]


def _spec(h: Harness, config: Path, life: int, mode: str, redo: Any, seed: int) -> dict[str, Any]:
    return {"config": str(config), "report": str(h.report), "phases": str(h.phases),
            "log": str(h.directory / "children.log"), "run": life, "mode": mode,
            "redo": redo, "seed": seed, "pause_s": PAUSE_S}


@pytest.mark.timeout(max(240, KILLS))  # ~0.2 s a kill; a soak run takes longer
def test_kill_9_at_random_points_loses_and_duplicates_no_committed_event(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("OUTBOX_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    started = time.monotonic()
    with Sandbox(static_tokens={STORA_TOKEN}, max_per_second=RATE,
                 max_per_minute=RATE * 60) as sandbox:
        _, public = generate_keypair()
        config, _ = write_agent_config(
            tmp_path, SimpleNamespace(host="127.0.0.1", port=1),  # type: ignore[arg-type]
            # Ports that do not exist (the child never opens them), in /dev as a
            # config requires (drivers/ports.py).
            Path("/dev/ttyNOSUCH-MB"), Path("/dev/ttyNOSUCH-LB"), public,
            stora_url=sandbox.api_url,
            stora_limits=(RATE, RATE * 60))
        h = Harness(tmp_path, tmp_path / "state" / "gateway.db")
        h.db.parent.mkdir()
        zygote = Zygote(tmp_path / "zygote.log")
        integrity: list[str] = []
        lost_at_kill: list[str] = []
        early_exits: list[str] = []
        landed: collections.Counter[str] = collections.Counter()
        lifetimes: list[float] = []
        spent: dict[str, float] = collections.defaultdict(float)
        redo: tuple[str, str, str] | None = None
        pid = 0
        try:
            for life in range(1, KILLS + 1):
                h.reset_phases()
                early = rng.random() < EARLY_KILLS
                sandbox.set_slow(SLOW_S if rng.random() < SLOW_LIVES else 0)
                delay = rng.uniform(0, EARLY_S if early else STEADY_S)
                born = spawned = time.monotonic()
                pid = zygote.spawn(_spec(h, config, life, "generate", redo,
                                         rng.randrange(1 << 30)))
                spent["spawn"] += time.monotonic() - born
                if not early:
                    start = h.wait_started()
                    spent["start"] += start - born
                    born = start
                time.sleep(max(0.0, born + delay - time.monotonic()))
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                lifetimes.append(killed - spawned)
                ended = zygote.reap(pid)
                pid = 0
                spent["reap"] += time.monotonic() - killed
                if ended["signal"] != signal.SIGKILL:
                    early_exits.append(f"life {life}: {ended}")
                landed[h.read_phases()] += 1
                reports = h.new_reports()
                checked = time.monotonic()
                verdict, lost = h.check_copy([ext for ext, _, _ in reports])
                spent["check"] += time.monotonic() - checked
                if verdict != "ok":
                    integrity.append(f"life {life}: {verdict}")
                lost_at_kill += [f"life {life}: {ext}" for ext in lost]
                # The command this life may have been running when it died: the next
                # life receives it again, as a broker redelivers what was not acked.
                done = {jti for _, jti, _ in reports}
                if redo is not None and redo[0] not in done:
                    pass  # killed before it finished the redelivery: deliver it again
                else:
                    fresh = [int(jti.rsplit("-", 1)[1]) for _, jti, how in reports
                             if how == "fresh"]
                    redo = command_for(life, max(fresh, default=0) + 1)
            h.reset_phases()
            sandbox.set_slow(0)
            drain_started = time.monotonic()
            pid = zygote.spawn(_spec(h, config, KILLS + 1, "drain", None, 0))
            drained = zygote.reap(pid)
            drain_s = time.monotonic() - drain_started
            drained_pid, pid = pid, 0
        finally:
            if pid:  # the test failed with a life running: it must not outlive the test
                os.kill(pid, signal.SIGKILL)
                zygote.reap(pid)
            zygote.close()
        log = (tmp_path / "children.log").read_text(errors="replace")
        counts = sandbox.count_by_external_id()
        state = sandbox.state()
        times = sandbox.request_times()
        sandbox_requests = sandbox.requests

    conn = sqlite3.connect(h.db)
    try:
        final_integrity = conn.execute("PRAGMA integrity_check").fetchall()
        by_state = dict(conn.execute("SELECT state, count(*) FROM events GROUP BY state"))
        stored = {r[0] for r in conn.execute("SELECT external_id FROM events")}
        max_attempts = conn.execute("SELECT max(attempts) FROM events").fetchone()[0]
        retried = conn.execute("SELECT count(*) FROM events WHERE attempts > 1").fetchone()[0]
    finally:
        conn.close()

    missing = sorted(e for e in h.committed if counts.get(e, 0) == 0)
    duplicated = {e: n for e, n in counts.items() if n > 1}
    unit_side = collections.Counter(p[0] for p in landed.elements())
    drain_side = collections.Counter(p[1] for p in landed.elements())
    summary = [
        f"outbox kill -9: {KILLS} kills in {time.monotonic() - started:.1f} s (seed {seed}), "
        f"lives {min(lifetimes) * 1000:.0f}-{max(lifetimes) * 1000:.0f} ms (mean "
        f"{sum(lifetimes) / len(lifetimes) * 1000:.0f}); per kill, spawn "
        f"{spent['spawn'] / KILLS * 1000:.1f} ms, start {spent['start'] / KILLS * 1000:.1f} ms, "
        f"reap {spent['reap'] / KILLS * 1000:.1f} ms, "
        f"integrity check {spent['check'] / KILLS * 1000:.1f} ms",
        f"  final drain: {drain_s:.1f} s; committed and reported: {len(h.committed)} events "
        f"({dict(h.how)}); in the database: {len(stored)} ({by_state}); at the server: "
        f"{sum(counts.values())} events, {len(counts)} ids",
        f"  missing: {len(missing)}, duplicated at the server: {len(duplicated)}, integrity "
        f"failures: {len(integrity)}, reported but not in the database after a kill: "
        f"{len(lost_at_kill)}",
        f"  POSTs: {state['requests']}, answered by a replay: {state['replayed']}, "
        f"409 in progress: {sum(r.status == 409 for r in sandbox_requests)}, "
        f"events with more than one attempt: {retried}, max attempts: {max_attempts}",
        "  kills landed, unit side: " + ", ".join(
            f"{p} {n}" for p, n in sorted(unit_side.items())),
        "  kills landed, drainer: " + ", ".join(
            f"{p} {n}" for p, n in sorted(drain_side.items())),
        "  (" + "; ".join(f"{k}: {v}" for k, v in PHASES.items()) + "; upper case: that "
        "phase's COMMIT)",
    ]
    with capsys.disabled():
        print("\n" + "\n".join(summary))

    assert early_exits == [], f"lives that ended before their kill:\n{early_exits}\n{log[-4000:]}"
    assert drained == {"pid": drained_pid, "signal": None, "code": 0}, log[-4000:]
    assert integrity == [], integrity
    assert final_integrity == [("ok",)]
    assert lost_at_kill == [], lost_at_kill
    assert h.odd_outcomes == [], h.odd_outcomes
    assert len(h.committed) >= 3 * KILLS  # the lives did generate events
    # The guarantee: every committed event at the server exactly once, nothing else there.
    assert missing == [], f"{len(missing)} committed events never reached the server"
    assert duplicated == {}, f"{len(duplicated)} events created more than once"
    assert set(counts) == stored  # also the events no report named (killed before it)
    assert by_state == {"delivered": len(stored)}  # nothing pending, nothing dead
    assert state["body_mismatches"] == 0  # one body per Idempotency-Key, across lives
    assert max_in_window(times, 1.0) <= RATE
    assert max_in_window(times, 60.0) <= RATE * 60
    # The kills landed where it matters, not only in the sleep between commands.
    assert unit_side["X"] >= KILLS // 50, "too few kills in a unit transaction's commit"
    assert drain_side["p"] >= KILLS // 50, "too few kills with a POST in flight"
    assert drain_side["s"] + drain_side["S"] >= KILLS // 50, (
        "too few kills between an answer and its bookkeeping")
    assert unit_side["o"] + unit_side["O"] >= KILLS // 50, "too few kills at start"


def test_sandbox_ignores_a_request_whose_body_was_cut(sandbox: Sandbox) -> None:
    """A client killed between the headers and the body of its POST (httpx writes them
    separately) must not leave a stored answer under its Idempotency-Key: the retry
    after the restart must create the event, not get a 400 replayed."""
    import httpx

    body = json.dumps({"source": {"id": "tsrc_test"}, "external": {"id": "ev-1"}}).encode()
    headers = {"Authorization": f"Bearer {STORA_TOKEN}", "Content-Type": "application/json",
               "Idempotency-Key": "ev-1.0"}
    with socket.create_connection((sandbox.host, sandbox.port), timeout=5) as conn:
        conn.sendall(b"POST /2025-09/timeline/events HTTP/1.1\r\nHost: sandbox\r\n"
                     + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
                     + f"Content-Length: {len(body)}\r\n\r\n".encode())
        conn.shutdown(socket.SHUT_WR)  # no body: the client is gone
        while conn.recv(4096):  # until the server has dealt with it and closed
            pass
    retry = httpx.post(sandbox.api_url + "/timeline/events", content=body,
                       headers=headers, timeout=5)
    assert retry.status_code == 201, retry.text
    assert sandbox.count_by_external_id() == {"ev-1": 1}
