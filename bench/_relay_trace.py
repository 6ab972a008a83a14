"""The relay with a trace probe, for diagnosing the unlock path (bench/relay_unlock_latency.py
``--trace``): each step's wall-clock start and end inside the relay process.

Run as ``python bench/_relay_trace.py --trace FILE -- run --config PATH``; bench/_relay.py
does that when a benchmark asks for the trace.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _relay import claims_of

#: A traced step: (name, start, end, jtis), wall times of the relay process.
TraceEvent = tuple[str, float, float, list[str]]


def _trace_relay(path: Path) -> None:
    """Wall-clock start and end of each step of the unlock path, written at exit.

    Wrapped (in the relay process, the classes patched): ``UnlockService.authenticate``,
    ``submit``, ``record`` (the API's worker-thread steps); ``Outbox.plan``, ``mark``,
    ``apply`` (the link's transactions); ``RelayLink.notify`` and ``Waiters.resolve``
    (instants); ``aiomqtt.Client.publish`` (the call, until the PUBACK).  Each step
    costs a few microseconds more.
    """
    import atexit

    import aiomqtt

    from relay.link import RelayLink
    from relay.outbox import Outbox, Waiters
    from relay.unlock import UnlockService

    events: list[TraceEvent] = []

    def jtis_of(name: str, args: tuple[Any, ...], out: Any) -> list[str]:
        if name == "submit":
            return [str(out[0]["id"])]
        if name == "record":
            return [str(args[1])]
        if name == "plan":
            return [d.jti for d in out[0]]
        if name == "mark":
            return list(args[0])
        if name == "apply":
            return [] if out is None else [str(out[0])]
        if name == "resolve":
            return list(args[0])
        return []

    def wrap(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            began = time.time()
            out = original(self, *args, **kwargs)
            events.append((name, began, time.time(), jtis_of(name, args, out)))
            return out

        setattr(cls, name, traced)

    for cls, names in ((UnlockService, ("authenticate", "submit", "record")),
                       (Outbox, ("plan", "mark", "apply")), (RelayLink, ("notify",)),
                       (Waiters, ("resolve",))):
        for name in names:
            wrap(cls, name)
    publish = aiomqtt.Client.publish

    async def traced_publish(self: aiomqtt.Client, /, topic: str,
                             payload: str | bytes | bytearray | float | None = None,
                             *args: Any, **kwargs: Any) -> None:
        began = time.time()
        await publish(self, topic, payload, *args, **kwargs)
        jti = claims_of(payload)["jti"] if isinstance(payload, bytes) else ""
        events.append(("publish", began, time.time(), [str(jti)]))

    # A probe patches the class in the relay process: mypy refuses assigning a method.
    aiomqtt.Client.publish = traced_publish  # type: ignore[method-assign]

    def dump() -> None:
        path.write_text(json.dumps(events))

    def on_sigterm(signum: int, frame: object) -> None:
        dump()
        raise SystemExit(0)

    # uvicorn serves with its own handlers, then restores this one and raises the
    # captured SIGTERM again, so the process would end by the signal, before atexit.
    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(dump)


def read_trace(path: Path) -> list[TraceEvent]:
    """The events :func:`_trace_relay` wrote (after the relay stopped)."""
    return [(str(n), float(a), float(b), [str(j) for j in jtis])
            for n, a, b, jtis in json.loads(path.read_text())]


def probe_main(argv: Sequence[str]) -> int:
    """``python bench/_relay_trace.py [--trace FILE] -- RELAY-ARGS``: ``stora-relay`` with
    the trace probe (diagnostics, not the benchmarks' headline figures): ``--trace FILE``
    writes the steps of :func:`_trace_relay` to ``FILE`` at exit."""
    import argparse

    from relay.cli.main import main as relay_main

    parser = argparse.ArgumentParser(description=probe_main.__doc__)
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("relay_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.trace is not None:
        _trace_relay(args.trace)
    return relay_main([a for a in args.relay_args if a != "--"])


if __name__ == "__main__":
    sys.exit(probe_main(sys.argv[1:]))
