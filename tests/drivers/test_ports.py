"""Serial port names (drivers/ports.py): device paths and two network schemes, nothing else.

Found in an outside review: a controller ``port`` went straight to pyserial's
``serial_for_url``, so ``spy://…?file=PATH`` truncated and overwrote any file the agent
could write (its database) while the doors kept working.  These tests hold the rule at
each place it applies: ``port_problem`` itself, the config loader (``check-config``, one
line naming ``port``), and ``open_serial`` (for configs built in code).
"""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

from drivers.link import open_serial
from drivers.ports import port_problem
from gateway.cli.main import main
from gateway.config import load_config
from gateway.errors import ConfigError
from tests.support.config import VALID_TOML, write_config

REFUSED = [
    "spy:///dev/ttyUSB0?file=/var/lib/stora-gateway/gateway.db",
    "spy://loop://?file=/tmp/x",
    "hwgrep://.*",
    "alt:///dev/ttyUSB0?class=PosixPollSerial",
    "loop://",
    "LOOP://",
    "cp2110://0001:0002",
    "socket://10.0.0.5:4001?logging=debug",
    "rfc2217://10.0.0.5:4001?ign_set_control&timeout=3",
    "socket://10.0.0.5",  # no port
    "socket://:4001",  # no host
    "socket://user:pw@10.0.0.5:4001",
    "socket://10.0.0.5:4001/path",
    "socket://10.0.0.5:99999",
    "ttyUSB0",  # relative
    "dev/ttyUSB0",
    " /dev/ttyUSB0",
    "/dev/ttyUSB0\n",
    "/dev/ttyUSB0?x=1",
    "",
]
ACCEPTED = [
    "/dev/ttyUSB0",
    "/dev/ttyAMA0",
    "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0",
    "/dev/ttyUSB7",  # need not exist: an adapter plugged in later
    "socket://10.0.0.5:4001",
    "socket://serial-server.local:4001",
    "rfc2217://[fe80::1]:2217",
    "RFC2217://10.0.0.5:2217",
]


@pytest.mark.parametrize("port", REFUSED)
def test_pyserial_handlers_that_open_files_or_classes_are_refused(port: str) -> None:
    assert port_problem(port) is not None


@pytest.mark.parametrize("port", ACCEPTED)
def test_device_paths_and_serial_servers_are_accepted(port: str) -> None:
    assert port_problem(port) is None


def test_a_path_must_be_a_serial_device_wherever_it_is(tmp_path: Path) -> None:
    """Outside /dev only a link to a character device passes (the simulators' ptys); a
    regular file, a directory or a FIFO is refused in /dev too (e.g. /dev/shm)."""
    leader, follower = os.openpty()
    try:
        link = tmp_path / "ttySIM0"
        link.symlink_to(os.ttyname(follower))
        assert port_problem(str(link)) is None
        assert port_problem(os.ttyname(follower)) is None
    finally:
        os.close(leader)
        os.close(follower)
    database = tmp_path / "gateway.db"
    database.write_bytes(b"SQLite format 3\0")
    assert "regular file" in (port_problem(str(database)) or "")
    assert "directory" in (port_problem(str(tmp_path)) or "")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "FIFO" in (port_problem(str(fifo)) or "")
    assert "does not exist" in (port_problem(str(tmp_path / "gone")) or "")
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        planted = shm / f"stora-gateway-test-{os.getpid()}"
        planted.write_bytes(b"")
        try:
            assert "anyone may write to" in (port_problem(str(planted)) or "")
        finally:
            planted.unlink()
        # Not yet there is no better: another user could plant it after the check.
        assert "anyone may write to" in (port_problem(str(shm / "ttyNEW")) or "")
    assert "anyone may write to" in (port_problem("/tmp/ttyUSB0") or "")


@pytest.mark.parametrize("port", ["spy:///dev/ttyUSB0?file=gateway.db", "loop://",
                                  "hwgrep://.*", "alt:///dev/ttyUSB0?class=Serial",
                                  "socket://10.0.0.5:4001?logging=debug"])
def test_config_refuses_the_port_with_one_line_naming_it(tmp_path: Path, port: str) -> None:
    path = write_config(tmp_path, VALID_TOML.replace('port = "/dev/ttyUSB1"',
                                                     f'port = "{port}"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "controllers[1].port"
    assert len(str(info.value).splitlines()) == 1
    out, err = io.StringIO(), io.StringIO()
    assert main(["--config", str(path), "check-config"], out=out, err=err) == 2
    assert "controllers[1].port" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()


def test_config_accepts_a_serial_server(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID_TOML.replace('port = "/dev/ttyUSB1"',
                                                     'port = "socket://10.0.0.5:4001"'))
    controller = load_config(path).controller("boards")
    assert controller is not None
    assert controller.port == "socket://10.0.0.5:4001"


def test_open_serial_refuses_spy_before_pyserial_writes_the_file(tmp_path: Path) -> None:
    """Defence in depth: a Config built in code (not through the loader) still cannot
    reach pyserial's spy:// handler, which would truncate the file it names."""
    victim = tmp_path / "gateway.db"
    victim.write_bytes(b"precious state")
    with pytest.raises(ValueError, match="spy:// is not allowed"):
        open_serial(f"spy://loop://?file={victim}", 9600, 0.1)
    assert victim.read_bytes() == b"precious state"
    with pytest.raises(ValueError, match="not a serial device"):
        open_serial(str(victim), 9600, 0.1)
    assert victim.read_bytes() == b"precious state"


def test_open_serial_still_opens_a_serial_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = open_serial(f"socket://127.0.0.1:{server.getsockname()[1]}", 9600, 0.1)
        conn, _ = server.accept()
        try:
            port.write(b"\x01\x03")
            assert conn.recv(2) == b"\x01\x03"
        finally:
            conn.close()
            port.close()
