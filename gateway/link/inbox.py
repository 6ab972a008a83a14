"""The inbound queue between the network thread and the worker, and its load shedding:
a bounded hand-over where the "online" event jumps the queue and QoS 0 goes first."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from gateway.link.message import Message

__all__ = ["Inbound", "Inbox", "Online"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message waiting for the worker, with what is needed to acknowledge it."""

    message: Message
    mid: int
    generation: int


@dataclass(frozen=True, slots=True)
class Online:
    """A connection is subscribed: publish birth and call on_connected."""

    generation: int
    session_present: bool


class Inbox:
    """The bounded hand-over from the network thread to the worker.

    Messages queue in order up to ``maxlen``; the "online" event jumps the queue and only
    the newest one is kept, because birth must not wait behind a thousand commands and
    an event of a connection already gone is worthless.

    QoS 0 messages wait in a lane of their own, served only when no QoS 1 message
    waits, and a QoS 1 message that finds the inbox full takes the place of the newest
    QoS 0 one.  Every inbound topic of the contract is QoS 1, so a QoS 0 publish there
    comes from something other than the relay; under a flood, it is what goes first.
    """

    def __init__(self, maxlen: int) -> None:
        self._maxlen = maxlen
        self._messages: deque[Inbound] = deque()
        self._best_effort: deque[Inbound] = deque()  # QoS 0
        self._online: Online | None = None
        self._closed = False
        self._cond = threading.Condition()
        self.peak = 0
        self.evicted: list[Inbound] = []  # QoS 0 messages pushed out; the caller counts

    def put(self, item: Inbound) -> bool:
        """Queue a message; False (and nothing queued) when full or closed."""
        with self._cond:
            if self._closed:
                return False
            size = len(self._messages) + len(self._best_effort)
            if item.message.qos == 0:
                if size >= self._maxlen:
                    return False
                self._best_effort.append(item)
            else:
                if size >= self._maxlen:
                    if not self._best_effort:
                        return False
                    self.evicted.append(self._best_effort.pop())
                    size -= 1
                self._messages.append(item)
            self.peak = max(self.peak, size + 1)
            self._cond.notify()
            return True

    def put_online(self, event: Online) -> None:
        """Replace any pending online event with ``event``."""
        with self._cond:
            self._online = event
            self._cond.notify()

    def get(self) -> Inbound | Online | None:
        """The next item, waiting as long as needed; None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._online is not None:
                    event, self._online = self._online, None
                    return event
                if self._messages:
                    return self._messages.popleft()
                if self._best_effort:
                    return self._best_effort.popleft()
                self._cond.wait()

    def close(self) -> None:
        """Wake the worker and make it stop; queued messages stay unacknowledged."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._messages) + len(self._best_effort)
