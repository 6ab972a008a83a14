"""A long-running ``stora-gateway`` command as a real process, read line by line.

For the commands that run until Ctrl-C (``simulate``, ``watch``): the test starts one,
waits for the lines it expects (each with a deadline, never a sleep), then sends SIGINT
as a person would and checks the exit status and what was printed.  A reader thread
moves stdout into a queue so no wait can block on a pipe.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: A line the test waits for arrives within milliseconds; this covers a loaded CI box.
LINE_TIMEOUT_S = 20.0


def cli_argv(*args: str) -> list[str]:
    """``stora-gateway ARGS`` run by this Python, from the working tree."""
    return [sys.executable, "-m", "gateway.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI process: the working tree first on the path."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command that ends by itself; its exit status and output."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, env=cli_env(),
                          cwd=ROOT, timeout=timeout, check=False)


class CliProcess:
    """``stora-gateway ARGS`` in the background; :meth:`wait_for` reads its lines."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cli_argv(*args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=cli_env(**(env or {})))
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""
        self.returncode: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, check: Callable[[str], bool],
                 timeout: float = LINE_TIMEOUT_S) -> str:
        """The next line for which ``check`` is true (lines read meanwhile are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError(f"no such line within {timeout} s; got:\n"
                                     + "\n".join(self.lines) + self._stderr_now()) from None
            if line is None:
                raise AssertionError("the process ended; output:\n" + "\n".join(self.lines)
                                     + self._stderr_now())
            self.lines.append(line)
            if check(line):
                return line

    def wait_json(self, check: Callable[[dict[str, Any]], bool],
                  timeout: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        """The next JSON line for which ``check`` is true."""
        def matches(line: str) -> bool:
            try:
                doc = json.loads(line)
            except ValueError:
                return False
            return isinstance(doc, dict) and check(doc)

        return dict(json.loads(self.wait_for(matches, timeout)))

    def _stderr_now(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return "\nstderr:\n" + self.proc.stderr.read()

    def interrupt(self, timeout: float = LINE_TIMEOUT_S) -> int:
        """Ctrl-C (SIGINT), then wait for the exit; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.finish(timeout)

    def finish(self, timeout: float = LINE_TIMEOUT_S) -> int:
        """Wait for the exit, read the rest of the output; the exit status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.returncode = self.proc.returncode
        return int(self.proc.returncode)

    def json_lines(self) -> list[dict[str, Any]]:
        """Every line read so far that is a JSON object."""
        docs = []
        for line in self.lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                docs.append(doc)
        return docs

    def __enter__(self) -> CliProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.returncode is None:
            self.interrupt()


def first(docs: Sequence[dict[str, Any]], **fields: Any) -> dict[str, Any] | None:
    """The first document whose ``fields`` have these values."""
    for doc in docs:
        if all(doc.get(k) == v for k, v in fields.items()):
            return doc
    return None
