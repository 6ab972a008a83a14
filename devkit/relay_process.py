"""``stora-relay run`` as a child process that a test can kill -9 and start again.

:class:`RelayProcess` runs ``python -m relay.cli.main run --config PATH`` (the console
script's own entry point, with this interpreter), appends its stdout and stderr to a log
file, and counts the relay as up once ``GET /healthz`` answers 200 (the database
answers and the app's lifespan, hence the MQTT link and the jobs, has started).
:meth:`RelayProcess.kill` is ``kill -9`` (no lifespan shutdown, no goodbye to the
broker, the SQLite file left as the kill found it); :meth:`RelayProcess.terminate` is
the clean SIGTERM that uvicorn turns into a shutdown.  Each start's time to healthy is
kept in :attr:`RelayProcess.startups`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RelayProcess", "RelayProcessError"]

#: ``stora-relay run`` imports the web stack, migrates and binds in ~1 s here; 30 s
#: covers a loaded CI box.
START_TIMEOUT_S = 30.0
#: Between two ``/healthz`` probes while the relay starts.
_PROBE_GAP_S = 0.01
#: The repository root: the child imports ``relay`` from here (as an editable install
#: would), whatever the caller's working directory.
ROOT = Path(__file__).resolve().parent.parent


class RelayProcessError(RuntimeError):
    """The relay did not start (its exit status and log tail are in the message)."""


class RelayProcess:
    """One ``stora-relay run`` at a time on ``config``, listening on ``host:port``."""

    def __init__(self, config: Path, *, port: int, log: Path, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.log_path = log
        self._env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None
        #: Seconds from spawn to the first healthy ``/healthz``, one per start.
        self.startups: list[float] = []
        #: Exit statuses of the lives that ended (``-9`` for a kill).
        self.exits: list[int] = []

    @property
    def argv(self) -> list[str]:
        """The command line of a life."""
        return [sys.executable, "-m", "relay.cli.main", "run", "--config", str(self.config)]

    @property
    def running(self) -> bool:
        """Whether a life exists now (healthy or not)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The running life's process id."""
        if self._proc is None:
            raise RelayProcessError("the relay is not running")
        return self._proc.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Spawn a life and wait until it is healthy; the seconds that took."""
        if self.running:
            raise RelayProcessError("the relay is already running")
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(  # noqa: S603 (this interpreter, our own config)
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                env=self._env)
        self.wait_healthy(timeout, began=began)
        took = time.monotonic() - began
        self.startups.append(took)
        return took

    def healthy(self, timeout: float = 0.5) -> bool:
        """One ``GET /healthz``: whether it answered 200."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S, *,
                     began: float | None = None) -> None:
        """Until ``/healthz`` answers 200; :class:`RelayProcessError` if the life ends or
        ``timeout`` runs out first."""
        deadline = (began if began is not None else time.monotonic()) + timeout
        while not self.healthy():
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RelayProcessError(f"stora-relay run exited ({code}) before it was "
                                        f"healthy:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RelayProcessError(f"stora-relay run not healthy within {timeout} s:\n"
                                        f"{self.log_tail()}")
            time.sleep(_PROBE_GAP_S)

    def kill(self) -> None:
        """``kill -9`` the life, if any, and reap it."""
        self._end(signal.SIGKILL)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (uvicorn's clean shutdown) and wait; the exit status."""
        return self._end(signal.SIGTERM, timeout)

    def restart(self, timeout: float = START_TIMEOUT_S) -> float:
        """:meth:`kill`, then :meth:`start`; the seconds the start took."""
        self.kill()
        return self.start(timeout)

    def _end(self, sig: signal.Signals, timeout: float = 10.0) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # a clean stop that hangs is reported by the caller
                proc.wait(timeout=10)
        self.exits.append(proc.returncode)
        return proc.returncode

    def log_text(self) -> str:
        """Everything the lives wrote so far."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the log (for assertion messages)."""
        return self.log_text()[-chars:]

    def close(self) -> None:
        """Kill the life if one runs; safe to call twice."""
        self.kill()

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
