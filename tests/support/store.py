"""Helpers the state database tests share (tests/gateway/store/test_store_*.py): an event
record, the database path and an open store, and raw SQLite access to inspect the file."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.outbox.timeline import EventRecord, external_id_for, make_event
from gateway.store import Store

T0 = 1_796_000_000.0


def record(n: int | str, *, detail: str = "unit A-101", kind: str = "unlocked") -> EventRecord:
    return make_event(
        kind,
        app_name="YourApp",
        site_id="site_123",
        unit="unit_abc",
        reference="A-101",
        external_id=external_id_for("test", str(n)),
        occurred_at=T0,
        contact="con_1",
        actor="tenant app",
        detail=detail,
    )


def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


def store(db: Path) -> Iterator[Store]:
    with Store(db, clock=lambda: T0 + 1) as s:
        yield s


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to inspect the file as SQLite sees it."""
    return sqlite3.connect(path, isolation_level=None)


def integrity(path: Path) -> list[str]:
    conn = raw(path)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def populated(db: Path) -> bytes:
    """A database of ~50 pages, checkpointed into the main file; returns its bytes."""
    with Store(db) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.claim_command(f"j{i}", "unlock", "unit_abc", T0)
                tx.finish_command(f"j{i}", "done", None, {"pad": "x" * 50})
                tx.add_event(record(i, detail="d" * 100))
    assert not Path(f"{db}-wal").exists()
    return db.read_bytes()


def overwrite_pages(data: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    page = 4096
    damaged = bytearray(data)
    for n in rng.sample(range(1, len(data) // page), 3):
        damaged[n * page : (n + 1) * page] = rng.randbytes(page)
    return bytes(damaged)


def tmpfs(mnt: Path, size: str, untested: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mnt`` (made here), unmounted afterwards; skipped,
    saying what goes ``untested``, where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"mounting a tmpfs needs root and mount(8); {untested}")
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    yield from tmpfs(tmp_path / "mnt", "256k", "disk-full/read-only FS untested")
