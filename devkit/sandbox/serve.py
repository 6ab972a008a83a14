"""``stora-gateway sandbox``: secret files, the demo operator, serving in the foreground."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, TextIO

from devkit.sandbox.oauth import AUTHORIZE_PATH
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


#: The ``--demo-operator``: one site with a gate open 06:00–22:00 on weekdays, and units.
DEMO_OPERATOR: Final = "demo"
DEMO_SITE: Final = {
    "id": "site_demo",
    "name": "Demo Storage Central",
    "access_hours": {"monday": "06:00-22:00", "tuesday": "06:00-22:00",
                     "wednesday": "06:00-22:00", "thursday": "06:00-22:00",
                     "friday": "06:00-22:00", "saturday": "08:00-18:00", "sunday": "closed"},
    "units": [
        {"id": "unit_demo_gate", "reference_id": "GATE", "status": "unavailable"},
        {"id": "unit_demo_a101", "reference_id": "A-101", "status": "occupied"},
        {"id": "unit_demo_a102", "reference_id": "A-102", "status": "available"},
        {"id": "unit_demo_a103", "reference_id": "A-103", "status": "overlocked"},
    ],
}


def add_demo_operator(sandbox: Sandbox) -> str:
    """Create the :data:`DEMO_OPERATOR` (one site, a gate and three units); its id."""
    sandbox.create_operator(DEMO_OPERATOR, name="Demo Storage", sites=[DEMO_SITE])
    return DEMO_OPERATOR


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
            ("authorize_url", sandbox.url + AUTHORIZE_PATH),  # last: scripts read 4 lines
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
