"""A technician's requests on the agent's own hardware: ``test``, ``scan`` and ``locks``.

Each runs on the units' queues or between the bus's transactions, reports progress
through the control call (gateway/ops/control_stream.py), and stops when the client
hangs up or the agent stops: the lock under test is relocked at once and no other is
started.  The agent loads this module (and gateway/ops/technician.py) on the first such
request: the lazy seam of gateway/ops/service.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Final

from drivers.errors import DriverError
from gateway.clock import TrustedClock
from gateway.config import Config, LockConfig
from gateway.ops.control_stream import Call, current_call
from gateway.ops.control_wire import ControlError
from gateway.ops.lookup import (
    CONTROL_WAIT_S,
    TEST_RELOCK_TIMEOUT,
    TEST_SECONDS,
    check_test_timing,
    find_lock,
)
from gateway.ops.technician import LockRow, read_locks, run_test_cycle
from gateway.outbox.timeline import external_id_for, make_event
from gateway.store import Store
from gateway.units.hardware import HardwareUnavailableError, Site, scan_site_bus
from gateway.units.manager import UnitManager

__all__ = ["SCAN_TIMEOUT_MAX_MS", "TechnicianRuns"]

LOGGER = logging.getLogger(__name__)

#: Longest wait per address of a ``scan`` run on the agent's bus: each probe holds the
#: bus, so a door command waits at most this long behind one (a board that needs more
#: than a second to answer one read is not one to drive doors with).
SCAN_TIMEOUT_MAX_MS: Final = 1000


class TechnicianRuns:
    """``test`` and ``scan`` through the running agent, cancelled when it stops."""

    def __init__(self, *, config: Callable[[], Config], store: Store, units: UnitManager,
                 site: Site, clock: TrustedClock, stopping: threading.Event) -> None:
        self._config = config  # read at each use: a config.set may change it
        self._store = store
        self._units = units
        self._site = site
        self._clock = clock
        self._stopping = stopping
        # The cancels of long technician requests running now: cancel_all() runs them.
        self._on_stopping: list[Callable[[], object]] = []
        self._on_stopping_mutex = threading.Lock()

    def locks(self) -> list[LockRow]:
        """Every configured lock read back (``locks``), in the config's order."""
        return read_locks(self._site, self._config().locks)

    def cancel_all(self) -> None:
        """The agent is stopping (``stopping`` is set): cancel every running request."""
        with self._on_stopping_mutex:  # after the set: _cancelled_on_stop sees one or other
            cancels, self._on_stopping = self._on_stopping, []
        for cancel in cancels:
            cancel()  # Call.cancel: never raises (its callbacks are guarded)

    def test(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """The technician's test of some or all locks, one at a time on each unit's queue.

        Through the control socket the CLI sees each row as it finishes (a progress
        line) and stops the run by hanging up (Ctrl-C): the lock under test is relocked
        at once, the ones not yet started are cancelled and listed as such, and no door
        is opened after that (gateway/ops/control_stream.py).  The agent stopping does the
        same, also to a ``locks.test`` management request, which no client can cancel.
        """
        try:  # found in review: NaN, infinity or 1e9 held the unit's queue for decades
            seconds = check_test_timing("seconds", params.get("seconds"), TEST_SECONDS) or 1.0
            relock_timeout = check_test_timing("relock_timeout", params.get("relock_timeout"),
                                               TEST_RELOCK_TIMEOUT) or 10.0
        except ValueError as exc:
            raise ControlError(str(exc), 2) from None
        config = self._config()
        if params.get("all"):
            locks = list(config.locks)
        else:
            locks = [find_lock(config, str(u)) for u in params.get("units", [])]
        call = current_call()
        results: list[dict[str, Any]] = []
        cancelled: list[dict[str, Any]] = []
        with self._cancelled_on_stop(call), call.watch() as stop:
            for lock in locks:
                row: dict[str, Any] | None = None
                if not stop.is_set():
                    # On the unit's queue: a lockout queued ahead of the test is seen, and
                    # no command runs in the middle of the cycle.
                    future = self._units.run_exclusive(
                        lock.unit, functools.partial(self._test_one, lock, seconds,
                                                     relock_timeout, actor, stop))
                    call.on_cancel(future.cancel)  # one still queued never starts
                    try:
                        row = future.result(timeout=CONTROL_WAIT_S + seconds + relock_timeout)
                    except CancelledError:
                        row = None
                    except FutureTimeout:
                        future.cancel()
                        row = {"unit": lock.unit, "reference": lock.reference,
                               "passed": False, "unlock_ms": None, "held_ms": None,
                               "relock_ms": None, "detail": "the unit stayed busy; not tested"}
                if row is None:
                    cancelled.append({"unit": lock.unit, "reference": lock.reference})
                else:
                    results.append(row)
                call.progress({"done": len(results) + len(cancelled), "total": len(locks),
                               **({"result": row} if row is not None else
                                  {"cancelled": cancelled[-1]})})
        interrupted = stop.is_set()
        if interrupted:
            LOGGER.warning("test by %s interrupted%s: %d lock(s) tested, %d cancelled before "
                           "they started (%s)", actor,
                           " (the agent is stopping)" if self._stopping.is_set() else "",
                           len(results), len(cancelled),
                           ", ".join(c["reference"] for c in cancelled) or "none")
        return {"passed": not interrupted and all(r["passed"] for r in results),
                "interrupted": interrupted, "results": results, "cancelled": cancelled}

    def _test_one(self, lock: LockConfig, seconds: float, relock_timeout: float,
                  actor: str, stop: threading.Event | None = None) -> dict[str, Any] | None:
        """One technician test cycle, refused in lockout, audited like any unlock.

        ``None`` when the technician stopped the run before this lock's turn came: no
        door is opened after a Ctrl-C.
        """
        if stop is not None and stop.is_set():
            return None
        if self._store.unit(lock.unit).lockout:
            return {"unit": lock.unit, "reference": lock.reference, "passed": False,
                    "unlock_ms": None, "held_ms": None, "relock_ms": None,
                    "detail": "in lockout: not tested (clear the lockout first)"}
        # Driven outside the unit manager: a read-back taken during the cycle must not be
        # applied after it (a false "drift" and an extra lock, found in review).
        self._units.mark_acted(lock.unit)
        try:
            r = run_test_cycle(self._site, lock, seconds, relock_timeout_s=relock_timeout,
                               cancel=stop)
        finally:
            self._units.mark_acted(lock.unit)
        if r is None:  # stopped after the check above: nothing was driven
            return None
        if r.unlock_ms is not None:  # the door was driven: audit both halves
            key = uuid.uuid4().hex
            site = self._config().site
            with self._store.transaction() as tx:
                for kind, detail in (("unlocked", "technician test"),
                                     ("locked", "technician test: relocked" if r.passed
                                      else f"technician test failed: {r.detail}")):
                    tx.add_event(make_event(
                        kind, app_name=site.app_name, site_id=site.id,
                        unit=lock.unit, reference=lock.reference,
                        external_id=external_id_for(site.id, "test", key, kind),
                        occurred_at=self._clock.now(), actor=actor,
                        detail=f"{detail}; unit {lock.reference}; by {actor}"))
        LOGGER.info("test of %s by %s: %s (%s)", lock.reference, actor,
                    "pass" if r.passed else "FAIL", r.detail)
        return r.as_dict()

    def scan(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``scan`` on the agent's own bus (it owns the port), between its transactions.

        Each address is one transaction, so commands and reconciliation wait at most one
        probe; a progress line per address; the CLI's Ctrl-C stops it.
        """
        name = str(params.get("controller", ""))
        addresses = params.get("addresses")
        timeout_ms = params.get("timeout_ms")
        if addresses is not None and not (
                isinstance(addresses, list) and all(
                    isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 255
                    for a in addresses)):
            raise ControlError("addresses must be a list of integers from 0 to 255", 2)
        if timeout_ms is not None and not (
                isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool)
                and 1 <= timeout_ms <= SCAN_TIMEOUT_MAX_MS):
            raise ControlError(f"--timeout-ms must be from 1 to {SCAN_TIMEOUT_MAX_MS} while "
                               "the agent runs (each probe holds its bus)", 2)
        call = current_call()
        with self._cancelled_on_stop(call), call.watch() as stop:
            try:
                report = scan_site_bus(
                    self._site, name, addresses,
                    timeout_s=None if timeout_ms is None else timeout_ms / 1000,
                    on_address=lambda done, total, address, found: call.progress(
                        {"done": done, "total": total, "address": address,
                         "found": None if found is None else
                         {"address": found.address, "description": found.description}}),
                    stop=stop)
            except HardwareUnavailableError as exc:
                raise ControlError(str(exc), 2) from None
            except DriverError as exc:  # the port itself failed: no bus to scan
                raise ControlError(f"scan of {name} stopped: {exc}", 1) from None
        return report.as_dict()

    @contextlib.contextmanager
    def _cancelled_on_stop(self, call: Call) -> Iterator[None]:
        """While the block runs, the agent stopping cancels ``call`` as a client hanging
        up would: the lock under test is relocked at once and no other is started.

        A ``locks.test`` management request runs on a detached call that no client can
        cancel; without this, stopping the agent waited out every lock's hold (up to
        30 s each), past systemd's stop timeout, whose SIGKILL could land mid-hold and
        leave a relay energized (found in review).
        """
        with self._on_stopping_mutex:
            stopping = self._stopping.is_set()
            if not stopping:
                self._on_stopping.append(call.cancel)
        if stopping:  # a signal came first: start nothing
            call.cancel()
        try:
            yield
        finally:
            with self._on_stopping_mutex, contextlib.suppress(ValueError):
                self._on_stopping.remove(call.cancel)
