"""Pseudo-terminals that stand in for RS-485 adapters, for simulators and tests.

``PtyPort`` gives a simulator the master end of a pty and publishes the slave end at a
stable path (a symlink, like ``/dev/serial/by-id/…``), so a driver opens it exactly as it
would open ``/dev/ttyUSB0``.  ``vanish()`` and ``restore()`` model a USB adapter being
unplugged and plugged back: the path disappears, reads fail, then a new device appears
at the same path.

``PtyBridge`` joins two ptys back to back (a null-modem cable) for peers that want to
open a path themselves, such as pymodbus's own server, and can corrupt, drop or insert
bytes in transit (line noise; fault matrix #30).

Caveat (fault matrix, PTY note): a pty buffers far more than a UART, which discards
bytes nobody reads; simulators model drops and overruns themselves.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import tty
from collections.abc import Callable
from pathlib import Path

READ_CHUNK = 4096


class PtyPort:
    """A pty whose slave end is published at ``path``; the owner reads/writes the master."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._master = -1
        self._slave = -1
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        tty.setraw(master)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.path)
        with self._lock:
            self._master, self._slave = master, slave

    @property
    def present(self) -> bool:
        """True while the device exists."""
        return self._master >= 0

    @property
    def device(self) -> str:
        """The real ``/dev/pts/N`` name behind ``path``."""
        return os.ttyname(self._slave)

    def read(self, timeout: float) -> bytes:
        """Bytes the driver wrote, waiting at most ``timeout``; ``b""`` on timeout."""
        fd = self._master
        if fd < 0:
            return b""
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return b""
            return os.read(fd, READ_CHUNK)
        except (OSError, ValueError):
            return b""

    def write(self, data: bytes) -> None:
        """Send bytes to the driver (dropped silently while the device is gone)."""
        fd = self._master
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(fd, data)

    def vanish(self) -> None:
        """Unplug: remove the path and close both ends, so the driver's port fails."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with self._lock:
            master, slave = self._master, self._slave
            self._master = self._slave = -1
        for fd in (master, slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def restore(self) -> None:
        """Plug back in: a new pty at the same path."""
        if not self.present:
            self._open()

    def close(self) -> None:
        """Remove the device for good."""
        self.vanish()

    def __enter__(self) -> PtyPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Mangler = Callable[[bytes], bytes]


class PtyBridge:
    """Two ptys joined back to back, optionally mangling bytes in transit.

    A peer opens ``path_a``, another opens ``path_b``; whatever one writes, the other
    reads, after ``mangle`` (if any) has had its way with it.
    """

    def __init__(
        self,
        path_a: str | os.PathLike[str],
        path_b: str | os.PathLike[str],
        mangle: Mangler | None = None,
    ) -> None:
        self.a = PtyPort(path_a)
        self.b = PtyPort(path_b)
        self.mangle = mangle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pty-bridge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            fds = [p._master for p in (self.a, self.b) if p._master >= 0]
            if not fds:
                self._stop.wait(0.05)
                continue
            try:
                ready, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):
                continue
            for fd in ready:
                src, dst = (self.a, self.b) if fd == self.a._master else (self.b, self.a)
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    continue
                if self.mangle is not None:
                    data = self.mangle(data)
                dst.write(data)
                del src

    def close(self) -> None:
        """Stop copying and remove both devices."""
        self._stop.set()
        self._thread.join(timeout=2)
        self.a.close()
        self.b.close()

    def __enter__(self) -> PtyBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
