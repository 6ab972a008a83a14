"""``stora-gateway sandbox``: secret files and serving in the foreground."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from devkit.sandbox.rules import ADMIN_PREFIX, LOGGER

if TYPE_CHECKING:
    from devkit.sandbox.api import Sandbox


def read_secret_file(path: str) -> str:
    """The secret in ``path``, surrounding whitespace removed; ``ValueError`` if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def read_token_file(path: str) -> list[str]:
    """Static tokens in ``path``, one per line; blank lines and ``#`` comments skipped."""
    tokens = [
        line.strip()
        for line in read_secret_file(path).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return tokens


def serve(sandbox: Sandbox, out: TextIO) -> int:
    """Run ``sandbox`` in the foreground until SIGINT or SIGTERM; print its URLs first.

    ``OSError`` when the address cannot be bound.  Outside the main thread (where
    signals cannot be caught) it serves until the process ends.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("signal %d: stopping the sandbox", signum)
        stop.set()

    sandbox.start()
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        for name, value in (
            ("url", sandbox.url),
            ("api_url", sandbox.api_url),
            ("token_url", sandbox.token_url),
            ("admin_url", sandbox.url + ADMIN_PREFIX),
        ):
            out.write(f"{name}: {value}\n")
        out.flush()
        while not stop.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sandbox.stop()
    return 0
