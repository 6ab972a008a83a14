"""Progress lines and cancel-by-hanging-up on the real control socket
(gateway/ops/control_stream.py): a real ``ControlServer`` on a Unix socket, a handler that
works the way the agent's ``test`` does, and the CLI's client."""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.ops.control import ControlClient, ControlServer, Peer
from gateway.ops.control_stream import current_call, stream

#: Items the slow handler would go through if nobody stopped it.
ITEMS = 5
#: Longest a handler step waits for the cancel; the tests never wait this long.
STEP_S = 10.0


class SlowHandler:
    """``work``: one item per step, a progress line per item; a step waits until the
    test lets it go (or the client hangs up)."""

    def __init__(self) -> None:
        self.step = threading.Semaphore(0)
        self.started = threading.Event()
        self.done: list[int] = []
        self.finished = threading.Event()

    def handle(self, method: str, params: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        del peer
        call = current_call()
        if method == "plain":
            call.progress({"never": "sent"})  # not asked for: nothing goes out
            return {"ok": True}
        with call.watch() as stop:
            call.on_cancel(self.step.release)  # a waiting step ends at once
            self.started.set()
            for item in range(ITEMS):
                if stop.is_set():
                    break
                if not self.step.acquire(timeout=STEP_S) and not stop.is_set():
                    raise AssertionError("the test never released the step")
                if stop.is_set():
                    break
                self.done.append(item)
                call.progress({"item": item})
        self.finished.set()
        return {"done": list(self.done), "interrupted": stop.is_set()}


@pytest.fixture
def server() -> Iterator[tuple[Path, SlowHandler]]:
    # A short directory of its own: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="stora-cs-") as tmp:
        path = Path(tmp) / "control.sock"
        handler = SlowHandler()
        with ControlServer(path, handler):
            yield path, handler


def test_progress_lines_come_before_the_answer_only_when_asked(
    server: tuple[Path, SlowHandler],
) -> None:
    path, handler = server
    seen: list[dict[str, Any]] = []
    for _ in range(ITEMS):
        handler.step.release()
    result, interrupted = stream(ControlClient(path, timeout=10), "work", {}, seen.append,
                                 interrupt_wait_s=5)
    assert interrupted is False
    assert seen == [{"item": i} for i in range(ITEMS)]
    assert result == {"done": list(range(ITEMS)), "interrupted": False}
    # An ordinary call gets its one answer line, no progress.
    assert ControlClient(path, timeout=10).call("plain") == {"ok": True}


def test_hanging_up_the_sending_side_cancels_and_the_answer_still_comes(
    server: tuple[Path, SlowHandler],
) -> None:
    path, handler = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b'{"id": 1, "method": "work", "stream": true}\n')
        handler.step.release()
        reader = sock.makefile("rb")
        assert b'"progress":{"item":0}' in reader.readline()
        sock.shutdown(socket.SHUT_WR)  # Ctrl-C in the CLI
        assert handler.finished.wait(10)
        answer = reader.readline()
        reader.close()
    assert b'"ok":true' in answer
    assert b'"done":[0]' in answer
    assert b'"interrupted":true' in answer
    assert handler.done == [0]  # nothing after the hang-up


def test_a_client_that_vanishes_stops_the_work(server: tuple[Path, SlowHandler]) -> None:
    path, handler = server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.sendall(b'{"id": 1, "method": "work", "stream": true}\n')
    assert handler.started.wait(10)
    sock.close()  # kill -9 of the CLI
    assert handler.finished.wait(10)
    assert handler.done == []


def test_ctrl_c_in_the_client_hangs_up_and_returns_what_ran(
    server: tuple[Path, SlowHandler],
) -> None:
    path, handler = server
    handler.step.release()

    def on_progress(item: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # as a Ctrl-C arriving while the line is handled

    result, interrupted = stream(ControlClient(path, timeout=10), "work", {}, on_progress,
                                 interrupt_wait_s=5)
    assert interrupted is True
    assert result == {"done": [0], "interrupted": True}
