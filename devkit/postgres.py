"""A throw-away PostgreSQL cluster for tests and benchmarks: ``initdb`` and ``pg_ctl`` in
a temporary directory, the server on a free 127.0.0.1 port.

Nothing depends on a server already running on the machine: :class:`Postgres` makes
its own cluster (trust authentication, superuser ``postgres``), so a test can stop,
kill -9 and restart it.  Durability is relaxed (``fsync=off``, ``synchronous_commit=off``,
``full_page_writes=off``): a test kills the relay or the server process, never the
machine, and a killed server still recovers from its WAL.

The binaries are found on ``PATH`` or in Debian's ``/usr/lib/postgresql/<version>/bin``
(the ``postgresql`` package; ``scripts/system-tools`` lists it); missing ones raise
:class:`PostgresMissingError`, so the tests that need them fail instead of skipping.
PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres``
system user (which Debian's package creates) and its programs run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from devkit.mosquitto import free_port

__all__ = ["Postgres", "PostgresError", "PostgresMissingError", "databases", "find_pg_bin"]

#: Where Debian keeps the server's programs (not on anyone's PATH).
_DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"
_START_TIMEOUT_S = 30.0
#: The OS user a root process runs the cluster as.
_SERVICE_USER = "postgres"
SUPERUSER = "postgres"
#: What a test cluster trades for speed; the relay's own settings are in deploy/.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
}


class PostgresError(RuntimeError):
    """The test cluster did not start or stop as asked (its log is in the message)."""


class PostgresMissingError(PostgresError):
    """PostgreSQL's server programs are not installed: the PostgreSQL tests cannot run."""


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: ``$PG_BIN``, then ``PATH``, then
    the newest of Debian's ``/usr/lib/postgresql/<version>/bin``."""
    explicit = os.environ.get("PG_BIN")
    if explicit:
        return Path(explicit)
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).resolve().parent
    versions = sorted(Path("/").glob(_DEBIAN_GLOB.lstrip("/")),
                      key=lambda p: _version_key(p.parent.name))
    for directory in reversed(versions):
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    raise PostgresMissingError(
        "PostgreSQL's initdb and pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin; "
        "install them (apt-get install postgresql) or set PG_BIN=/path/to/bin")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class Postgres:
    """One PostgreSQL cluster on a free 127.0.0.1 port, in a directory of its own.

    :meth:`start` runs ``initdb`` the first time, then ``pg_ctl start``; :meth:`kill` is
    ``kill -9`` of the postmaster (the server recovers at the next start);
    :meth:`restart` comes back on the same port with the same data.
    """

    host = "127.0.0.1"

    def __init__(self, directory: Path | None = None, *, port: int | None = None,
                 settings: Mapping[str, str] | None = None) -> None:
        self._own_directory = directory is None
        # Not under pytest's tmp_path: as root, the cluster's owner must reach it.
        self.directory = directory or Path(tempfile.mkdtemp(prefix="stora-pg-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.directory / "data"
        self.socket_dir = self.directory / "socket"
        self.log_path = self.directory / "postgres.log"
        self.port = port if port is not None else free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._bin = find_pg_bin()
        self._as_service_user = os.geteuid() == 0
        self._databases = 0

    # ----------------------------------------------------------------- commands

    def _argv(self, program: str, *args: str) -> list[str]:
        argv = [str(self._bin / program), *args]
        if self._as_service_user:
            return ["runuser", "-u", _SERVICE_USER, "--", *argv]
        return argv

    def _run(self, program: str, *args: str, check: bool = True) -> str:
        done = subprocess.run(self._argv(program, *args), capture_output=True, text=True,  # noqa: S603 (the server's own programs)
                              check=False, timeout=120)
        if check and done.returncode != 0:
            raise PostgresError(f"{program} {' '.join(args)} failed ({done.returncode}): "
                                f"{done.stderr.strip() or done.stdout.strip()}\n"
                                f"{self.log_text()[-2000:]}")
        return done.stdout

    def _own(self) -> None:
        """As root: hand the directory to the cluster's owner."""
        if not self._as_service_user:
            return
        entry = pwd.getpwnam(_SERVICE_USER)
        for path in (self.directory, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.log_path.exists():
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)

    def _options(self) -> str:
        options = [f"-p {self.port}", f"-k {self.socket_dir}", "-c listen_addresses=127.0.0.1"]
        options += [f"-c {name}={value}" for name, value in self.settings.items()]
        return " ".join(options)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """``initdb`` (first time only), then start the server and wait until it answers."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._own()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust",
                      "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o",
                  self._options(), "-w", "-t", str(int(_START_TIMEOUT_S)), "start")

    def running(self) -> bool:
        """Whether the postmaster is alive."""
        pid = self.pid_or_none()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def pid_or_none(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, if the file is there."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (``fast``: roll back sessions, then shut down)."""
        if self.running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """``kill -9`` of the postmaster and its backends, as a crash would."""
        pid = self.pid_or_none()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.running():
            time.sleep(0.02)
        # Its backends notice the postmaster is gone; wait until they let go of the port.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._backends_alive():
            time.sleep(0.05)

    def _backends_alive(self) -> bool:
        marker = str(self.data_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    return True
        return False

    def restart(self) -> None:
        """Start again on the same port with the same data (after :meth:`kill` too)."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            if not self.running():
                (self.data_dir / "postmaster.pid").unlink()
        self.start()

    def close(self) -> None:
        """Stop the server; remove the directory if this object made it."""
        with contextlib.suppress(PostgresError):
            self.stop("immediate")
        if self.running():
            self.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_text(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ----------------------------------------------------------------- databases

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy/relay URL of ``database`` (``postgresql://`` means psycopg 3)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def sql(self, statement: str, *, database: str = "postgres") -> str:
        """Run one statement with ``psql`` and return its unaligned output."""
        return self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                         self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", database,
                         "-c", statement)

    def create_database(self, name: str | None = None, *, template: str = "template1") -> str:
        """A new, empty database (a copy of ``template``); returns its URL."""
        self._databases += 1
        name = name or f"db{os.getpid()}_{self._databases}"
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending its sessions first."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def databases(cluster: Postgres) -> Sequence[str]:
    """The cluster's databases besides the templates (for tests of this module)."""
    out = cluster.sql("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")
    return [line for line in out.splitlines() if line]
