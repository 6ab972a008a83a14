"""The store's errors: the :class:`StoreError` tree, and the one place sqlite3's exceptions
and the filesystem's answers are translated into it.

::

    GatewayError
    └── StoreError          the state database failed; ``retryable`` says if trying again helps
        ├── StoreFull       disk full (SQLITE_FULL): retryable once space is freed
        ├── StoreReadOnly   the file or its filesystem is read-only: a person must fix it
        ├── StoreCorrupt    quick_check failed or the file is not a database: quarantine it
        └── StoreBusy       another process held the write lock past busy_timeout: retryable

See docs/design/store-durability.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Final

from gateway.errors import GatewayError, one_line

__all__ = [
    "StoreBusy",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreReadOnly",
]

# Primary SQLite result codes (the low byte of an extended code).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_CANTOPEN: Final = 14
_SQLITE_NOTADB: Final = 26


class StoreError(GatewayError):
    """The state database failed; the message names the file and what was being done."""

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(one_line(message))
        if retryable is not None:
            self.retryable = retryable


class StoreFull(StoreError):  # noqa: N818 - the names the agent uses
    """The filesystem is full (SQLITE_FULL); the transaction was rolled back."""

    retryable = True


class StoreReadOnly(StoreError):  # noqa: N818 - the names the agent uses
    """The database or its filesystem is read-only; the transaction was rolled back."""

    retryable = False


class StoreCorrupt(StoreError):  # noqa: N818 - the names the agent uses
    """The file is damaged or not a database; move it aside with :meth:`Store.quarantine`."""

    retryable = False


class StoreBusy(StoreError):  # noqa: N818 - the names the agent uses
    """Another process held the write lock for longer than the busy timeout."""

    retryable = True


def _translate(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """The :class:`StoreError` for a sqlite3 exception raised while ``doing``."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = f"state database {path}"
    if primary == _SQLITE_FULL:
        return StoreFull(f"{where}: disk full while {doing}; free space on its filesystem")
    if primary == _SQLITE_READONLY:
        return StoreReadOnly(
            f"{where} is read-only ({exc}) while {doing}; check the filesystem is mounted "
            "read-write and the file is writable by the agent's user"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorrupt(f"{where} is corrupt ({exc}) while {doing}")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreBusy(f"{where} is locked by another process while {doing} ({exc})")
    if primary == _SQLITE_CANTOPEN:
        if _on_read_only_fs(path.parent):
            # Also for an existing file: a WAL database cannot be opened where its -wal and
            # -shm files neither exist nor can be created.
            return StoreReadOnly(f"{where} cannot be opened: its filesystem is read-only; "
                                 "remount it read-write")
        return StoreError(
            f"cannot open {where} ({exc}); check its directory exists and the agent's "
            "user may write there"
        )
    if primary == _SQLITE_IOERR:
        if _refuses_writes(path.parent):
            # A filesystem that turns read-only under open files (ext4 ``errors=remount-
            # ro`` after a storage error) fails SQLite's write() or fsync() with EROFS,
            # which SQLite reports as an I/O error; and ext4 does not always set
            # ST_RDONLY then, so only a write attempt tells.
            return StoreReadOnly(
                f"{where}: its filesystem turned read-only while {doing} ({exc}); nothing "
                "new can be recorded.  Repair the filesystem (fsck) and mount it read-write "
                f"at {path.parent} again, then RESTART THE AGENT: the kernel does not undo "
                "an error remount under open files.  (A freshly mounted filesystem there is "
                "picked up without a restart, at the next write.)"
            )
        return StoreError(f"{where}: I/O error while {doing} ({exc}); check the storage device")
    return StoreError(f"{where}: {doing} failed: {exc}")


def _on_read_only_fs(directory: Path) -> bool:
    """Whether ``directory`` is on a filesystem mounted read-only (root cannot write there)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, ValueError):
        return False


def _refuses_writes(directory: Path) -> bool:
    """Whether creating a file in ``directory`` fails with EROFS (or it is mounted read-only).

    Used only after an I/O error: a filesystem the kernel turned read-only after an error
    may still report itself read-write to ``statvfs``.  The probe file is removed again.
    """
    if _on_read_only_fs(directory):
        return True
    # A fresh name, created exclusively and never through a link: the directory may be
    # writable by others, and a planted symlink must not make this open (O_TRUNC, as it
    # was: found in review) truncate whatever it points to.
    probe = directory / f".stora-gateway-probe-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return False


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, or ``None`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
