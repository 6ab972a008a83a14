"""Which serial port names a configuration may give: device paths and two network schemes.

A controller's ``port`` is handed to pyserial's ``serial_for_url``, which is far more
than "open a serial port": ``spy://PORT?file=PATH`` truncates and writes any file the
agent can write (its database, its config), ``hwgrep://`` searches the system's ports,
and ``alt://PORT?class=NAME`` imports a class by name.  Found in an outside review: a
signed ``config.set`` with a ``spy://`` port overwrote the state database while the
doors kept working.  So a port is one of:

* a **device path**: an absolute path under ``/dev`` (``/dev/ttyUSB0``,
  ``/dev/serial/by-id/usb-FTDI_…``), which need not exist yet (an adapter unplugged
  while the config is written); anywhere else only a path that resolves to a character
  device at the time it is checked (a symlink to a pseudo-terminal, as the simulators
  make).  A path that exists and is not a character device (a regular file, a
  directory, a FIFO) is refused wherever it is, and so is any path in a directory
  anyone may write to (``/dev/shm``, ``/tmp``), where another user could plant the name
  between the check and the open;
* ``socket://HOST:PORT`` or ``rfc2217://HOST:PORT``: a serial device server on the
  network (a Moxa or USR-style RS-485-to-Ethernet box), the two schemes a real install
  needs, with no query string (pyserial reads options such as ``logging=`` from it), no
  path and no user information.

``loop://`` and the other pyserial handlers are for tests, which pass their own
connection factory (``drivers.link.SerialFactory``); they never come from a config.
:func:`port_problem` is the one rule; the config loader reports it against the
``port`` key, and :func:`drivers.link.open_serial` checks it again before opening.
"""

from __future__ import annotations

import os
import stat
from typing import Final
from urllib.parse import urlsplit

__all__ = ["DEVICE_DIR", "NETWORK_SCHEMES", "port_problem"]

#: Where device nodes live.  A path under it is taken as a device even before it exists.
DEVICE_DIR: Final = "/dev/"
#: pyserial URL schemes a real install needs: a serial device server on the network,
#: spoken to as raw TCP (``socket``) or Telnet with RFC 2217 port control (``rfc2217``).
NETWORK_SCHEMES: Final = ("socket", "rfc2217")
#: A path or URL longer than this is not a port name (Linux PATH_MAX is 4096).
_MAX_LENGTH: Final = 4096

_ALLOWED_FORMS: Final = ("a device path such as /dev/ttyUSB0 or /dev/serial/by-id/…, "
                         "or socket://HOST:PORT or rfc2217://HOST:PORT")


def port_problem(port: str) -> str | None:
    """Why ``port`` may not be used as a serial port, or ``None`` when it may.

    The reason is one sentence fragment meant to follow the key's name, e.g.
    ``"spy:// is not allowed: use a device path such as /dev/ttyUSB0 …"``.
    """
    if not port or port != port.strip():
        return f"must be {_ALLOWED_FORMS}, found {port!r}"
    if len(port) > _MAX_LENGTH:
        return f"is {len(port)} characters long; not a port name"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in port):
        return "must not contain control characters"
    if "://" in port:
        return _url_problem(port)
    return _path_problem(port)


def _url_problem(port: str) -> str | None:
    scheme = port.split("://", 1)[0]
    if scheme.lower() not in NETWORK_SCHEMES:
        return (f"{scheme}:// is not allowed (pyserial's other URL handlers open files, "
                f"search ports or load classes); use {_ALLOWED_FORMS}")
    try:
        parts = urlsplit(port)
        host, number = parts.hostname, parts.port
    except ValueError as exc:  # a bad port number or IPv6 literal
        return f"is not a valid {scheme}:// URL: {exc}"
    if parts.query or "?" in port:
        return f"must not have a query string (options such as ?logging= or ?timeout=); " \
               f"use {scheme}://HOST:PORT"
    if parts.fragment or parts.username is not None or parts.password is not None:
        return f"must be exactly {scheme}://HOST:PORT, found {port!r}"
    if parts.path not in ("", "/"):
        return f"must be exactly {scheme}://HOST:PORT, without a path ({parts.path!r})"
    if not host or number is None or not 0 < number < 65536:
        return f"must name a host and a port: {scheme}://HOST:PORT, found {port!r}"
    return None


def _path_problem(port: str) -> str | None:
    if not port.startswith("/"):
        return f"must be {_ALLOWED_FORMS}; a device path is absolute, found {port!r}"
    if "?" in port or "#" in port:
        return f"must be a plain device path, found {port!r}"
    under_dev = os.path.normpath(port).startswith(DEVICE_DIR)
    parent = os.path.dirname(os.path.normpath(port))
    try:
        open_to_all = bool(os.stat(parent).st_mode & stat.S_IWOTH)
    except (OSError, ValueError):
        open_to_all = False  # a missing directory: nothing can be planted in it either
    if open_to_all:
        # /dev/shm, /dev/mqueue, /tmp: any local user may create (or swap) the name
        # between this check and the open (found in review).
        return (f"{port} is in {parent}, which anyone may write to; use the device's "
                "own path (/dev/ttyUSB0, /dev/serial/by-id/…)")
    try:
        st = os.stat(port)  # follows links: what would actually be opened
    except FileNotFoundError:
        if under_dev:
            return None  # an adapter not plugged in yet: the link reports it and retries
        return (f"{port} does not exist; a port outside {DEVICE_DIR} must be a serial "
                "device or a link to one")
    except (OSError, ValueError) as exc:  # a dangling link loop, a NUL byte, EACCES
        if under_dev:
            return None  # e.g. not allowed to stat it from this user: opening will tell
        return f"cannot check {port}: {exc}"
    if not stat.S_ISCHR(st.st_mode):
        return f"{port} is not a serial device (it is {_kind(st.st_mode)})"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a character device"
