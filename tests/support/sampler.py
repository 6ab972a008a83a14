"""Watch simulated doors over time: what the person at the door would have seen.

``Sampler`` reads a set of "is it unlocked?" probes (a relay's coil, a latch) every few
milliseconds on a thread and keeps the moments each changed, so a test can say "this
coil was on for at least 2 s" or "nothing opened after the interrupt" about the
hardware itself, not about what the gateway reported.

A sampled interval is bounded both ways: the door was certainly unlocked from the
first to the last sample that saw it so (:meth:`Interval.at_least_s`), and certainly
not for longer than from the sample before it to the one after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

#: Between two reads of every probe.  A simulator's coil read is a dict lookup under a
#: lock; 2 ms keeps the bounds of an interval within a few ms of the truth.
PERIOD_S = 0.002


@dataclass(frozen=True, slots=True)
class Interval:
    """One stretch during which a probe read True (unlocked)."""

    name: str
    first_on: float
    last_on: float
    off_at: float | None  # first sample that read False again; None: still on at the end

    @property
    def at_least_s(self) -> float:
        """A lower bound of how long it was really on."""
        return self.last_on - self.first_on


class Sampler:
    """Reads ``probes`` every :data:`PERIOD_S` on a thread (``with Sampler(...) as s``)."""

    def __init__(self, probes: Mapping[str, Callable[[], bool]],
                 period_s: float = PERIOD_S) -> None:
        self.probes = dict(probes)
        self.period_s = period_s
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._open: dict[str, tuple[float, float]] = {}
        self._done: list[Interval] = []
        self._thread = threading.Thread(target=self._run, name="door-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for name, probe in self.probes.items():
                on = probe()
                with self._mutex:
                    if on:
                        first = self._open.get(name, (now, now))[0]
                        self._open[name] = (first, now)
                    elif name in self._open:
                        first, last = self._open.pop(name)
                        self._done.append(Interval(name, first, last, now))
            self._stop.wait(self.period_s)

    def intervals(self, name: str | None = None) -> list[Interval]:
        """Every stretch seen so far (those still on have ``off_at`` None), oldest first."""
        with self._mutex:
            found = list(self._done) + [Interval(n, first, last, None)
                                        for n, (first, last) in self._open.items()]
        found.sort(key=lambda i: i.first_on)
        return [i for i in found if name is None or i.name == name]

    def opened_after(self, moment: float) -> list[Interval]:
        """Stretches that began after ``moment`` (monotonic): doors opened since then."""
        return [i for i in self.intervals() if i.first_on > moment]

    def on_now(self, name: str) -> bool:
        """Whether ``name`` read unlocked at the last sample."""
        with self._mutex:
            return name in self._open
