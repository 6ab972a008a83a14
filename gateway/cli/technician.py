"""``test`` and ``scan``: the technician's long commands, as they appear at the door.

Both run through the agent when it runs (it owns the port and the units' queues) and on
the hardware directly when it does not, with the same output either way:

* **Progress** on stderr (not with ``--json``): one line per lock or address as it
  finishes; on a terminal, silent scan addresses overwrite each other so the boards
  that answered stay on screen.
* **Ctrl-C** stops at once and safely: the lock under test is relocked (never left
  open), the locks not yet started are cancelled, nothing else is opened, and the
  results so far are printed; exit status 130.  Through the agent the CLI hangs up its
  sending side, which the agent takes as "cancel" (``gateway.ops.control_stream``); a
  second Ctrl-C, a hang-up or SIGTERM ends the CLI, whose closed connection cancels
  just the same.  In direct mode no agent would relock a door the CLI left open, so a
  signal handler (``gateway/cli/interrupts.py``) turns Ctrl-C, a hang-up (an SSH session
  dropping at the door) and SIGTERM into the switch the test cycle waits on, and
  ignores any further one until the relock is confirmed or has failed; none of them
  lands in the middle of a bus transaction.  Exit status 130 for each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TextIO

from gateway.cli.interrupts import EXIT_INTERRUPTED, interrupts_set
from gateway.cli.outcomes import TEST_KEYS, actor, shape
from gateway.cli.render import ms, print_json, table
from gateway.cli.shell import (
    AGENT_ACTION_S,
    AGENT_READ_S,
    AGENT_TEST_MARGIN_S,
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    Context,
)
from gateway.ops import technician
from gateway.ops.control import AgentUnavailable, ControlClient, ControlDenied, ControlError
from gateway.ops.control_stream import stream
from gateway.ops.lookup import TEST_RELOCK_TIMEOUT, TEST_SECONDS, check_test_timing
from gateway.units.hardware import scan_controller

if TYPE_CHECKING:
    from drivers.base import ProbeResult

__all__ = ["EXIT_INTERRUPTED", "INTERRUPT_WAIT_S", "ProgressLines", "run_scan", "run_test"]

LOGGER = logging.getLogger(__name__)

#: After Ctrl-C, how long the CLI waits for the agent to relock the lock under test and
#: answer: one lock action with the bus's retries takes well under a second, a Zigbee
#: or Tasmota read-back a few; beyond this the CLI says the outcome is unknown.
INTERRUPT_WAIT_S: Final = 15.0


# -- progress -----------------------------------------------------------------------------
class ProgressLines:
    """A line per finished item on ``stream``: ``[ 3/12] text``.

    On a terminal a line written with ``keep=False`` is overwritten by the next one
    (a scan's silent addresses); every other line stays.
    """

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self._pending = False  # a line on screen that the next one overwrites
        self._width = len(str(total))

    def line(self, done: int, text: str, *, keep: bool = True) -> None:
        """Write the line for item ``done`` (1-based)."""
        body = f"[{done:>{self._width}}/{self.total}] {text}"
        if self.tty:
            self.stream.write("\r\033[K" if self._pending else "")
            self.stream.write(body if not keep else body + "\n")
            self._pending = not keep
        else:
            self.stream.write(body + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End an overwritable line, so what follows starts on a line of its own."""
        if self._pending:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._pending = False


# -- test ---------------------------------------------------------------------------------
def _row_text(row: Mapping[str, Any]) -> str:
    verdict = "PASS" if row.get("passed") else "FAIL"
    return f"{row.get('reference')} ({row.get('unit')}): {verdict} — {row.get('detail')}"


def _cancelled_text(item: Mapping[str, Any]) -> str:
    return f"{item.get('reference')} ({item.get('unit')}): cancelled, not started"


def run_test(ctx: Context) -> int:
    """``test UNIT… | --all``: the test cycle with progress, a pass/fail table, Ctrl-C."""
    config = ctx.config()
    a = ctx.args
    if a.all and a.units:
        raise CliError("give units or --all, not both")
    if not a.all and not a.units:
        raise CliError("name at least one unit, or use --all")
    try:  # the same bounds as through the agent, checked before anything moves
        check_test_timing("--seconds", a.seconds, TEST_SECONDS)
        check_test_timing("--relock-timeout", a.relock_timeout, TEST_RELOCK_TIMEOUT)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    count = len(config.locks) if a.all else len(a.units)
    progress = ProgressLines(count, ctx.err) if count > 1 and not ctx.json else None
    if progress is not None:
        ctx.err.write(f"testing {count} locks, {a.seconds:g} s each; Ctrl-C stops after "
                      "relocking the one under test\n")

    def on_progress(item: Mapping[str, Any]) -> None:
        if progress is None:
            return
        done = int(item.get("done") or 0)
        if isinstance(item.get("result"), dict):
            progress.line(done, _row_text(item["result"]))
        elif isinstance(item.get("cancelled"), dict):
            progress.line(done, _cancelled_text(item["cancelled"]))

    budget = AGENT_ACTION_S + count * (a.seconds + a.relock_timeout + AGENT_TEST_MARGIN_S)
    answer = _through_agent(ctx, "test", budget, on_progress, units=list(a.units),
                            all=bool(a.all), seconds=a.seconds,
                            relock_timeout=a.relock_timeout, actor=actor())
    if answer is not None:
        report, interrupted = answer
        results = [shape(r, TEST_KEYS) for r in _list(report, "results")]
        cancelled = [{"unit": c.get("unit"), "reference": c.get("reference")}
                     for c in _list(report, "cancelled", optional=True)]
        interrupted = interrupted or bool(report.get("interrupted"))
        # The agent's verdict counts too: it may fail a run for a reason no row shows.
        agent_failed = report.get("passed") is False
    else:
        results, cancelled, interrupted = _test_direct(ctx, on_progress)
        agent_failed = False
    passed = (not interrupted and not agent_failed and not cancelled
              and all(r["passed"] for r in results))
    _print_test(ctx, results, cancelled, interrupted, passed)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if passed else EXIT_FAILED


def _print_test(ctx: Context, results: list[dict[str, Any]], cancelled: list[dict[str, Any]],
                interrupted: bool, passed: bool) -> None:
    if ctx.json:
        print_json({"passed": passed, "interrupted": interrupted, "results": results,
                     "cancelled": cancelled}, ctx.out)
        return
    rows = [[r["unit"], r["reference"], "PASS" if r["passed"] else "FAIL", ms(r["unlock_ms"]),
             _seconds(r.get("held_ms")), ms(r["relock_ms"]), r["detail"]] for r in results]
    rows += [[c["unit"], c["reference"], "cancelled", None, None, None,
              "not started: the test was interrupted"] for c in cancelled]
    ctx.out.write(table(["unit", "reference", "result", "unlock", "held", "relock", "detail"],
                        rows) + "\n")
    failed = sum(not r["passed"] for r in results)
    summary = f"{len(results) - failed} passed, {failed} failed"
    if cancelled:
        summary += f", {len(cancelled)} cancelled"
    if interrupted:
        summary += " (interrupted: every lock tested was relocked)"
    ctx.out.write(summary + "\n")


def _seconds(ms: object) -> str:
    return f"{ms / 1000:.1f} s" if isinstance(ms, int | float) else "-"


def _test_direct(
    ctx: Context, on_progress: Callable[[Mapping[str, Any]], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """The test on the hardware itself (no agent): results, cancelled, interrupted."""
    config = ctx.config()
    a = ctx.args
    locks = list(config.locks) if a.all else [ctx.find_lock(u) for u in a.units]
    stop = threading.Event()
    results: list[dict[str, Any]] = []
    cancelled: list[dict[str, Any]] = []
    site = ctx.site(only=sorted({lock.controller for lock in locks}))
    try:
        with interrupts_set(stop):
            for done, lock in enumerate(locks, 1):
                # None once stopped, and then nothing is driven: the rest are cancelled.
                r = technician.run_test_cycle(site, lock, a.seconds,
                                              relock_timeout_s=a.relock_timeout, cancel=stop)
                if r is None:
                    cancelled.append({"unit": lock.unit, "reference": lock.reference})
                    on_progress({"done": done, "cancelled": cancelled[-1]})
                    continue
                results.append(shape(r.as_dict(), TEST_KEYS))
                on_progress({"done": done, "result": results[-1]})
    finally:
        site.close()
    return results, cancelled, stop.is_set()


# -- scan ---------------------------------------------------------------------------------
def _parse_range(text: str) -> range:
    try:
        lo, _, hi = text.partition("-")
        start, end = int(lo), int(hi or lo)
    except ValueError:
        raise CliError(f"--addresses {text!r}: expected a range like 1-16") from None
    if start < 0 or end < start or end > 255:
        raise CliError(f"--addresses {text!r}: expected 0 ≤ A ≤ B ≤ 255")
    return range(start, end + 1)


def run_scan(ctx: Context) -> int:
    """``scan CONTROLLER``: probe one bus, through the agent when it owns the port."""
    a = ctx.args
    addresses = _parse_range(a.addresses) if a.addresses else None
    if a.timeout_ms is not None and not 1 <= a.timeout_ms <= 5000:
        raise CliError("--timeout-ms must be from 1 to 5000")
    progress: ProgressLines | None = None

    def on_progress(item: Mapping[str, Any]) -> None:
        nonlocal progress
        if ctx.json:
            return
        total, done = int(item.get("total") or 0), int(item.get("done") or 0)
        if progress is None:
            progress = ProgressLines(total, ctx.err)
        found = item.get("found")
        if isinstance(found, dict):
            progress.line(done, f"address {item.get('address')}: {found.get('description')}")
        else:
            progress.line(done, f"address {item.get('address')}: no answer", keep=False)

    answer = _through_agent(
        ctx, "scan", AGENT_READ_S, on_progress, controller=a.controller,
        addresses=None if addresses is None else list(addresses), timeout_ms=a.timeout_ms)
    if answer is not None:
        report, interrupted = answer
        found = _list(report, "found")
        interrupted = interrupted or bool(report.get("interrupted"))
        result = {"controller": a.controller, "found": found,
                  "probed": report.get("probed"), "total": report.get("total"),
                  "interrupted": interrupted, "through_agent": True}
    else:
        result = {**_scan_direct(ctx, addresses, on_progress), "through_agent": False}
        interrupted = bool(result["interrupted"])
    if progress is not None:
        progress.close()
    _print_scan(ctx, result)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def _scan_direct(ctx: Context, addresses: range | None,
                 on_progress: Callable[[Mapping[str, Any]], None]) -> dict[str, Any]:
    def on_address(done: int, total: int, address: int, found: ProbeResult | None) -> None:
        on_progress({"done": done, "total": total, "address": address,
                     "found": None if found is None else {"description": found.description}})

    stop = threading.Event()
    with interrupts_set(stop):
        report = scan_controller(
            ctx.config(), ctx.args.controller, addresses,
            timeout_s=None if ctx.args.timeout_ms is None else ctx.args.timeout_ms / 1000,
            on_address=on_address, stop=stop)
    return report.as_dict()


def _print_scan(ctx: Context, result: Mapping[str, Any]) -> None:
    if ctx.json:
        print_json(dict(result), ctx.out)
        return
    found = list(result.get("found") or [])
    name = result.get("controller")
    if found:
        ctx.out.write(table(["address", "answered"],
                            [[f.get("address"), f.get("description")] for f in found]) + "\n")
    if result.get("interrupted"):
        ctx.out.write(f"{name}: interrupted after {result.get('probed')} of "
                      f"{result.get('total')} addresses\n")
    elif not found:
        ctx.out.write(f"{name}: nothing answered (check wiring, A/B polarity, baud rate "
                      "and termination: hardware.md)\n")


# -- through the agent --------------------------------------------------------------------
def _through_agent(ctx: Context, method: str, timeout: float,
                   on_progress: Callable[[Mapping[str, Any]], None],
                   **params: Any) -> tuple[dict[str, Any], bool] | None:
    """``(answer, interrupted)`` from the running agent with progress, or ``None`` when
    no agent answers (the caller goes direct).  Errors as ``Context.ask_agent``."""
    client = ControlClient(ctx.config().control.socket, timeout=timeout)
    try:
        return stream(client, method, params, on_progress, interrupt_wait_s=INTERRUPT_WAIT_S)
    except AgentUnavailable as exc:
        LOGGER.debug("agent not running (%s): direct mode", exc)
        return None
    except ControlDenied as exc:
        raise CliError(str(exc)) from exc
    except ControlError as exc:
        raise CliError(str(exc), exc.status) from exc


def _list(answer: Mapping[str, Any], key: str, *, optional: bool = False) -> list[dict[str, Any]]:
    """``answer[key]`` as a list of objects, or a one-line error (exit 1)."""
    items = answer.get(key, [] if optional else None)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CliError(f"the agent's answer lacks {key!r}", EXIT_FAILED)
    return items
