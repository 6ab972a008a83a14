"""Run work one item at a time per key, in arrival order, with parallelism across keys.

Commands for one unit must never overlap (one operation at a time per unit) and must run
in the order they arrived; commands for different units may run side by side (their
buses serialize the wire anyway).  A thread pool alone would not keep per-unit order: two
tasks for one unit submitted 10 ms apart could start in either order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

LOGGER = logging.getLogger(__name__)


class KeyedSerialExecutor:
    """FIFO per key on a shared pool of ``workers`` threads."""

    def __init__(self, workers: int = 4, *, name: str = "unit") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._queues: dict[str, deque[tuple[Callable[[], Any], Future[Any]]]] = {}
        self._running: set[str] = set()

    def submit(self, key: str, fn: Callable[[], Any]) -> Future[Any]:
        """Queue ``fn`` behind everything already queued for ``key``."""
        future: Future[Any] = Future()
        with self._lock:
            self._queues.setdefault(key, deque()).append((fn, future))
            if key in self._running:
                return future
            self._running.add(key)
        self._pool.submit(self._drain, key)
        return future

    def _drain(self, key: str) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(key)
                if not queue:
                    self._running.discard(key)
                    self._queues.pop(key, None)
                    return
                fn, future = queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # the future carries it to whoever waits
                LOGGER.exception("task for %s failed", key)
                future.set_exception(exc)

    def pending(self) -> int:
        """Tasks queued and not yet started."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def shutdown(self, *, cancel_pending: bool = False) -> None:
        """Stop; wait for running tasks.  With ``cancel_pending``, tasks not yet started
        are cancelled (their futures say so) instead of run."""
        if cancel_pending:
            with self._lock:
                for queue in self._queues.values():
                    for _, future in queue:
                        future.cancel()
        self._pool.shutdown(wait=True)
