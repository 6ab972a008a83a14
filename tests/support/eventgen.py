"""The process the outbox kill -9 test kills: the agent's event path, nothing else.

tests/gateway/outbox/test_outbox_kill.py starts, kills (``SIGKILL``) and restarts this
hundreds of times.  A full agent (broker link, control socket, drivers) takes too long to
start for that, so
the child runs only the production pieces that write and deliver Timeline Events, wired
as ``gateway/agent.py`` wires them:

* ``UnitManager`` (gateway/units/manager.py) executes ``lock`` and ``unlock`` commands, each in
  its real transactions: claim, then outcome + unit state + Timeline Event record; unlocks
  schedule relocks, which record events of their own.  The controllers are in memory and
  always confirm, so every command records its event.
* ``Store.recover_interrupted`` with ``UnitManager.audit_interrupted`` at start, as
  ``Agent.recover`` does: a command a kill interrupted gets its "outcome unknown" event.
* ``build_drainer`` (gateway/outbox/drainer.py) delivers the outbox over real HTTP to the sandbox
  running in the test process, woken by ``Store.on_events_added``.

Starting Python and importing httpx, sqlite3 and the gateway costs ~0.2 s a process, more
than the life of most children here.  So a *zygote* (``python -m tests.support.eventgen``)
imports everything once and forks one child per life (it has no threads, so fork is
safe).  Protocol, one JSON object a line: stdin ``{"op": "spawn", "spec": {...}}`` answers
``{"pid": n}``; ``{"op": "reap", "pid": n}`` waits for that child and answers
``{"pid": n, "signal": s, "code": c}``; EOF ends the zygote.  The test kills children
by pid; the zygote is their parent, so a pid cannot be reused before it is reaped.

The child reports each committed event by appending ``"<external_id> <jti> <how>\\n"``
to ``spec["report"]`` with one ``write(2)`` *after* the command's outcome transaction
has returned: a line in that file is an event the store acknowledged as committed.  It
also keeps a two-byte *phase* file (mmap) saying what each thread was doing, so the test
can tell where its kills landed: byte 0 the unit side, byte 1 the drainer thread
(see :data:`PHASES`).  The marks are observers only; the code under test is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from drivers.base import ActionResult, Controller, DoorState, Health, LockPoint, LockState, Reading
from gateway.config import load_config
from gateway.intake.commands import Command
from gateway.outbox.drainer import build_drainer
from gateway.outbox.timeline import external_id_for
from gateway.stora.client import make_http_client
from gateway.store import Store
from gateway.units.hardware import Site
from gateway.units.manager import UnitManager

#: What a phase byte means: byte 0 the unit side, byte 1 the drainer (``-`` until it
#: starts).  An upper-case letter is the COMMIT (with its fsync) of a transaction begun in
#: the lower-case phase.
PHASES: Final = {
    "-": "not started yet (the fork, the imports already done)",
    "o": "starting: open, quick_check, WAL recovery, audit of interrupted commands",
    "b": "starting: building the HTTP client (its TLS context, ~30 ms; no I/O on the store)",
    "i": "unit side idle, between commands",
    "x": "executing a command or a relock (transaction bodies, the in-memory door)",
    "w": "drainer waiting",
    "r": "drainer reading the outbox, freezing a body",
    "p": "HTTP POST in flight (the send-history write included)",
    "s": "bookkeeping after the answer (the settle transaction)",
    "d": "stopping after the final drain",
}
KID: Final = "test-2026"
UNLOCK_SECONDS: Final = 1


def command_for(run: int, n: int) -> tuple[str, str, str]:
    """The ``n``-th command of life ``run``: (jti, cmd, unit), the same in every process."""
    digest = hashlib.sha256(f"{run}/{n}".encode()).digest()
    units = ("unit_a101", "unit_a102", "unit_a103", "unit_b201", "unit_b202")
    cmd = "unlock" if digest[0] < 77 else "lock"  # about 30 % unlocks
    return f"kill-{run}-{n}", cmd, units[digest[1] % len(units)]


def event_id(site: str, jti: str, cmd: str) -> str:
    """The external id of the event a finished ``cmd`` records (gateway/units/manager.py)."""
    return external_id_for(site, jti, "unlocked" if cmd == "unlock" else "locked")


# --------------------------------------------------------------------------- the child


class MemoryController(Controller):
    """A controller whose doors always do what they are told, at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._locked: dict[int, bool] = {}

    def _reading(self, point: LockPoint) -> Reading:
        locked = self._locked.get(point.channel, True)
        return Reading(LockState.LOCKED if locked else LockState.UNLOCKED, DoorState.CLOSED,
                       time.monotonic())

    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        self._locked[point.channel] = False
        return ActionResult(True, self._reading(point))

    def lock(self, point: LockPoint) -> ActionResult:
        self._locked[point.channel] = True
        return ActionResult(True, self._reading(point))

    def read(self, point: LockPoint) -> Reading:
        return self._reading(point)

    def health(self) -> Health:
        return Health(True, "in memory")

    def probe(self) -> Health:
        return Health(True, "in memory")


