"""The relay's background work besides the MQTT link: reconciliation (contract §7.3).

Each connected operator's units are re-listed when the relay starts (it may have missed
webhooks while down), right after the operator connects, and every ``interval_s``; an
operator whose webhook endpoint could not be registered at connect gets another try on
each pass.  One operator at a time, in a worker thread: the passes are paced
(:class:`relay.reconcile.Reconciler`) and the operator's rate limiter bounds them.

Replicas on one database share the work: a pass holds the operator's lease
(:mod:`relay.leases`, ``reconcile:<operator>``) and checks it with each page it writes;
an operator whose lease another replica holds is skipped (that replica's pass is a
fresh listing too), and the timer's passes leave out operators that any replica
reconciled within the last half interval.
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay.connect import Connector
from relay.errors import RelayError
from relay.leases import Leases
from relay.reconcile import Reconciler

__all__ = ["DEFAULT_INTERVAL_S", "LEASE_TTL_S", "Jobs"]

LOGGER = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 900.0
#: A pass's lease lasts this long past its last page (each page extends it).
LEASE_TTL_S = 120.0


class Jobs:
    """Reconciliation passes, on request and on a timer."""

    def __init__(self, reconciler: Reconciler, connector: Connector, leases: Leases, *,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._reconciler = reconciler
        self._connector = connector
        self._leases = leases
        self._interval = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._queued: set[str] = set()
        self.passes = 0
        self.skipped = 0

    def request(self, operator_id: str) -> None:
        """Reconcile ``operator_id`` soon (thread-safe; e.g. just after it connected)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._enqueue, operator_id)

    def _enqueue(self, operator_id: str) -> None:
        if self._queue is not None and operator_id not in self._queued:
            self._queued.add(operator_id)
            self._queue.put_nowait(operator_id)

    async def _enqueue_all(self) -> None:
        since = time.time() - self._interval / 2
        for operator_id in await asyncio.to_thread(self._reconciler.connected_operators,
                                                   reconciled_before=since):
            self._enqueue(operator_id)

    async def run(self) -> None:
        """Until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        await self._enqueue_all()  # after downtime: webhooks may have been missed
        next_all = time.monotonic() + self._interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_all - time.monotonic())):
                    operator_id = await self._queue.get()
            except TimeoutError:
                await self._enqueue_all()
                next_all = time.monotonic() + self._interval
                continue
            self._queued.discard(operator_id)
            try:
                await asyncio.to_thread(self.reconcile_now, operator_id)
            except Exception:  # the database, mostly: the next pass tries again
                LOGGER.exception("reconciliation of %s failed", operator_id)

    def reconcile_now(self, operator_id: str) -> None:
        """One pass over ``operator_id`` in this thread, unless another replica holds its
        lease (then :attr:`skipped` counts it)."""
        lease = self._leases.acquire(f"reconcile:{operator_id}", LEASE_TTL_S)
        if lease is None:
            LOGGER.info("reconciliation of %s skipped: another replica is running it",
                        operator_id)
            self.skipped += 1
            return
        try:
            try:
                self._connector.ensure_webhook(operator_id)
            except RelayError as exc:
                LOGGER.warning("webhook endpoint of %s not registered: %s", operator_id, exc)
            self._reconciler.reconcile(operator_id, lease=lease)
            self.passes += 1
        finally:
            self._leases.release(lease)