class Phases:
    """Two bytes in a shared file: what the unit side (the command thread, the unit
    workers and the relock timer) and the drainer are doing."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 2)
        finally:
            os.close(fd)
        self._slot = threading.local()

    def claim(self, slot: int) -> None:
        """The calling thread writes byte ``slot`` from now on."""
        self._slot.n = slot

    def peek(self) -> str:
        """The calling thread's phase."""
        return chr(self._map[getattr(self._slot, "n", 0)])  # the unit threads share byte 0

    def set(self, phase: str) -> None:
        """Mark the calling thread's phase."""
        self._map[getattr(self._slot, "n", 0)] = ord(phase)


def _observe(store: Store, drainer: Any, phases: Phases) -> None:
    """Wrap the instances' methods with phase marks (behaviour unchanged)."""
    transaction = store.transaction

    @contextlib.contextmanager
    def traced() -> Iterator[Any]:
        before = ""
        with transaction() as tx:
            yield tx
            before = phases.peek()
            phases.set(before.upper())  # the block ended: COMMIT (and its fsync) runs next
        if before:
            phases.set(before)

    store.transaction = traced  # type: ignore[method-assign]

    step, post = drainer.step, drainer.client.post_event

    def traced_step() -> float:
        phases.claim(1)
        phases.set("r")
        try:
            return float(step())
        finally:
            phases.set("w")

    def traced_post(*args: Any, **kwargs: Any) -> Any:
        phases.set("p")
        try:
            return post(*args, **kwargs)
        finally:
            phases.set("s")

    drainer.step = traced_step
    drainer.client.post_event = traced_post


def run_child(spec: dict[str, Any]) -> int:
    """One life: start like the agent, then generate (``mode`` "generate", until killed)
    or drain until nothing is pending and stop cleanly (``mode`` "drain"); exit status."""
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, force=True,
                        format=f"[life {spec['run']}] %(asctime)s %(name)s %(levelname)s "
                               "%(message)s")
    random.seed(spec["seed"])
    phases = Phases(Path(spec["phases"]))
    phases.claim(0)
    phases.set("o")
    report = os.open(spec["report"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    config = load_config(spec["config"])
    site = Site(config, controllers={c.name: MemoryController(c.name)
                                     for c in config.controllers})
    store = Store(config.storage.path)
    units = UnitManager(config, site, store, now=time.time, publish_unit=lambda *a: None,
                        alarm=lambda *a: None)
    units.start()
    store.recover_interrupted(time.time(), units.audit_interrupted)
    phases.set("b")
    drainer = build_drainer(config, store)
    _observe(store, drainer, phases)
    store.on_events_added = lambda count: drainer.wake()
    drainer.start()

    if spec["mode"] == "drain":
        return _drain(store, units, drainer, phases, spec.get("timeout_s", 30.0))

    def execute(jti: str, cmd: str, unit: str, how: str) -> None:
        now = time.time()
        command = Command(jti=jti, cmd=cmd, unit=unit, kid=KID, iat=int(now),
                          exp=int(now) + 300, dur=UNLOCK_SECONDS if cmd == "unlock" else None,
                          actor="kill test")
        phases.set("x")
        outcome = units.submit(command, received_at=now).result()
        # "done": this command recorded its event; a duplicate's stored "done" or
        # "unknown" (audited at start) means an earlier life did.  Either way committed.
        if outcome.status in ("done", "unknown"):
            tag = f"{how}-duplicate" if outcome.duplicate else how
            line = f"{event_id(config.site.id, jti, cmd)} {jti} {tag}\n".encode()
            os.write(report, line)
        else:
            os.write(report, f"- {jti} {outcome.status}:{outcome.reason}\n".encode())
        phases.set("i")

    redo = spec.get("redo")
    if redo:  # the command the last life may have been running, delivered again
        execute(redo[0], redo[1], redo[2], how="redo")
    pause = spec.get("pause_s", 0.0)
    for n in range(1, 1 << 30):
        jti, cmd, unit = command_for(spec["run"], n)
        execute(jti, cmd, unit, how="fresh")
        if pause:
            time.sleep(random.uniform(0, 2 * pause))
    return 0


def _drain(store: Store, units: UnitManager, drainer: Any, phases: Phases,
           timeout_s: float) -> int:
    """Wait for the due relocks and for an empty outbox, then stop as the agent does."""
    deadline = time.monotonic() + timeout_s

    def settled() -> bool:
        return (all(row.relock_at is None for row in store.units())
                and store.outbox_summary(time.time())["pending"] == 0)

    while not settled():
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.05)
    phases.set("d")
    units.stop()  # no door waits for a relock any more, so this records nothing
    drainer.stop()
    pending = store.outbox_summary(time.time())["pending"]
    store.close()
    return 0 if pending == 0 else 4


# --------------------------------------------------------------------------- the zygote


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def zygote() -> int:
    """Fork a child per ``spawn`` request; reap on ``reap``; end at EOF."""
    # OpenSSL initializes itself at the first TLS context of a process (~60 ms more than
    # any later one); done here, once, every child inherits it, as it does the imports.
    make_http_client().close()
    _reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_child(request["spec"])
                except BaseException:  # reported through the exit status and the log
                    logging.getLogger(__name__).exception("the child failed")
                    code = 2
                finally:
                    os._exit(code)
            _reply({"pid": pid})
        elif request["op"] == "reap":
            _, status = os.waitpid(request["pid"], 0)
            _reply({"pid": request["pid"],
                    "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})
    return 0


if __name__ == "__main__":
    sys.exit(zygote())
